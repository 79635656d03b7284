"""Commands a user runs by hand: `icmlora score`, and refusals of what the pipeline never builds."""

from __future__ import annotations

import json

import pytest

from icmlora.artifacts import checkpoints_dir
from icmlora.cli import main as cli


@pytest.mark.slow
def test_score_an_adapter_on_a_florence_jsonl(setting, tmp_path, capsys, monkeypatch):
    """The same numbers as the pipeline's own scorer, from the command line."""
    from icmlora.artifacts.base_model import read_base_model
    from icmlora.scoring import Scorer

    cfg, root, _ = setting
    monkeypatch.setattr("icmlora.stage_cli.load_params", lambda _: cfg)
    adapter = checkpoints_dir("circle", 1, 0, root / "lora") / "step-6"
    annotations = root / "prepared" / "circle" / "valid" / "annotations.jsonl"
    status = cli(["score", "--annotations", str(annotations), "--adapter", str(adapter), "--base", str(root / "base"),
                  "--out", str(tmp_path / "score.json"), "--mlflow"])
    assert status == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "score.json").read_text())
    from peft import PeftModel

    base, processor = read_base_model(root / "base")
    expected = Scorer(PeftModel.from_pretrained(base, adapter).eval(), processor, cfg.predict, 0, root / "prepared")
    assert printed == expected.score("circle")
    assert cli(["score", "--annotations", str(annotations), "--adapter", str(tmp_path), "--base", str(root / "base")]) == 2


@pytest.mark.parametrize("argv, message", [
    (["train_lora", "--task", "dog"], "--task 'dog' is not in data.tasks"),
    (["train_lora", "--task", "circle", "--seed", "5"], "--seed 5 is not in lora.seeds (0)"),
    (["collect_params", "--rank", "3"], "--rank 3 is not in lora.ranks (1, 2)"),
    (["train_cvae", "--rank", "16"], "--rank 16 is not in lora.ranks"),
    (["generate", "--task-vector", "v.safetensors", "--rank", "3", "--out", "x"], "--rank 3 is not in lora.ranks"),
])
def test_commands_refuse_what_the_pipeline_never_builds(setting, monkeypatch, capsys, argv, message):
    cfg, _, _ = setting
    monkeypatch.setattr("icmlora.stage_cli.load_params", lambda _: cfg)
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "add it to" in err


def test_generate_from_examples_says_when_no_training_adapter_writes_their_labels(setting, tmp_path, capsys):
    from icmlora.florence.format import Example, read_annotations, write_annotations
    from icmlora.stages.generate import vector_from_examples

    cfg, root, _ = setting
    source = root / "prepared" / "circle" / "valid" / "annotations.jsonl"
    examples = read_annotations(source)[:3]
    dogs = [Example(str(source.parent / e.image), e.width, e.height,
                    [b.__class__("dog", b.x1, b.y1, b.x2, b.y2) for b in e.boxes]) for e in examples]
    write_annotations(tmp_path / "dogs.jsonl", dogs)
    vector = vector_from_examples(cfg, tmp_path / "dogs.jsonl", root / "base")
    assert vector.shape == (cfg.base.tiny.d_model,)
    assert "labels its boxes 'dog', which no training adapter writes" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here: bench/gpu_check.sh would run the check")
@pytest.mark.slow
def test_gpu_check_without_a_gpu_says_so_and_exits_2(repo):
    import subprocess
    import sys

    proc = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU here" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert not (repo / "metrics" / "gpu_check.json").exists()


def test_a_real_base_with_the_hub_out_of_reach_exits_2_with_the_ways_on(repo, tmp_path):
    """profiles/real.yaml's base.model, no network (HF_HUB_OFFLINE: the hub is never asked) and an empty
    Hugging Face cache: one clear message naming the model, its revision and the ways on, no traceback,
    nothing under the output folder."""
    import os
    import subprocess
    import sys

    from params_helpers import params_dict, with_changes
    from ruamel.yaml import YAML

    from icmlora.stages.prepare import prepare

    data = params_dict("real")
    for key, value in {"data.source": "synthetic", "data.synthetic.train_images": 8, "data.synthetic.valid_images": 8,
                       "data.tasks": ["circle", "square"], "heldout_tasks": ["square"]}.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    cfg = with_changes(data, {})
    assert cfg.base.model == "florence-community/Florence-2-base-ft"
    prepare(cfg, tmp_path / "prepared")
    params = tmp_path / "params.yaml"
    with params.open("w") as fh:
        YAML(typ="safe", pure=True).dump(data, fh)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), ICMLORA_LOG="ERROR")
    proc = subprocess.run([sys.executable, "-m", "icmlora.stages.base_model", "--params", str(params), "--prepared",
                           str(tmp_path / "prepared"), "--out", str(tmp_path / "base")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    message = proc.stderr
    assert "base.model 'florence-community/Florence-2-base-ft' (revision main) could not be loaded" in message
    assert f"no cache under {tmp_path / 'hf-home'}" in message
    for way in ("hf download florence-community/Florence-2-base-ft", "set base.model to it", "HF_ENDPOINT=",
                "HF_HOME=<folder with hub/models--florence-community--Florence-2-base-ft>"):
        assert way in message, way
    assert not (tmp_path / "base").exists()
