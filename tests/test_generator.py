"""The generator stages on a micro setting: CVAE training, generated PEFT folders, novelty, summary."""

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

from icmlora.artifacts import checkpoints_dir, final_adapter_dir
from icmlora.artifacts.adapters import read_adapter
from icmlora.artifacts.generators import read_generator
from icmlora.artifacts.task_vectors import read_task_vectors
from icmlora.errors import InputError
from icmlora.florence.model import build_tiny_model
from icmlora.stages.collect_params import collect_params
from icmlora.stages.evaluate import evaluate, novelty
from icmlora.stages.generate import generate_all, generate_one
from icmlora.stages.report import summarize, timings
from icmlora.stages.task_vectors import compute_task_vectors
from icmlora.stages.train_cvae import train_cvae


@pytest.fixture(scope="module")
def trained(setting, tmp_path_factory):
    cfg, root, processor = setting
    out = tmp_path_factory.mktemp("gen")
    for rank in cfg.lora.ranks:
        collect_params(cfg, rank, root / "lora", out / "matrix")
    compute_task_vectors(cfg, root / "prepared", root / "base", root / "lora", out / "tv.safetensors", out / "tv.json",
                         out / "tv-metrics.json", out / "plots")
    results = {rank: train_cvae(cfg, rank, out / "matrix", out / "tv.safetensors", out / "cvae", out / "state",
                                out / "cvae_metrics") for rank in cfg.lora.ranks}
    return cfg, root, processor, out, results


@pytest.mark.slow
def test_cvae_training_writes_a_rebuildable_generator(trained):
    """The generator folder rebuilds, from its own files, a CVAE whose size is the flattened
    adapter's (the collect_params manifest, not the run's own record) and that decodes: one row of
    that size per z, the same row for the same z, another for another task's vector."""
    cfg, _, _, out, results = trained
    vectors = read_task_vectors(out / "tv.safetensors")
    for rank, result in results.items():
        assert result["train_tasks"] == cfg.training_tasks()
        assert result["rows"] == 6  # the held-out task's 3 checkpoints are never seen
        history = pd.read_csv(out / "cvae_metrics" / f"r{rank}.csv")
        assert list(history.columns) == ["epoch", "loss", "recon", "kl"] and len(history) == cfg.cvae.train.epochs
        gen = read_generator(rank, out / "cvae")
        manifest = json.loads((out / "matrix" / f"r{rank}.json").read_text())
        dim = sum(math.prod(shape) for shape in manifest["shapes"])
        assert gen.model.config.input_dim == manifest["dim"] == dim > 0
        train = torch.stack([vectors[t] for t in cfg.training_tasks()]).float()  # the held-out task's is not in it
        assert torch.allclose(gen.cond_mean, train.mean(0)) and torch.allclose(gen.cond_scale, (train - train.mean(0)).std())
        z = torch.zeros(2, gen.model.config.latent_dim)
        circle = gen.sample(vectors["circle"], z)
        assert circle.shape == (2, dim) and torch.isfinite(circle).all() and torch.equal(circle[0], circle[1])
        assert not torch.allclose(circle, gen.sample(vectors["square"], z))
        assert not (out / "state" / f"r{rank}").exists()  # finished: no resume state left


@pytest.mark.slow
def test_generated_folders_load_in_peft_with_exactly_the_manifest_tensors(trained):
    cfg, root, processor, out, _ = trained
    metrics = generate_all(cfg, out / "cvae", out / "matrix", out / "tv.safetensors", out / "generated", out / "g.json")
    assert metrics["adapters"] == len(cfg.data.tasks) * len(cfg.lora.ranks) * (cfg.generate.samples + 1)
    assert metrics["generate_adapter_seconds"] < 1.0
    manifest = json.loads((out / "matrix" / "r2.json").read_text())
    folder = out / "generated" / "triangle-r2" / "sample-z0"  # a held-out task
    tensors, config = read_adapter(folder)
    assert sorted(tensors) == manifest["names"]
    assert [list(tensors[n].shape) for n in manifest["names"]] == manifest["shapes"]
    assert config["r"] == 2 and "triangle" in (folder / "README.md").read_text()
    base = build_tiny_model(cfg.base.tiny, processor, 64, seed=0)
    model = PeftModel.from_pretrained(base, folder)
    # PEFT only warns on a missing or unexpected key: compare names and values
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert sorted(loaded) == sorted(tensors) and len(tensors) > 0
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value), name


@pytest.mark.slow
def test_generate_for_a_new_task_vector(trained, tmp_path):
    cfg, _, _, out, _ = trained
    vec = torch.randn(cfg.base.tiny.d_model)
    written = generate_one(cfg, 1, tmp_path / "new-task", vec, samples=2, cvae_root=out / "cvae", matrix_root=out / "matrix")
    assert [p.name for p in written] == ["sample-z0", "sample-0", "sample-1"]
    with pytest.raises(InputError, match="task vector has 3 values"):
        generate_one(cfg, 1, tmp_path / "bad", torch.randn(3), samples=1, cvae_root=out / "cvae", matrix_root=out / "matrix")


