"""Stage task_vectors (``icmlora.stages.task_vectors``) on the micro setting: every method's per-example
vectors, the task vector as their mean, the metrics (silhouettes, match fraction, attribute probe),
the projection plots and the reference method's adapters; each figure checked against its written
definition, computed again here from the stage's own outputs."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from icmlora.artifacts import final_adapter_dir
from icmlora.artifacts.task_vectors import read_task_vectors
from icmlora.errors import InputError
from icmlora.florence.hidden_states import TEXT_TEMPLATES
from icmlora.stages.task_vectors import attribute_probe, compute_task_vectors, main, plot_projection, silhouette
from params_helpers import default_params, params_dict

ICL = {"icl_last", "icl_mean", "icl_label", "icl_match", "icl_object"}


def _run(cfg, root, out, lora=None):
    return compute_task_vectors(cfg, root / "prepared", root / "base", lora or root / "lora", out / "tv.safetensors",
                                out / "tv.json", out / "tv-metrics.json", out / "plots", out / "timing.json")


def _per_task(examples: torch.Tensor, tasks: list[str]) -> dict[str, torch.Tensor]:
    """A method's examples tensor back into {task: its rows} (every task has as many)."""
    return dict(zip(tasks, examples.chunk(len(tasks))))


def _with(cfg, **task_vectors):
    return cfg.model_copy(update={"task_vectors": cfg.task_vectors.model_copy(update=task_vectors)})


def test_task_vectors_are_their_examples_mean_and_the_metrics_are_computed_from_them(setting, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from icmlora.artifacts.base_model import read_base_model
    from icmlora.config import Params
    from icmlora.florence.hidden_states import text_vector

    cfg, root, _ = setting
    # Each task its own attribute value, as a grid task's (micro's tasks are categories, which have none):
    # the stage probes it on every method's examples.
    monkeypatch.setattr(Params, "task_attributes", lambda self, task: {"shape": task})
    titles = []
    real_title = Axes.set_title
    monkeypatch.setattr(Axes, "set_title", lambda self, t, **kw: titles.append(t) or real_title(self, t, **kw))
    metrics = _run(cfg, root, tmp_path)
    tasks, k = cfg.data.tasks, cfg.task_vectors.examples
    # No trained adapters in the setting: the reference method is listed in compare but not computed.
    assert set(metrics["silhouette"]) == ICL | {"text"}
    ex = load_file(str(tmp_path / "tv.safetensors"))
    assert set(ex) == {"vectors"} | {f"{name}_examples" for name in ICL | {"text"}}
    for name in ICL:
        assert ex[f"{name}_examples"].shape == (len(tasks) * k, cfg.base.tiny.d_model)
    assert ex["text_examples"].shape == (len(tasks) * len(TEXT_TEMPLATES), cfg.base.tiny.d_model)
    for name in ICL | {"text"}:
        assert metrics["silhouette"][name] == round(silhouette(_per_task(ex[f"{name}_examples"], tasks)), 4), name
    assert sorted(titles) == sorted(f"{name}: silhouette {metrics['silhouette'][name]:.2f}" for name in ICL | {"text"})
    assert metrics["attribute_probe"] == {name: attribute_probe(_per_task(ex[f"{name}_examples"], tasks), cfg)
                                          for name in ICL | {"text"}}
    base, processor = read_base_model(root / "base")
    text = _per_task(ex["text_examples"], tasks)
    assert all(torch.allclose(text[t], text_vector(base.eval(), processor, t), atol=1e-6) for t in tasks)
    chosen = _per_task(ex["icl_match_examples"], tasks)  # method icl, pooling match
    vectors = read_task_vectors(tmp_path / "tv.safetensors")
    assert list(vectors) == tasks
    for task in tasks:
        assert torch.allclose(vectors[task], chosen[task].mean(0), atol=1e-7), task
    assert metrics["default_silhouette"] == metrics["silhouette"]["icl_match"]
    # The untrained tiny base writes no box that parses: not one labelled box of any task is matched.
    assert metrics["match_fraction"] == {task: 0.0 for task in tasks}
    assert {k: metrics[k] for k in ("method", "pooling", "examples")} == {"method": "icl", "pooling": "match", "examples": k}
    assert json.loads((tmp_path / "tv-metrics.json").read_text()) == metrics
    info = json.loads((tmp_path / "tv.json").read_text())
    assert info == {"tasks": tasks, "method": "icl", "pooling": "match", "dim": cfg.base.tiny.d_model}
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert set(timing) == {"seconds"} and 0 < timing["seconds"] < 600
    plots = tmp_path / "plots"
    assert sorted(p.name for p in plots.iterdir()) == sorted(f"{name}.png" for name in ICL | {"text"})
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000 for p in plots.iterdir())

    # Another pooling: the task vector is that pooling's mean.
    again = _run(_with(cfg, pooling="mean"), root, tmp_path / "mean")
    assert again["default_silhouette"] == again["silhouette"]["icl_mean"] and again["pooling"] == "mean"
    mean = _per_task(load_file(str(tmp_path / "mean" / "tv.safetensors"))["icl_mean_examples"], tasks)
    vectors = read_task_vectors(tmp_path / "mean" / "tv.safetensors")
    assert all(torch.allclose(vectors[t], mean[t].mean(0), atol=1e-7) for t in tasks)


