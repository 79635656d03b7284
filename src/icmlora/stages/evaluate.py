"""Stage `evaluate`: generated adapters against trained ones and simple baselines.

    python -m icmlora.stages.evaluate       # or: icmlora evaluate

For every task and rank, on the task's valid split (strict: the label must match), the
detection metrics (``icmlora.scoring``) of: ``base`` (no adapter), ``trained`` (the final
trained adapter), ``generated`` (every sample, ``z0`` included), and the baselines
``avg_checkpoint`` (mean of the task's checkpoints), ``noise`` (the training checkpoint nearest
to the generated z0 adapter, plus Gaussian noise at the same distance), ``wrong_task``
(generated with the next task's vector), ``random_condition`` (a random vector with the task
vectors' mean norm); for held-out tasks also what a task never trained could get without a
generator: ``nearest_task`` (the trained adapter of the training task whose vector is nearest),
``retrieval_mix`` (the similarity-weighted mean of the ``evaluate.retrieval_k`` nearest training
tasks' trained adapters, ``retrieval_weights``), ``mean_training`` (the mean of every training
task's trained adapter) and ``ridge`` (``icmlora.generators.ridge``: a linear map from the task
vector to the adapter, fitted in closed form on the training tasks' rows, its regularization
chosen by leaving one training task out at a time). Two more held-out baselines: ``few_shot_lora``
(stage ``few_shot``: a LoRA trained on the task's k support examples alone, the ones its task vector
reads: what a user with those examples would do instead) and ``oracle_single``, the upper bound of any
retrieval: the training task's trained adapter that scores best on the task's valid split, picked with
hindsight (its sample names it). A held-out task's own ``trained`` adapter is its upper bound: trained for
evaluation only, it never reaches the generator's data or the normalization statistics. Each generated adapter gets its parameter-space
novelty: distance to the nearest training checkpoint over the median nearest-neighbour distance
among that task's checkpoints, and the cosine similarity to it. A held-out task's generated samples are
also scored on its k support examples (the ones its task vector reads; ``support_map50``), and the best
of them is marked ``best_of_n``: what ``generate --select`` would keep. bootstrap.csv's ``best_of_n - z0``
rows compare it with the z = 0 sample, per held-out task and pooled.

Each generated adapter also gets its function-space novelty (``icmlora.comparison``): the IoU
of its errors with those of its nearest training checkpoint (``error_iou``), beside the same
between two checkpoints of the task itself (``error_iou_checkpoints``). Every comparison of
generated against another source gets a paired bootstrap over the valid images.

Writes metrics/comparison.csv (one row per task x rank x source x sample), metrics/bootstrap.csv
(difference, interval and verdict per rank, task and comparison; pooled rows), metrics/cross_task.csv
(generated z0 adapter of task i on task j, for ``evaluate.cross_task_ranks``), metrics/evaluate.json
(storage; the ridge map's regularization and its leave-one-task-out scores per rank) and
metrics/timing/evaluate.json (with, per held-out task, the seconds a user pays for a generated adapter:
the task vector from its k examples, and sampling). One MLflow run per evaluated adapter, tagged task,
rank, source, sample, with the params evaluate reads.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from icmlora.artifacts import (
    BASE_MODEL_DIR,
    BOOTSTRAP_TABLE,
    COMPARISON_TABLE,
    CROSS_TASK_TABLE,
    CVAE_DIR,
    EVALUATE_METRICS,
    FEW_SHOT_DIR,
    FEW_SHOT_METRICS,
    GENERATED_DIR,
    LORA_DIR,
    LORA_MATRIX_DIR,
    PREPARED_DIR,
    TASK_VECTORS_FILE,
    Z0_SAMPLE,
    few_shot_dir,
    final_adapter_dir,
    generated_dir,
    samples,
    timing_file,
)
from icmlora.artifacts.adapters import adapter_bytes, read_adapter, trajectory
from icmlora.artifacts.annotations import read_split
from icmlora.artifacts.base_model import read_base_model
from icmlora.artifacts.generators import generator_bytes, read_generator
from icmlora.artifacts.lora_matrix import flatten, read_lora_matrix, unflatten
from icmlora.artifacts.task_vectors import read_task_vectors
from icmlora.comparison import AP50Table, ap50_table, best_of_n_rows, bootstrap_counts, error_overlap, paired_bootstrap
from icmlora.config import Params
from icmlora.errors import InputError
from icmlora.few_shot import map50, support_examples
from icmlora.files import atomic_path, read_json, write_json
from icmlora.florence.hidden_states import icl_vectors
from icmlora.generators.ridge import fit_training_tasks
from icmlora.images import load_images
from icmlora.lora import peft_config
from icmlora.scoring import Scorer
from icmlora.stage_cli import run_stage, stage_parser
from icmlora.tracking import MLFLOW_PARAM_LIMIT, base_tags, stage_params

METRIC_KEYS = ("map50_95", "map50", "map75", "precision", "recall", "f1")


def novelty(vec: torch.Tensor, train_rows: torch.Tensor, own_rows: torch.Tensor) -> dict[str, float]:
    """Distance to the nearest training checkpoint / median NN distance among the task's checkpoints."""
    dists = torch.cdist(vec[None], train_rows)[0]
    nearest = int(dists.argmin())
    own = torch.cdist(own_rows, own_rows)
    own.fill_diagonal_(float("inf"))
    median_nn = own.min(1).values.median().item() if len(own_rows) > 1 else float("nan")
    cos = torch.nn.functional.cosine_similarity(vec, train_rows[nearest], dim=0).item()
    return {"nn_distance": dists[nearest].item(), "novelty_ratio": dists[nearest].item() / max(median_nn, 1e-12),
            "nn_cosine": cos, "nearest_index": nearest}


