"""Stage `evaluate`: generated adapters against trained ones and simple baselines.

    python -m icmlora evaluate

For every task and rank, on the task's valid split (strict: the label must match), the
detection metrics of: ``base`` (no adapter), ``trained`` (the final trained adapter),
``generated`` (every sample, ``z0`` included), and the baselines ``avg_checkpoint`` (mean of
the task's checkpoints), ``noise`` (the training checkpoint nearest to the generated z0
adapter, plus Gaussian noise at the same distance), ``wrong_task`` (generated with the next
task's vector), ``random_condition`` (a random vector with the task vectors' mean norm); for
held-out tasks also ``nearest_task`` (the trained adapter of the training task whose vector is
nearest). Each generated adapter gets its parameter-space novelty: distance to the nearest
training checkpoint over the median nearest-neighbour distance among that task's checkpoints,
and the cosine similarity to it.

Writes metrics/comparison.csv (one row per task x rank x source x sample),
metrics/cross_task.csv (generated adapter of task i on task j, for evaluate.cross_task_ranks)
and metrics/evaluate.json (storage and timing). One MLflow run per evaluated adapter, tagged
task, rank, source, sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from icmlora.config import Config, load_config
from icmlora.cvae.generate import GENERATED_DIR, Z0, row_stats
from icmlora.cvae.train import CVAE_DIR, WEIGHTS_FILE, Generator
from icmlora.data.florence_format import ANNOTATIONS_FILE, read_annotations
from icmlora.data.prepare import PREPARED_DIR, task_dir
from icmlora.detection import predict
from icmlora.evaluation.metrics import detection_metrics
from icmlora.files import atomic_path, write_json
from icmlora.florence import load_base, load_images
from icmlora.lora.adapters import WEIGHTS_FILE as ADAPTER_WEIGHTS
from icmlora.lora.adapters import flatten, read_adapter, unflatten
from icmlora.lora.train import BASE_DIR, LORA_DIR, adapter_name, peft_config
from icmlora.params import PARAMS_DIR, load_params
from icmlora.task_vectors import OUT_FILE as TASK_VECTORS_FILE
from icmlora.task_vectors import load_task_vectors
from icmlora.tracking import base_tags

COMPARISON_FILE = Path("metrics/comparison.csv")
CROSS_FILE = Path("metrics/cross_task.csv")
EVALUATE_FILE = Path("metrics/evaluate.json")
METRIC_KEYS = ("map50_95", "map50", "map75", "precision", "recall", "f1")


class Evaluator:
    """Scores adapter weights on a task's valid split, loading images once per task."""

    def __init__(self, model, processor, prepared: Path, cfg: Config):
        self.model, self.processor, self.prepared, self.cfg = model, processor, prepared, cfg
        self.eval_cfg = dataclasses.replace(cfg.eval, max_images=0)
        self._data: dict[str, tuple] = {}

    def data(self, task: str):
        if task not in self._data:
            path = task_dir(self.prepared, task, "valid") / ANNOTATIONS_FILE
            examples = read_annotations(path, check_images=False)
            if self.cfg.evaluate.max_images:
                examples = examples[: self.cfg.evaluate.max_images]
            self._data[task] = (examples, load_images([path.parent / e.image for e in examples]))
        return self._data[task]

    def score(self, task: str, weights: dict[str, torch.Tensor] | None) -> dict[str, float]:
        from peft import set_peft_model_state_dict

        examples, images = self.data(task)
        if weights is None:
            with self.model.disable_adapter():
                preds = predict(self.model, self.processor, images, self.eval_cfg, desc=f"base on {task}")
        else:
            set_peft_model_state_dict(self.model, weights)
            preds = predict(self.model, self.processor, images, self.eval_cfg, desc=f"adapter on {task}")
        m = detection_metrics([e.boxes for e in examples], preds, [(e.width, e.height) for e in examples])
        return {k: m[k] for k in (*METRIC_KEYS, "num_pred")}