def test_the_reference_method_reads_each_tasks_trained_adapter_and_is_computed_only_when_asked(setting, final_adapters,
                                                                                              tmp_path):
    cfg, root, _ = setting
    lora = final_adapters(tmp_path / "lora", [cfg.task_vectors.reference_rank])
    tasks = cfg.data.tasks
    metrics = _run(_with(cfg, method="reference"), root, tmp_path / "ref", lora)
    assert set(metrics["silhouette"]) == ICL | {"text", "reference"} and metrics["method"] == "reference"
    ex = load_file(str(tmp_path / "ref" / "tv.safetensors"))
    reference = _per_task(ex["reference_examples"], tasks)
    assert ex["reference_examples"].shape[0] == len(tasks) * cfg.task_vectors.reference_examples
    vectors = read_task_vectors(tmp_path / "ref" / "tv.safetensors")
    assert all(torch.allclose(vectors[t], reference[t].mean(0), atol=1e-7) for t in tasks)
    assert metrics["default_silhouette"] == metrics["silhouette"]["reference"]
    # An adapter of another task reads other states: each task's own adapter was read.
    assert not torch.allclose(reference[tasks[0]], reference[tasks[1]])
    # The base was given back after each adapter: the icl vectors are the base's, as without adapters.
    plain = _run(cfg, root, tmp_path / "plain")
    assert torch.equal(ex["icl_match_examples"], load_file(str(tmp_path / "plain" / "tv.safetensors"))["icl_match_examples"])
    assert plain["silhouette"] == {k: v for k, v in metrics["silhouette"].items() if k != "reference"}
    # Listed in compare, the method icl: computed beside the icl vectors, which stay the task vectors.
    listed = _run(cfg, root, tmp_path / "listed", lora)
    assert set(listed["silhouette"]) == ICL | {"text", "reference"} and listed["method"] == "icl"
    assert torch.equal(load_file(str(tmp_path / "listed" / "tv.safetensors"))["reference_examples"], ex["reference_examples"])
    assert listed["default_silhouette"] == listed["silhouette"]["icl_match"]
    # Not listed in compare and not the method: not computed, adapters or not.
    without = _run(_with(cfg, compare=["icl", "text"]), root, tmp_path / "without", lora)
    assert set(without["silhouette"]) == ICL | {"text"}


def test_the_reference_method_without_a_tasks_adapter_names_it_and_the_stage_to_run(setting, final_adapters, tmp_path):
    cfg, root, _ = setting
    lora = final_adapters(tmp_path / "lora", [cfg.task_vectors.reference_rank], missing=("square",))
    adapter = final_adapter_dir("square", cfg.task_vectors.reference_rank, 0, lora)
    with pytest.raises(InputError, match=rf"^{adapter}: task_vectors.method 'reference' needs the trained adapter of every "
                                         r"task \(run `dvc repro train_lora` first, or use method icl\)$"):
        _run(_with(cfg, method="reference"), root, tmp_path / "out", lora)
    assert not (tmp_path / "out" / "tv.safetensors").exists()


def test_task_vectors_main_writes_the_data_contracts_files_and_says_what(setting, tmp_path, capsys):
    cfg, root, _ = setting
    for name, target in (("data/prepared", "prepared"), ("models/base", "base"), ("models/lora", "lora")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(root / target)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict()))
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert shown.startswith("usage: icmlora task_vectors [-h] [--params PARAMS]")
    assert "Stage `task_vectors`: one vector per task from the model's own hidden states." in shown
    metrics = main(["--params", str(tmp_path / "params.yaml")])
    assert (tmp_path / "data" / "task_vectors.safetensors").is_file() and (tmp_path / "metrics" / "task_vectors.json").is_file()
    sil = ", ".join(f"{k} {v:.2f}" for k, v in metrics["silhouette"].items())
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"task_vectors: wrote data/task_vectors.safetensors (3 tasks, method icl/match; silhouette {sil}) and "
        "metrics/task_vectors.json")