def retrieval_weights(similarities: torch.Tensor, k: int, temperature: float) -> dict[int, float]:
    """{index: weight} of the retrieval mix: the ``k`` most similar training tasks (cosine of task
    vectors), weighted by a softmax of their similarities over ``temperature`` (small: the nearest
    dominates; large: an even mean of the k)."""
    top = similarities.topk(min(k, len(similarities)))
    weights = torch.softmax(top.values.double() / temperature, dim=0)
    return {int(i): float(w) for i, w in zip(top.indices, weights)}


def evaluate(cfg: Params, prepared: Path = PREPARED_DIR, base_dir: Path = BASE_MODEL_DIR, lora_root: Path = LORA_DIR,
             matrix_root: Path = LORA_MATRIX_DIR, cvae_root: Path = CVAE_DIR, generated_root: Path = GENERATED_DIR,
             vectors_file: Path = TASK_VECTORS_FILE, out_csv: Path = COMPARISON_TABLE,
             cross_csv: Path = CROSS_TASK_TABLE, bootstrap_csv: Path = BOOTSTRAP_TABLE,
             out_json: Path = EVALUATE_METRICS, timing: Path = timing_file("evaluate"), few_shot_root: Path = FEW_SHOT_DIR,
             few_shot_json: Path = FEW_SHOT_METRICS) -> pd.DataFrame:
    few_shot_json = Path(few_shot_json)
    from peft import get_peft_model

    seed0 = cfg.lora.seeds[0]
    base, processor = read_base_model(base_dir)
    vectors = read_task_vectors(vectors_file)
    tasks, heldout = cfg.data.tasks, set(cfg.heldout_tasks)
    rows: list[dict] = []
    cross: list[dict] = []
    paired: list[dict] = []
    storage: dict = {}
    ridges: dict = {}
    g = torch.Generator().manual_seed(cfg.seed + cfg.evaluate.noise_seed)
    mean_norm = torch.stack([vectors[t] for t in tasks]).norm(dim=1).mean()
    start = time.perf_counter()
    # What a user pays for a held-out task's adapter from its k examples: the task vector (the base reading
    # them, as task_vectors computes it) here, sampling per rank below.
    seconds: dict[str, dict] = {}
    for task in (t for t in tasks if t in heldout):
        began = time.perf_counter()
        if cfg.task_vectors.method == "icl":
            examples, folder = read_split(task, "train", prepared)
            examples = examples[: cfg.task_vectors.examples]
            icl_vectors(base, processor, examples, load_images([folder / e.image for e in examples]),
                        cfg.predict.max_new_tokens)
        seconds[task] = {"task_vector": round(time.perf_counter() - began, 3), "generate": {}}
    base_preds: dict[str, list] = {}
    counts: dict[str, np.ndarray] = {}
    for rank in cfg.lora.ranks:
        model = get_peft_model(base, peft_config(cfg.lora, rank)).eval()
        scorer = Scorer(model, processor, cfg.predict, cfg.evaluate.eval_images, prepared)
        if not base_preds:
            base_preds = {t: scorer.predictions(t, disable_adapter=True) for t in tasks}
            for ti, t in enumerate(tasks):  # the same resamples for every rank and source: paired
                counts[t] = bootstrap_counts(len(base_preds[t]), cfg.evaluate.bootstrap_resamples,
                                             np.random.default_rng([cfg.seed, cfg.evaluate.noise_seed, ti]))
        matrix = read_lora_matrix(rank, matrix_root)
        manifest = matrix.manifest
        gen = read_generator(rank, cvae_root)
        train_mask = torch.tensor([tasks[int(i)] not in heldout for i in matrix.task_index])
        raw_rows = torch.stack([matrix.raw(i) for i in range(len(matrix.rows))])
        train_rows = raw_rows[train_mask]
        train_index = train_mask.nonzero()[:, 0]
        ridge = None
        if heldout:  # fitted on the training tasks' rows and vectors only
            ridge, scores = fit_training_tasks(matrix.rows, matrix.task_index, tasks, vectors, heldout)
            ridges[str(rank)] = {"lam": ridge.lam, "loto_cosine": {f"{c:.3g}": round(v, 6) for c, v in scores.items()}}
        tables: dict[tuple[str, str, str], AP50Table] = {}
        checkpoint_preds: dict[tuple[str, int], list] = {}
        best_sample: dict[str, str] = {}  # held-out task -> the generated sample best on its support examples

        def as_weights(vec: torch.Tensor) -> dict[str, torch.Tensor]:
            return unflatten(vec, manifest.names, manifest.shapes)

        def checkpoint(task: str, index: int) -> list:
            """Predictions of row ``index`` of the matrix on ``task`` (kept: several samples share one)."""
            if (task, index) not in checkpoint_preds:
                checkpoint_preds[(task, index)] = scorer.predictions(task, as_weights(raw_rows[index]))
            return checkpoint_preds[(task, index)]

        def add(task: str, source: str, sample: str, preds: list, **extra) -> None:
            m = scorer.metrics(task, preds)
            rows.append({"task": task, "rank": rank, "source": source, "sample": sample, "heldout": task in heldout,
                         **{k: m[k] for k in (*METRIC_KEYS, "num_pred")}, **extra})
            tables[(task, source, sample)] = ap50_table(truth, preds, cfg.task_label(task))

        for ti, task in enumerate(tqdm(tasks, desc=f"evaluate r{rank}", unit="task")):
            truth = [e.boxes for e in scorer.valid_split(task)[0]]
            add(task, "base", "-", base_preds[task])
            trained_w, _ = read_adapter(final_adapter_dir(task, rank, seed0, lora_root))
            add(task, "trained", "-", scorer.predictions(task, trained_w))
            own_index = (matrix.task_index == ti).nonzero()[:, 0]
            own = raw_rows[own_index]
            add(task, "avg_checkpoint", "-", scorer.predictions(task, as_weights(own.mean(0))))
            generated = samples(generated_dir(task, rank, generated_root))
            if Z0_SAMPLE not in generated:
                raise InputError(f"{generated_dir(task, rank, generated_root)}: no sample-{Z0_SAMPLE} (the baselines are "
                                 f"built around it); run `dvc repro generate`")
            # Function-space novelty's yardstick: how much two checkpoints of the task itself share
            # their errors (its last checkpoint and the one nearest to it).
            last, between = int(own_index[-1]), float("nan")
            if len(own_index) > 1:
                dists = torch.cdist(raw_rows[last][None], own[:-1])[0]
                pair = int(own_index[int(dists.argmin())])
                between = error_overlap(truth, checkpoint(task, last), checkpoint(task, pair))
            vecs, on_support = {}, {}
            if task in heldout:  # best-of-N: each sample scored on the k examples the task vector reads, never the query
                support, where = support_examples(task, cfg.task_vectors.examples, prepared)
                support_images = load_images([where / e.image for e in support])
            for name, folder in generated.items():
                weights, _ = read_adapter(folder)
                vecs[name] = vec = flatten(weights, manifest.names)
                nov = novelty(vec, train_rows, own)
                preds = scorer.predictions(task, weights)
                if task in heldout:  # the model holds this sample's weights now
                    on_support[name] = map50(scorer.model, processor, support, support_images, cfg.predict)
                nearest_preds = checkpoint(task, int(train_index[nov["nearest_index"]]))
                add(task, "generated", name, preds, **{k: v for k, v in nov.items() if k != "nearest_index"},
                    error_iou=error_overlap(truth, preds, nearest_preds), error_iou_checkpoints=between)
            if on_support:  # ties: z0 first, then the draws in order
                best_sample[task] = max(sorted(on_support, key=lambda n: (n != Z0_SAMPLE, n)), key=lambda n: on_support[n])
                rows[-len(generated):] = [{**r, "support_map50": on_support[r["sample"]],
                                           "best_of_n": r["sample"] == best_sample[task]} for r in rows[-len(generated):]]
            # Baselines around the z0 sample.
            z0_nov = novelty(vecs[Z0_SAMPLE], train_rows, own)
            nearest = train_rows[z0_nov["nearest_index"]]
            noise = torch.randn(nearest.shape, generator=g)
            noisy = nearest + noise / noise.norm() * z0_nov["nn_distance"]
            add(task, "noise", "-", scorer.predictions(task, as_weights(noisy)),
                nearest_task=tasks[int(matrix.task_index[train_index[z0_nov["nearest_index"]]])])
            stats = matrix.task_stats(task)
            z = torch.zeros(1, gen.model.config.latent_dim)
            other = tasks[(ti + 1) % len(tasks)]
            wrong = manifest.denormalize(gen.sample(vectors[other], z)[0], stats)
            add(task, "wrong_task", other, scorer.predictions(task, as_weights(wrong)))
            rnd = torch.randn(vectors[task].shape, generator=g)
            rnd = rnd / rnd.norm() * mean_norm
            add(task, "random_condition", "-",
                scorer.predictions(task, as_weights(manifest.denormalize(gen.sample(rnd, z)[0], stats))))
            if task in heldout:
                # What a task never trained could get without a generator: an adapter of the training
                # tasks, chosen or mixed by task-vector similarity, or all of them averaged.
                train_tasks = [t for t in tasks if t not in heldout]
                finals = torch.stack([flatten(read_adapter(final_adapter_dir(t, rank, seed0, lora_root))[0], manifest.names)
                                      for t in train_tasks])
                sims = torch.stack([torch.nn.functional.cosine_similarity(vectors[task], vectors[t], dim=0) for t in train_tasks])
                near = int(sims.argmax())
                single = [scorer.predictions(task, as_weights(f)) for f in finals]
                add(task, "nearest_task", train_tasks[near], single[near])
                # Hindsight: the one training adapter that does best on this very split (ties: the first).
                single_map50 = [scorer.metrics(task, preds)["map50"] for preds in single]
                best = int(np.argmax(single_map50))
                add(task, "oracle_single", train_tasks[best], single[best])
                folder = few_shot_dir(task, rank, few_shot_root)
                chosen = read_json(few_shot_json)["tasks"].get(task, {}).get(f"r{rank}") if few_shot_json.is_file() else None
                if chosen is None or not folder.is_dir():
                    raise InputError(f"{folder}: no few_shot_lora adapter of held-out task {task} at rank {rank} (or none "
                                     f"in {few_shot_json}); run `dvc repro few_shot`")
                add(task, "few_shot_lora", f"lr={chosen['lr']:g},steps={chosen['steps']}",
                    scorer.predictions(task, read_adapter(folder)[0]))
                began = time.perf_counter()
                manifest.denormalize(gen.sample(vectors[task], torch.zeros(1, gen.model.config.latent_dim))[0], stats)
                seconds[task]["generate"][str(rank)] = round(time.perf_counter() - began, 4)
                mix = retrieval_weights(sims, cfg.evaluate.retrieval_k, cfg.evaluate.retrieval_temperature)
                add(task, "retrieval_mix", "+".join(f"{train_tasks[i]}:{w:.2f}" for i, w in mix.items()),
                    scorer.predictions(task, as_weights(sum(w * finals[i] for i, w in mix.items()))))
                add(task, "mean_training", "-", scorer.predictions(task, as_weights(finals.mean(0))))
                add(task, "ridge", f"lam={ridge.lam:.3g}",
                    scorer.predictions(task, as_weights(manifest.denormalize(ridge.predict(vectors[task]), stats))))
            if rank in cfg.evaluate.cross_task_ranks:
                z0_w = as_weights(vecs[Z0_SAMPLE])
                for other in tasks:
                    if other != task:
                        cross.append({"rank": rank, "adapter_task": task, "eval_task": other,
                                      "map50": scorer.score(other, z0_w)["map50"]})
        paired += [{"rank": rank, **row} for row in
                   paired_bootstrap(tables, tasks, heldout, counts, cfg.evaluate.confidence)
                   + best_of_n_rows(tables, best_sample, counts, cfg.evaluate.confidence, Z0_SAMPLE)]
        storage[str(rank)] = {
            "generator_bytes": generator_bytes(rank, cvae_root),
            "checkpoint_bytes": sum(adapter_bytes(folder) for t in tasks if t not in heldout for s in cfg.lora.seeds
                                    for _, folder in trajectory(t, rank, s, lora_root)),
            "final_adapter_bytes": sum(adapter_bytes(final_adapter_dir(t, rank, seed0, lora_root)) for t in tasks),
        }
        base = model.unload()
    frame = pd.DataFrame(rows)
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(cross_csv) as tmp:
        pd.DataFrame(cross, columns=["rank", "adapter_task", "eval_task", "map50"]).to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(bootstrap_csv) as tmp:
        pd.DataFrame(paired).assign(resamples=cfg.evaluate.bootstrap_resamples, confidence=cfg.evaluate.confidence
                                    ).to_csv(tmp, index=False, float_format="%.6g")
    write_json(out_json, {"generator_kind": cfg.cvae.kind, "storage": storage, "evaluations": len(rows) + len(cross),
                          **({"ridge": ridges} if ridges else {})})
    write_json(timing, {"seconds": round(time.perf_counter() - start, 2),
                        # per held-out task: the generator's task vector, and sampling per rank (report: beside few_shot's)
                        "heldout_adapter_seconds": seconds})
    _log_runs(frame, stage_params(cfg, "evaluate"), cfg.cvae.kind)
    return frame