def _novelty(vec: torch.Tensor, train_rows: torch.Tensor, own_rows: torch.Tensor) -> dict[str, float]:
    """Distance to the nearest training checkpoint / median NN distance among the task's checkpoints."""
    dists = torch.cdist(vec[None], train_rows)[0]
    nearest = int(dists.argmin())
    own = torch.cdist(own_rows, own_rows)
    own.fill_diagonal_(float("inf"))
    median_nn = own.min(1).values.median().item() if len(own_rows) > 1 else float("nan")
    cos = torch.nn.functional.cosine_similarity(vec, train_rows[nearest], dim=0).item()
    return {"nn_distance": dists[nearest].item(), "novelty_ratio": dists[nearest].item() / max(median_nn, 1e-12),
            "nn_cosine": cos, "nearest_index": nearest}


def evaluate(cfg: Config, prepared: Path = PREPARED_DIR, base_dir: Path = BASE_DIR, lora_dir: Path = LORA_DIR,
             params_dir: Path = PARAMS_DIR, cvae_dir: Path = CVAE_DIR, generated_dir: Path = GENERATED_DIR,
             vectors_file: Path = TASK_VECTORS_FILE, out_csv: Path = COMPARISON_FILE, cross_csv: Path = CROSS_FILE,
             out_json: Path = EVALUATE_FILE) -> pd.DataFrame:
    from peft import get_peft_model

    seed0 = cfg.lora.seeds[0]
    base, processor = load_base(base_dir)
    vectors = load_task_vectors(vectors_file)
    tasks, holdout = cfg.data.tasks, set(cfg.generator.holdout)
    rows: list[dict] = []
    cross: list[dict] = []
    storage: dict = {}
    g = torch.Generator().manual_seed(cfg.seed + cfg.evaluate.noise_seed)
    mean_norm = torch.stack([vectors[t] for t in tasks]).norm(dim=1).mean()
    start = time.perf_counter()
    base_scores: dict[str, dict] = {}
    for rank in cfg.lora.ranks:
        model = get_peft_model(base, peft_config(cfg.lora, rank)).eval()
        ev = Evaluator(model, processor, prepared, cfg)
        if not base_scores:
            base_scores = {t: ev.score(t, None) for t in tasks}
        tensors, manifest = load_params(rank, params_dir)
        gen = Generator.load(cvae_dir / f"r{rank}")
        train_mask = torch.tensor([tasks[int(i)] not in holdout for i in tensors["task_index"]])

        def raw(index: int) -> torch.Tensor:
            stats = ((tensors["row_mean"][index], tensors["row_std"][index]) if "row_mean" in tensors else None)
            return manifest.denormalize(tensors["params"][index], stats)

        raw_rows = torch.stack([raw(i) for i in range(len(tensors["params"]))])
        train_rows = raw_rows[train_mask]
        train_index = train_mask.nonzero()[:, 0]

        def as_weights(vec: torch.Tensor) -> dict[str, torch.Tensor]:
            return unflatten(vec, manifest.names, manifest.shapes)

        def add(task: str, source: str, sample: str, scores: dict, **extra) -> None:
            rows.append({"task": task, "rank": rank, "source": source, "sample": sample,
                         "heldout": task in holdout, **scores, **extra})

        for ti, task in enumerate(tqdm(tasks, desc=f"evaluate r{rank}", unit="task")):
            add(task, "base", "-", base_scores[task])
            trained_w, _ = read_adapter(lora_dir / adapter_name(task, rank, seed0) / "final")
            add(task, "trained", "-", ev.score(task, trained_w))
            own = raw_rows[tensors["task_index"] == ti]
            add(task, "avg_checkpoint", "-", ev.score(task, as_weights(own.mean(0))))
            gen_folder = generated_dir / f"{task}-r{rank}"
            for folder in sorted(gen_folder.glob("sample-*")):
                weights, _ = read_adapter(folder)
                vec = flatten(weights, manifest.names)
                nov = _novelty(vec, train_rows, own)
                add(task, "generated", folder.name.removeprefix("sample-"), ev.score(task, weights),
                    **{k: v for k, v in nov.items() if k != "nearest_index"})
                if folder.name == f"sample-{Z0}":
                    z0_vec, z0_nov = vec, nov
            # Baselines around the z0 sample.
            nearest = train_rows[z0_nov["nearest_index"]]
            noise = torch.randn(nearest.shape, generator=g)
            noisy = nearest + noise / noise.norm() * z0_nov["nn_distance"]
            add(task, "noise", "-", ev.score(task, as_weights(noisy)),
                nearest_task=tasks[int(tensors["task_index"][train_index[z0_nov["nearest_index"]]])])
            stats = row_stats(manifest, tensors, task)
            z = torch.zeros(1, gen.model.config.latent_dim)
            other = tasks[(ti + 1) % len(tasks)]
            wrong = manifest.denormalize(gen.sample(vectors[other], z)[0], stats)
            add(task, "wrong_task", other, ev.score(task, as_weights(wrong)))
            rnd = torch.randn(vectors[task].shape, generator=g)
            rnd = rnd / rnd.norm() * mean_norm
            add(task, "random_condition", "-", ev.score(task, as_weights(manifest.denormalize(gen.sample(rnd, z)[0], stats))))
            if task in holdout:
                train_tasks = [t for t in tasks if t not in holdout]
                sims = torch.stack([torch.nn.functional.cosine_similarity(vectors[task], vectors[t], dim=0) for t in train_tasks])
                near = train_tasks[int(sims.argmax())]
                near_w, _ = read_adapter(lora_dir / adapter_name(near, rank, seed0) / "final")
                add(task, "nearest_task", near, ev.score(task, near_w))
            if rank in cfg.evaluate.cross_task_ranks:
                z0_w = as_weights(z0_vec)
                for other in tasks:
                    if other != task:
                        cross.append({"rank": rank, "adapter_task": task, "eval_task": other,
                                      "map50": ev.score(other, z0_w)["map50"]})
        cvae_bytes = (cvae_dir / f"r{rank}" / WEIGHTS_FILE).stat().st_size
        ckpt_bytes = sum((lora_dir / adapter_name(t, rank, s) / "checkpoints").joinpath(p.name, ADAPTER_WEIGHTS).stat().st_size
                         for t in tasks if t not in holdout for s in cfg.lora.seeds
                         for p in (lora_dir / adapter_name(t, rank, s) / "checkpoints").glob("step-*"))
        final_bytes = sum((lora_dir / adapter_name(t, rank, seed0) / "final" / ADAPTER_WEIGHTS).stat().st_size for t in tasks)
        storage[str(rank)] = {"generator_bytes": cvae_bytes, "checkpoint_bytes": ckpt_bytes, "final_adapter_bytes": final_bytes}
        base = model.unload()
    frame = pd.DataFrame(rows)
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(cross_csv) as tmp:
        pd.DataFrame(cross, columns=["rank", "adapter_task", "eval_task", "map50"]).to_csv(tmp, index=False, float_format="%.6g")
    write_json(out_json, {"storage": storage, "evaluations": len(rows) + len(cross),
                          "seconds": round(time.perf_counter() - start, 2)})
    _log_runs(frame)
    return frame