@pytest.mark.slow
def test_generate_cli_from_a_vector_file(trained, tmp_path, monkeypatch):
    from icmlora.stages import generate

    cfg, _, _, out, _ = trained
    save_file({"vector": torch.randn(cfg.base.tiny.d_model)}, str(tmp_path / "vec.safetensors"))
    monkeypatch.setattr(generate.generate_one, "__defaults__", (out / "cvae", out / "matrix", None))
    monkeypatch.setattr("icmlora.stage_cli.load_params", lambda _: cfg)
    result = generate.main(["--task-vector", str(tmp_path / "vec.safetensors"), "--rank", "2", "--out",
                            str(tmp_path / "adapters"), "--samples", "1"])
    assert len(result["adapters"]) == 2 and (tmp_path / "adapters" / "sample-z0" / "adapter_config.json").is_file()
    # A task given only as labelled examples: the base model computes its vector (icl).
    examples = trained[1] / "prepared" / "square" / "valid" / "annotations.jsonl"
    result = generate.main(["--examples", str(examples), "--base", str(trained[1] / "base"), "--rank", "1",
                            "--out", str(tmp_path / "from-examples"), "--samples", "0"])
    assert [Path(p).name for p in result["adapters"]] == ["sample-z0"]


def test_novelty_on_constructed_cases():
    own = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # nearest-neighbour distances 1, 1, 2 -> median 1
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    copy = novelty(torch.tensor([0.0, 0.0]), train, own)
    assert copy["nn_distance"] == 0.0 and copy["novelty_ratio"] == 0.0
    far = novelty(torch.tensor([3.0, 4.0]), train, own)
    assert far["nn_distance"] == pytest.approx(5.0) and far["novelty_ratio"] == pytest.approx(5.0)
    assert far["nearest_index"] == 0 and far["nn_cosine"] == 0.0  # cosine with the zero row: 0, not nan
    near = novelty(torch.tensor([9.0, 0.0]), train, own)
    assert near["nearest_index"] == 1 and near["nn_cosine"] == pytest.approx(1.0)


def test_summary_keys_and_ratios(setting):
    cfg = setting[0]
    rows = []
    for task in cfg.data.tasks:
        held = task in cfg.heldout_tasks
        for source, sample, m in [("base", "-", 0.0), ("trained", "-", 0.8), ("generated", "z0", 0.8), ("generated", "0", 0.4),
                                  ("avg_checkpoint", "-", 0.5), ("noise", "-", 0.1), ("wrong_task", "x", 0.2),
                                  ("random_condition", "-", 0.0)] + ([("nearest_task", "x", 0.3)] if held else []):
            rows.append({"task": task, "rank": 2, "source": source, "sample": sample, "heldout": held, "map50": m,
                         "novelty_ratio": 2.0 if source == "generated" else None,
                         "nn_cosine": 0.9 if source == "generated" else None})
    storage = {"2": {"generator_bytes": 100, "checkpoint_bytes": 1000, "final_adapter_bytes": 300}}
    summary = summarize(pd.DataFrame(rows), cfg, {"storage": storage})
    r = summary["ranks"]["2"]
    assert r["generated_over_trained_median"] == pytest.approx(0.75)  # mean of samples (0.6) / 0.8
    assert r["wrong_task_over_right_task_median"] == pytest.approx(0.25)
    assert r["heldout_generated_map50_median"] == pytest.approx(0.6)
    assert summary["storage"]["ratio"] == pytest.approx(0.1)
    assert "timing" not in summary  # wall clock lives in metrics/timing/, apart from the metrics
    assert timings({"generate_adapter_seconds": 0.01}, [{"train_seconds": 20.0}])["speedup_median"] == pytest.approx(2000.0)


@pytest.mark.slow
def test_evaluate_refuses_a_task_without_its_z0_sample(trained, tmp_path):
    """The baselines are built around each task's z = 0 sample: without it evaluate must stop and
    say which folder lacks it, not reuse the previous task's sample (or crash on the first)."""
    cfg, root, _, out, _ = trained
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"ranks": [1]}),
                                 "evaluate": cfg.evaluate.model_copy(update={"cross_task_ranks": []})})
    generate_all(cfg, out / "cvae", out / "matrix", out / "tv.safetensors", tmp_path / "generated", tmp_path / "g.json")
    shutil.rmtree(tmp_path / "generated" / "square-r1" / "sample-z0")  # the second task
    lora = tmp_path / "lora"
    shutil.copytree(root / "lora", lora)
    for task in cfg.data.tasks:  # the stand-in trajectories have no final adapter: use the last checkpoint
        shutil.copytree(checkpoints_dir(task, 1, 0, lora) / "step-6", final_adapter_dir(task, 1, 0, lora))
    with pytest.raises(InputError, match=r"generated/square-r1: no sample-z0"):
        evaluate(cfg, root / "prepared", root / "base", lora, out / "matrix", out / "cvae", tmp_path / "generated",
                 out / "tv.safetensors", tmp_path / "c.csv", tmp_path / "x.csv", tmp_path / "e.json")
    assert not (tmp_path / "c.csv").exists()