def _log_runs(frame: pd.DataFrame, params: dict, kind: str) -> None:
    """One MLflow run per evaluated adapter, so the compare view puts sources side by side; each tagged
    with the pipeline's generator kind (``generator_kind``), so runs of several kinds compare too."""
    from icmlora.tracking import tracker

    track = tracker("evaluate")
    now = int(time.time() * 1000)
    shared = {k: str(v)[:MLFLOW_PARAM_LIMIT] for k, v in params.items()}
    for r in tqdm(frame.to_dict("records"), desc="evaluate: MLflow runs", unit="run", leave=False):
        tags = base_tags("evaluate", task=r["task"], rank=r["rank"], source=r["source"], sample=r["sample"],
                         heldout="true" if r["heldout"] else "false",  # the filter: tags.heldout = "true"
                         generator_kind=kind)
        run = track.create_run(f"{r['task']}-r{r['rank']}-{r['source']}-{r['sample']}", tags)
        metrics = [(k, float(r[k]), now, 0) for k in (*METRIC_KEYS, "novelty_ratio", "nn_cosine", "error_iou",
                                                      "error_iou_checkpoints") if k in r and pd.notna(r[k])]
        track.log(run, metrics=metrics, params={**shared, "task": r["task"], "rank": r["rank"], "source": r["source"]})
        track.end(run)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = stage_parser("evaluate", __doc__)
    args, cfg = parser.parse(argv)
    frame = evaluate(cfg)
    print(f"evaluate: wrote {COMPARISON_TABLE} ({len(frame)} rows: {frame['source'].nunique()} sources x "
          f"{len(cfg.data.tasks)} tasks x {len(cfg.lora.ranks)} ranks), {CROSS_TASK_TABLE} and {EVALUATE_METRICS}")
    return frame


if __name__ == "__main__":
    run_stage(main)
