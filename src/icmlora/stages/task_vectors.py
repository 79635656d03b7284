"""Stage `task_vectors`: one vector per task from the model's own hidden states.

    python -m icmlora.stages.task_vectors       # or: icmlora task_vectors

Methods (``task_vectors.method`` picks the one written for the generator; all are computed
and compared in metrics/task_vectors.json; ``icmlora.florence.hidden_states`` computes them):
- ``icl`` (default): the *base* model reads k labelled examples of the task; the last decoder
  layer's hidden states are pooled per example and averaged (``task_vectors.pooling``).
  ``match`` (default): the state where the base, describing the example image itself, names the
  object that overlaps the labelled box. ``last`` / ``mean`` / ``label``: states over the
  teacher-forced target text; the base has never read a task name, so those states say little
  about the task (silhouettes near 0, see README). Needs no trained LoRA, so it works for a
  task never trained.
- ``reference``: the paper's code: the task's trained adapter generates on training images
  and the last decoder layer's state at the last position is averaged.
- ``text``: the base model's text encoder on a short task description.

Writes data/task_vectors.{safetensors,json} (``icmlora.artifacts.task_vectors``),
metrics/task_vectors.json (silhouette of per-example vectors grouped by task, per method and
pooling) and metrics/plots/task_vectors/<method>.png (2-D PCA projection).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from icmlora.artifacts import (
    BASE_MODEL_DIR,
    LORA_DIR,
    PREPARED_DIR,
    TASK_VECTOR_METRICS,
    TASK_VECTOR_PLOTS,
    TASK_VECTORS_FILE,
    TASK_VECTORS_INFO,
    final_adapter_dir,
    timing_file,
)
from icmlora.artifacts.annotations import read_split
from icmlora.artifacts.base_model import read_base_model
from icmlora.artifacts.task_vectors import write_task_vectors
from icmlora.config import Params
from icmlora.errors import InputError
from icmlora.files import atomic_dir, atomic_path, write_json
from icmlora.florence.hidden_states import POOLINGS, icl_vectors, reference_vectors, text_vector
from icmlora.images import load_images
from icmlora.runtime import scoring_device
from icmlora.stage_cli import run_stage, stage_parser


def _examples(prepared: Path, task: str, count: int):
    examples, folder = read_split(task, "train", prepared)
    examples = examples[:count]
    return examples, load_images([folder / e.image for e in examples])


def silhouette(vectors: dict[str, torch.Tensor]) -> float:
    from sklearn.metrics import silhouette_score

    x = torch.cat(list(vectors.values())).numpy()
    y = [i for i, v in enumerate(vectors.values()) for _ in range(len(v))]
    if len(set(y)) < 2 or len(x) <= len(set(y)):
        return 0.0
    return float(silhouette_score(x, y, metric="cosine"))


def attribute_probe(vectors: dict[str, torch.Tensor], cfg: Params) -> dict[str, dict[str, float]]:
    """How well a grid task's per-example vectors tell each attribute of their task apart (``hue``
    and ``row`` in a family, ``category`` and ``row`` for category_row): the 4-fold cross-validated
    accuracy of a linear probe (logistic regression on standardized vectors), beside chance (the
    largest class's share). A silhouette grouped by one attribute would mix in the spread of the other."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x = torch.cat(list(vectors.values())).double().numpy()
    x = (x - x.mean(0)) / np.clip(x.std(0), 1e-8, None)
    attrs = [cfg.task_attributes(t) for t, v in vectors.items() for _ in range(len(v))]
    out = {}
    for attribute in attrs[0]:
        y = np.array([a[attribute] for a in attrs])
        folds = StratifiedKFold(4, shuffle=True, random_state=0)
        accuracy = cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=folds).mean()
        out[attribute] = {"probe_accuracy": round(float(accuracy), 4),
                          "chance": round(float(max(np.mean(y == v) for v in set(y))), 4)}
    return out


