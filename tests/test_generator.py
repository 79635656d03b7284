"""The generator stages on a micro setting: CVAE training, generated PEFT folders, novelty, summary."""

import json
import math

import pandas as pd
import pytest
import torch
from peft import PeftModel

from icmlora.artifacts.adapters import read_adapter
from icmlora.artifacts.generators import read_generator
from icmlora.artifacts.task_vectors import read_task_vectors
from icmlora.florence.model import build_tiny_model
from icmlora.stages.collect_params import collect_params
from icmlora.stages.evaluate import novelty, retrieval_weights
from icmlora.stages.generate import generate_all
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


def test_retrieval_weights_are_a_softmax_of_the_k_nearest_similarities():
    sims = torch.tensor([0.2, 0.9, -0.5, 0.7])
    weights = retrieval_weights(sims, k=2, temperature=0.1)
    assert list(weights) == [1, 3]  # the two most similar, nearest first
    e = [math.exp(0.9 / 0.1), math.exp(0.7 / 0.1)]
    assert weights[1] == pytest.approx(e[0] / sum(e), abs=1e-6) and weights[3] == pytest.approx(e[1] / sum(e), abs=1e-6)  # float32 similarities
    assert list(retrieval_weights(sims, k=9, temperature=1.0)) == [1, 3, 0, 2]  # k beyond the tasks: all of them
    even = retrieval_weights(sims, k=4, temperature=1e6)  # a large temperature: an even mean
    assert all(w == pytest.approx(0.25, abs=1e-6) for w in even.values()) and sum(even.values()) == pytest.approx(1.0)


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


def test_one_training_task_gets_a_unit_condition_scale():
    from icmlora.cvae import Generator

    mean, scale = Generator.standardization(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.equal(mean, torch.tensor([1.0, 2.0, 3.0])) and torch.equal(scale, torch.ones(3))