def test_one_training_task_gets_a_unit_condition_scale():
    from icmlora.cvae import Generator

    mean, scale = Generator.standardization(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.equal(mean, torch.tensor([1.0, 2.0, 3.0])) and torch.equal(scale, torch.ones(3))


@pytest.mark.slow
def test_examples_are_refused_by_a_generator_of_another_vector_kind(trained, tmp_path):
    cfg, _, _, out, _ = trained
    vec = torch.randn(cfg.base.tiny.d_model)
    with pytest.raises(InputError, match="conditioned on 'icl' task vectors, and --examples computes 'text' ones"):
        generate_one(cfg, 1, tmp_path / "x", vec, samples=0, cvae_root=out / "cvae", matrix_root=out / "matrix",
                     method="text")


def test_reference_method_without_trained_adapters_is_a_clear_error(setting, tmp_path):
    cfg, root, _ = setting
    cfg = cfg.model_copy(update={"task_vectors": cfg.task_vectors.model_copy(update={"method": "reference"})})
    with pytest.raises(InputError, match="method 'reference' needs the trained adapter"):
        compute_task_vectors(cfg, root / "prepared", root / "base", root / "lora", tmp_path / "tv.safetensors",
                             tmp_path / "tv.json", tmp_path / "m.json", tmp_path / "plots")


@pytest.mark.slow
def test_select_keeps_the_sample_that_scores_best_on_the_given_examples_and_never_reads_a_split(trained, tmp_path,
                                                                                              monkeypatch):
    """`generate --examples F --select N`: N candidates, each scored on F's examples and nothing else (no
    prepared split, valid or train, is opened); the best is written, with every candidate's score.
    The micro generator's samples all score 0, so the score is a stand-in that tells them apart (the
    sum of the adapter's weights), and the examples each score sees are recorded."""
    import dataclasses

    import icmlora.artifacts.annotations
    import icmlora.few_shot
    import icmlora.scoring
    from peft import get_peft_model_state_dict

    from icmlora.florence.format import read_annotations, write_annotations
    from icmlora.images import load_images
    from icmlora.stages import generate

    cfg, root, processor, out, _ = trained
    source = root / "prepared" / "square" / "train"
    given = read_annotations(source / "annotations.jsonl", check_images=False)[:6]
    (tmp_path / "user").mkdir()
    examples = []
    for i, (e, image) in enumerate(zip(given, load_images([source / e.image for e in given]))):
        image.save(tmp_path / "user" / f"{i}.png")  # a user's own files (the prepared images live in a tar)
        examples.append(dataclasses.replace(e, image=f"{i}.png"))
    write_annotations(tmp_path / "user" / "examples.jsonl", examples)

    def refuse(*args, **kwargs):
        raise AssertionError(f"--select read a prepared split: {args}")

    seen = []

    def stand_in(model, processor, scored, images, predict_params):
        seen.append(([e.suffix for e in scored], len(images)))
        return float(sum(v.double().sum() for v in get_peft_model_state_dict(model).values()))

    monkeypatch.setattr(icmlora.artifacts.annotations, "read_split", refuse)
    monkeypatch.setattr(icmlora.scoring.Scorer, "valid_split", refuse)
    monkeypatch.setattr(icmlora.few_shot, "map50", stand_in)
    monkeypatch.setattr(generate.select_one, "__defaults__", (trained[1] / "base", out / "cvae", out / "matrix"))
    monkeypatch.setattr(generate.generate_one, "__defaults__", (out / "cvae", out / "matrix", None))
    monkeypatch.setattr(generate, "read_generator", lambda rank, root=out / "cvae": read_generator(rank, root))
    monkeypatch.setattr("icmlora.stage_cli.load_params", lambda _: cfg)
    result = generate.main(["--examples", str(tmp_path / "user" / "examples.jsonl"), "--base", str(root / "base"),
                            "--rank", "2", "--out", str(tmp_path / "picked"), "--select", "3"])
    selection = json.loads((tmp_path / "picked" / "selection.json").read_text())
    scores = selection["support_map50"]
    assert sorted(scores) == ["0", "1", "z0"] and selection["scored_on"] == 6 and len(set(scores.values())) == 3
    assert seen == [([e.suffix for e in examples], 6)] * 3  # F's examples, all of them, for every candidate
    assert selection["chosen"] == max(scores, key=scores.get)
    folders = [p for p in (tmp_path / "picked").iterdir() if p.is_dir()]
    assert [p.name for p in folders] == [f"sample-{selection['chosen']}"] and result["adapters"] == [str(folders[0])]
    weights, _ = read_adapter(folders[0])
    assert float(sum(v.double().sum() for v in weights.values())) == pytest.approx(scores[selection["chosen"]], rel=1e-4)
