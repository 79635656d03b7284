"""Commands a user runs by hand: `icmlora score`, and refusals of what the pipeline never builds."""

from __future__ import annotations

import json

import pytest
import torch
from params_helpers import micro_params

from icmlora.cli import main as cli


@pytest.mark.slow
def test_score_an_adapter_on_a_florence_jsonl(boxer, tmp_path, capsys, monkeypatch):
    """`icmlora score` on a base that writes each image's boxes: with a PEFT adapter that adds
    nothing (B = 0) every box is found (mAP50 1, precision 1, recall 1: known without our scorer);
    an adapter that changes the model changes the score; --mlflow logs one run with those metrics."""
    import copy

    import mlflow
    from peft import get_peft_model

    from icmlora.artifacts.base_model import write_base_model
    from icmlora.lora import peft_config

    cfg = micro_params(**{"predict.max_new_tokens": 14})
    monkeypatch.setattr("icmlora.stage_cli.load_params", lambda _: cfg)
    write_base_model(boxer.model, boxer.processor, tmp_path / "base")
    annotations = boxer.dataset(tmp_path / "task")
    lora = get_peft_model(copy.deepcopy(boxer.model), peft_config(cfg.lora, 2))
    lora.save_pretrained(tmp_path / "zero")  # PEFT's init: B = 0
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    lora.save_pretrained(tmp_path / "random")

    def score(adapter: str, *extra: str) -> dict:
        status = cli(["score", "--annotations", str(annotations), "--adapter", str(tmp_path / adapter), "--base",
                      str(tmp_path / "base"), *extra])
        assert status == 0
        return json.loads(capsys.readouterr().out)

    printed = score("zero", "--out", str(tmp_path / "score.json"), "--mlflow")
    assert printed == json.loads((tmp_path / "score.json").read_text())
    assert printed["num_images"] == 4 and printed["num_gt"] == printed["num_pred"] == 4
    assert printed["map50"] == printed["precision"] == printed["recall"] == 1.0
    changed = score("random")
    assert changed["map50"] < 0.5 and changed["num_pred"] != 4

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'score'", output_format="list")
    assert len(runs) == 1  # the --mlflow call only
    run = runs[0]
    assert run.data.tags["adapter"] == str(tmp_path / "zero") and run.data.tags["annotations"] == str(annotations)
    assert run.data.metrics == {k: float(v) for k, v in printed.items()}
    assert cli(["score", "--annotations", str(annotations), "--adapter", str(tmp_path), "--base", str(tmp_path / "base")]) == 2


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
                       "data.tasks": ["circle", "square"], "heldout_tasks": ["square"],
                       "data.synthetic.task_kind": "category"}.items():
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