def _log_runs(frame: pd.DataFrame) -> None:
    """One MLflow run per evaluated adapter, so the compare view puts sources side by side."""
    from mlflow.entities import Metric, Param, RunTag

    import mlflow

    from icmlora.tracking import experiment_id

    exp_id = experiment_id()
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    for r in tqdm(frame.to_dict("records"), desc="evaluate: MLflow runs", unit="run", leave=False):
        tags = base_tags("evaluate", task=r["task"], rank=r["rank"], source=r["source"], sample=r["sample"],
                         heldout=r["heldout"])
        run = client.create_run(exp_id, run_name=f"{r['task']}-r{r['rank']}-{r['source']}-{r['sample']}")
        metrics = [Metric(k, float(r[k]), now, 0) for k in (*METRIC_KEYS, "novelty_ratio", "nn_cosine")
                   if k in r and pd.notna(r[k])]
        client.log_batch(run.info.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()],
                         params=[Param("task", r["task"]), Param("rank", str(r["rank"])), Param("source", r["source"])])
        client.set_terminated(run.info.run_id)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="icmlora evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    frame = evaluate(cfg)
    print(f"evaluate: wrote {COMPARISON_FILE} ({len(frame)} rows: {frame['source'].nunique()} sources x "
          f"{len(cfg.data.tasks)} tasks x {len(cfg.lora.ranks)} ranks), {CROSS_FILE} and {EVALUATE_FILE}")
    return frame