def plot_projection(vectors: dict[str, torch.Tensor], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.cat(list(vectors.values())).double()
    x = x - x.mean(0)
    # An exact SVD: torch.pca_lowrank is randomized, and the plot is a DVC output.
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ vh[:2].T).float().numpy()
    fig, ax = plt.subplots(figsize=(5, 4))
    start = 0
    for task, vec in vectors.items():
        ax.scatter(xy[start : start + len(vec), 0], xy[start : start + len(vec), 1], s=12, label=task)
        start += len(vec)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def compute_task_vectors(cfg: Params, prepared: Path = PREPARED_DIR, base_dir: Path = BASE_MODEL_DIR,
                         lora_root: Path = LORA_DIR, out_file: Path = TASK_VECTORS_FILE,
                         info_file: Path = TASK_VECTORS_INFO, metrics_file: Path = TASK_VECTOR_METRICS,
                         plots_dir: Path = TASK_VECTOR_PLOTS, timing: Path = timing_file("task_vectors")) -> dict:
    from peft import PeftModel

    tv = cfg.task_vectors
    start = time.perf_counter()
    model, processor = read_base_model(base_dir)
    model = model.to(scoring_device()).eval()  # a GPU when there is one
    per_example: dict[str, dict[str, torch.Tensor]] = {f"icl_{p}": {} for p in POOLINGS}
    per_example.update(reference={}, text={})
    matched: dict[str, float] = {}
    for task in tqdm(cfg.data.tasks, desc="task_vectors", unit="task"):
        icl = icl_vectors(model, processor, *_examples(prepared, task, tv.examples), cfg.predict.max_new_tokens)
        for pooling in POOLINGS:
            per_example[f"icl_{pooling}"][task] = icl[pooling]
        matched[task] = round(float(icl["matched"]), 4)
        per_example["text"][task] = text_vector(model, processor, task)
        adapter = final_adapter_dir(task, tv.reference_rank, cfg.lora.seeds[0], lora_root)
        if tv.method == "reference" and not adapter.is_dir():
            raise InputError(f"{adapter}: task_vectors.method 'reference' needs the trained adapter of every task "
                             f"(run `dvc repro train_lora` first, or use method icl)")
        if ("reference" in tv.compare or tv.method == "reference") and adapter.is_dir():
            tuned = PeftModel.from_pretrained(model, adapter)
            per_example["reference"][task] = reference_vectors(
                tuned, processor, *_examples(prepared, task, tv.reference_examples), cfg.predict.max_new_tokens)
            model = tuned.unload()
    metrics: dict = {"method": tv.method, "pooling": tv.pooling, "examples": tv.examples, "silhouette": {},
                     "match_fraction": matched}
    with atomic_dir(plots_dir) as tmp:  # the folder is replaced whole: no plot of a method no longer computed
        for name, vecs in per_example.items():
            if len(vecs) == len(cfg.data.tasks):
                metrics["silhouette"][name] = round(silhouette(vecs), 4)
                plot_projection(vecs, f"{name}: silhouette {metrics['silhouette'][name]:.2f}", tmp / f"{name}.png")
    if cfg.task_attributes(cfg.data.tasks[0]):
        # Does the base tell apart what the grid's tasks select by? Each attribute of the task
        # read off the same per-example vectors by a linear probe.
        metrics["attribute_probe"] = {name: attribute_probe(vecs, cfg) for name, vecs in per_example.items()
                                      if len(vecs) == len(cfg.data.tasks)}
    chosen_name = f"icl_{tv.pooling}" if tv.method == "icl" else tv.method
    vectors = torch.stack([per_example[chosen_name][t].mean(0) for t in cfg.data.tasks])
    metrics["default_silhouette"] = metrics["silhouette"].get(chosen_name)

    complete = {name: torch.cat([v[t] for t in cfg.data.tasks]) for name, v in per_example.items()
                if len(v) == len(cfg.data.tasks)}
    write_task_vectors(list(cfg.data.tasks), vectors, complete, {"method": tv.method, "pooling": tv.pooling},
                       out_file, info_file)
    write_json(metrics_file, metrics)
    write_json(timing, {"seconds": round(time.perf_counter() - start, 2)})
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("task_vectors", __doc__)
    args, cfg = parser.parse(argv)
    m = compute_task_vectors(cfg)
    sil = ", ".join(f"{k} {v:.2f}" for k, v in m["silhouette"].items())
    print(f"task_vectors: wrote {TASK_VECTORS_FILE} ({len(cfg.data.tasks)} tasks, method {m['method']}/{m['pooling']}; "
          f"silhouette {sil}) and {TASK_VECTOR_METRICS}")
    return m


if __name__ == "__main__":
    run_stage(main)