def test_silhouette_groups_each_tasks_examples_and_is_zero_where_it_is_undefined():
    from sklearn.metrics import silhouette_score

    g = torch.Generator().manual_seed(0)
    vectors = {"a": torch.randn(3, 4, generator=g) + torch.tensor([5.0, 0, 0, 0]),
               "b": torch.randn(4, 4, generator=g) + torch.tensor([0, 5.0, 0, 0]),
               "c": torch.randn(2, 4, generator=g)}
    labels = [0, 0, 0, 1, 1, 1, 1, 2, 2]
    expected = silhouette_score(torch.cat(list(vectors.values())).numpy(), labels, metric="cosine")
    assert silhouette(vectors) == pytest.approx(float(expected), abs=1e-12) and expected > 0.3
    two = {"a": vectors["a"], "b": vectors["b"]}
    expected = silhouette_score(torch.cat([vectors["a"], vectors["b"]]).numpy(), labels[:7], metric="cosine")
    assert silhouette(two) == pytest.approx(float(expected), abs=1e-12) and expected > 0.3  # two tasks are enough
    assert silhouette({"a": vectors["a"]}) == 0.0  # one task: nothing to tell apart
    assert silhouette({"a": vectors["a"][:1], "b": vectors["b"][:1]}) == 0.0  # one example each: undefined


def test_the_attribute_probe_reads_each_attribute_from_standardized_vectors():
    """Default tasks (category x row). Dimension 0 says the category, 1 the row, both on a tiny scale;
    dimension 2 is loud noise. Standardized, a linear probe reads both perfectly; chance is a third."""
    cfg = default_params()
    g = torch.Generator().manual_seed(0)
    categories, rows = sorted({cfg.task_attributes(t)["category"] for t in cfg.data.tasks}), ["top", "middle", "bottom"]
    vectors = {}
    for task in cfg.data.tasks:
        a = cfg.task_attributes(task)
        signal = torch.tensor([categories.index(a["category"]), rows.index(a["row"]), 0.0, 0.0]) * 1e-4
        vectors[task] = signal + torch.randn(8, 4, generator=g) * torch.tensor([1e-6, 1e-6, 1e4, 0.0])  # 3: constant
    probe = attribute_probe(vectors, cfg)
    assert probe == {"category": {"probe_accuracy": 1.0, "chance": 0.3333}, "row": {"probe_accuracy": 1.0, "chance": 0.3333}}
    # Without the tiny signal: near chance, and exactly the 4-fold shuffled (seed 0) cross-validation's mean.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    noise = {t: torch.randn(8, 3, generator=g) for t in cfg.data.tasks}
    x = torch.cat(list(noise.values())).double().numpy()
    x = (x - x.mean(0)) / x.std(0)
    for attribute, got in attribute_probe(noise, cfg).items():
        y = np.array([cfg.task_attributes(t)[attribute] for t in noise for _ in range(8)])
        expected = cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=StratifiedKFold(4, shuffle=True, random_state=0))
        assert got["probe_accuracy"] == round(float(expected.mean()), 4) < 0.6, attribute


def test_the_projection_plots_each_tasks_examples_on_the_top_two_principal_axes(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    drawn, titles = [], []
    real_scatter, real_title = Axes.scatter, Axes.set_title
    monkeypatch.setattr(Axes, "scatter", lambda self, x, y, **kw: drawn.append((np.asarray(x), np.asarray(y), kw["label"]))
                        or real_scatter(self, x, y, **kw))
    monkeypatch.setattr(Axes, "set_title", lambda self, t, **kw: titles.append(t) or real_title(self, t, **kw))
    g = torch.Generator().manual_seed(1)
    vectors = {"a": torch.randn(3, 5, generator=g) * 4 + 2, "b": torch.randn(2, 5, generator=g) + 7,
               "c": torch.randn(4, 5, generator=g) - 3}
    plot_projection(vectors, "a title", tmp_path / "sub" / "dir" / "p.png")
    assert [label for _, _, label in drawn] == ["a", "b", "c"] and [len(x) for x, _, _ in drawn] == [3, 2, 4]
    png = (tmp_path / "sub" / "dir" / "p.png").read_bytes()
    assert titles == ["a title"] and png[:4] == b"\x89PNG"
    assert int.from_bytes(png[16:20], "big") == 500 and int.from_bytes(png[20:24], "big") == 400  # 5 x 4 in at 100 dpi
    got = np.concatenate([np.stack([x, y], 1) for x, y, _ in drawn])
    x = torch.cat(list(vectors.values())).double().numpy()
    centered = x - x.mean(0)
    _, _, vh = np.linalg.svd(centered, full_matrices=False)
    expected = centered @ vh[:2].T
    assert np.allclose(np.abs(got), np.abs(expected), atol=1e-5)  # an axis's sign is arbitrary
