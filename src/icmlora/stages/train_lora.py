"""Stage `train_lora`: the PEFT LoRAs of one task and seed, one per rank in ``lora.ranks``, each
keeping its trajectory. One process trains every rank: the base model, the task's images (decoded
once, ``runtime.image_cache_mb``) and the base's score are loaded once, not once per adapter, and
the ranks train together (``runtime.lora_batch``, default all of them): one forward and backward
pass a step, each step's batch going through each adapter as its own copy (PEFT's mixed-adapter
batch), each adapter with its own loss, learning rate, optimizer state and gradient clipping.

    python -m icmlora.stages.train_lora --task circle --seed 0     # or: icmlora train_lora ...
    accelerate launch -m icmlora.stages.train_lora --task dog      # GPUs (runtime.launcher)

Writes models/lora/<task>-s<seed>/r<rank>/{checkpoints/step-<n>/, final/} (PEFT folders: the
last ``lora.keep_checkpoints`` checkpoints, one every ``lora.checkpoint_every`` steps, are the
generator's training data) and metrics/lora/<task>-s<seed>/r<rank>.json: strict detection
metrics on the task's valid split, the base model's there, and for ``lora.cross_task_ranks``
on every other task. Work in progress lives in state/lora/<task>-r<rank>-s<seed>/ (and the
training state of ranks trained together in state/lora/<task>-r<r1>+<r2>...-s<seed>/), outside
the outputs (which are replaced whole when every rank is done): a killed run restarted with
`dvc repro` keeps the ranks it trained (and scored, if scoring's settings and data are the same)
and continues the interrupted pass from its last saved training state (``icmlora.resume``) if
its params and inputs are the same. Every rank is trained before any is scored (on process 0),
so no process waits in a collective while another scores.

``runtime.lora_workers: N`` > 1 trains the passes (``runtime.lora_batch`` ranks each) side by side
instead (``icmlora.workers``): the stage's process scores the base, then N spawned worker processes
each train and score the passes they take, one at a time, into the same state folders; the stage's
process then writes the outputs as above. A failed worker fails the stage (naming it and its ranks)
once the others are done, and the outputs are left as they were; run it again to resume.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from icmlora.artifacts import (
    BASE_MODEL_DIR,
    LORA_DIR,
    LORA_METRICS_DIR,
    PREPARED_DIR,
    STATE_DIR,
    adapter_name,
    annotations_file,
    checkpoint_name,
    checkpoint_steps,
    lora_dir,
    lora_group_dir,
    lora_metrics_file,
    lora_metrics_group_dir,
    lora_state_dir,
)
from icmlora.artifacts.adapters import read_adapter, save_adapter
from icmlora.artifacts.annotations import read_split
from icmlora.artifacts.base_model import read_base_model
from icmlora.config import Params
from icmlora.errors import InputError
from icmlora.files import atomic_dir, read_json, write_json
from icmlora.lora import peft_config
from icmlora.resume import TrainingState, content_digest, fingerprint
from icmlora.runtime import accelerate_params, make_accelerator, seed_everything, set_threads
from icmlora.scoring import Scorer
from icmlora.stage_cli import configure_process, require, run_stage, stage_parser
from icmlora.tracking import MetricBuffer, finish, log_to_run, parent_run, stage_params, start_run
from icmlora.training import DetectionDataset, adapter_parameters, train
from icmlora.workers import WorkerFailed, run_workers

DONE = "done"  # in a rank's state folder: its trained adapter (checkpoints/, final/) and TRAINED
TRAINED = "trained.json"  # what training measured (steps, seconds, MLflow run), written last
SCORED = "metrics.json"  # its metrics, with the fingerprint of what they were scored with


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the filesystem allows one (no bytes copied), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _training_fingerprint(cfg: Params, task: str, rank, seed: int, inputs: str) -> str:
    # runtime.image_cache_mb counts too: it decides whether steps read cached image features or run the
    # vision tower, and the two agree only to float rounding, so a resumed run must take the same path.
    return fingerprint(cfg.lora, cfg.runtime, cfg.seed, task, rank, seed, inputs)


def _scoring_fingerprint(cfg: Params, task: str, rank: int, prepared: Path) -> str:
    """What a rank's metrics depend on besides its weights: how it is scored, and on which data."""
    tasks = sorted({task, *(cfg.data.tasks if rank in cfg.lora.cross_task_ranks else [])})
    # Not predict.image_cache_mb: scoring from kept image features gives the same boxes bit for bit.
    return fingerprint(cfg.predict.model_dump(exclude={"image_cache_mb"}), cfg.lora.eval_images, tasks,
                       content_digest(*(annotations_file(t, "valid", prepared) for t in tasks)))


def lora_batches(cfg: Params) -> list[list[int]]:
    """The ranks trained together, one forward and backward pass a step (``runtime.lora_batch``:
    0 = every rank of the stage in one pass), largest first within the stage's order."""
    size = cfg.runtime.lora_batch or len(cfg.lora.ranks)
    ranks = list(cfg.lora.ranks)
    return [ranks[i:i + size] for i in range(0, len(ranks), size)]


def _group_state_dir(task: str, ranks: list[int], seed: int, state_root: Path) -> Path:
    """The training state of ranks trained together; one rank's is that rank's own folder."""
    if len(ranks) == 1:
        return lora_state_dir(task, ranks[0], seed, state_root)
    return Path(state_root) / "lora" / f"{task}-r{'+'.join(map(str, ranks))}-s{seed}"


def _trained(work: Path) -> bool:
    return (work / TRAINED).is_file() and (work / DONE / "final").is_dir()


def _build_model(cfg: Params, ranks: list[int], run_seed: int, base_dir: Path):
    """The base with one LoRA per rank, each initialized as it would be alone (the same RNG state:
    the same Gaussian A for every task); returns (model, processor, adapter names)."""
    from peft import get_peft_model

    seed_everything(run_seed)
    base, processor = read_base_model(base_dir)
    if len(ranks) == 1:
        return get_peft_model(base, peft_config(cfg.lora, ranks[0])), processor, ["default"]
    names = [f"r{rank}" for rank in ranks]
    rng = torch.get_rng_state()
    model = None
    for rank, name in zip(ranks, names):
        torch.set_rng_state(rng)
        if model is None:
            model = get_peft_model(base, peft_config(cfg.lora, rank), adapter_name=name)
        else:
            model.add_adapter(name, peft_config(cfg.lora, rank))
    model.base_model.set_adapter(names)  # every adapter trainable
    return model, processor, names


def train_ranks(cfg: Params, task: str, ranks: list[int], seed: int, accelerator, dataset: DetectionDataset,
                inputs: str, parent_id: str | None, base_dir: Path = BASE_MODEL_DIR,
                state_root: Path = STATE_DIR, bar_position: int | None = None) -> None:
    """Train the adapters of these ranks together, one forward and backward pass a step
    (``icmlora.training.train``'s ``adapters``; one rank: alone), each into its own state folder
    (``DONE``, on process 0). Ranks an interrupted run trained are not trained again. Scoring comes
    after every rank is trained (``score_rank``): process 0 scoring between ranks would keep the
    other processes waiting in a collective."""
    # The seed does not depend on the task or rank's data: every task starts from the same
    # Gaussian A (B = 0), so adapters of different tasks live in one aligned parameter space
    # that a generator can interpolate; independent inits differ by arbitrary rotations.
    run_seed = cfg.seed + 7919 * seed
    works = [lora_state_dir(task, rank, seed, state_root) for rank in ranks]
    group = _group_state_dir(task, ranks, seed, state_root)
    # The state belongs to these params and these inputs: a changed base model or training split
    # (or runtime) starts the run over instead of resuming weights trained on the old ones. Ranks
    # trained together count too: the dropout masks each adapter draws follow the pass it is in.
    parts = ranks[0] if len(ranks) == 1 else ranks
    state = TrainingState(group / "train", _training_fingerprint(cfg, task, parts, seed, inputs))
    label = adapter_name(task, ranks[0], seed) if len(ranks) == 1 else f"{task}-r{'+'.join(map(str, ranks))}-s{seed}"
    if state.resumable() and all(_trained(work) for work in works):
        print(f"train_lora: {label} was trained by an interrupted run; kept")
        return
    if not state.resumable():
        for folder in {group, *works}:  # a state from other params or a different run: start over
            if folder.exists():
                shutil.rmtree(folder)
    trajectories = [work / "checkpoints" for work in works]
    for trajectory in trajectories:
        trajectory.mkdir(parents=True, exist_ok=True)

    model, processor, names = _build_model(cfg, ranks, run_seed, base_dir)
    sizes = ([sum(p.numel() for p in model.parameters() if p.requires_grad)] if len(ranks) == 1 else
             [sum(p.numel() for p in adapter_parameters(model, name)) for name in names])
    keep = cfg.lora.keep_checkpoints

    def on_checkpoint(step: int) -> None:
        if accelerator.is_main_process:
            for name, trajectory in zip(names, trajectories):
                save_adapter(accelerator.unwrap_model(model), trajectory / checkpoint_name(step), adapter=name)
                for _, old in checkpoint_steps(trajectory)[:-keep]:
                    shutil.rmtree(old)

    optims = [cfg.lora.optimizer(rank) for rank in ranks]  # lora.train, with each rank's lr from lora.lr_by_rank
    with contextlib.ExitStack() as stack:
        runs = [stack.enter_context(start_run(
            "train_lora", adapter_name(task, rank, seed),
            params={**stage_params(cfg, "train_lora"), **accelerate_params(accelerator), "lr": optim.lr,
                    "trained_with": ",".join(map(str, ranks))},
            parent_run_id=parent_id, task=task, rank=rank, seed=seed, source="trained"))
            for rank, optim in zip(ranks, optims)]
        buffers = [MetricBuffer(run) for run in runs]

        def on_step(step: int, loss) -> None:
            for buffer, value in zip(buffers, loss if isinstance(loss, list) else [loss]):
                buffer.add("train_loss", value, step)

        result = train(model, processor, dataset, optims[0], cfg.runtime, run_seed, accelerator=accelerator,
                       desc=f"train_lora {label}", on_step=on_step, on_checkpoint=on_checkpoint,
                       checkpoint_every=cfg.lora.checkpoint_every, state=state, bar_position=bar_position,
                       adapters=list(zip(names, optims)) if len(ranks) > 1 else None)
        for buffer in buffers:
            buffer.flush()
        model = accelerator.unwrap_model(model)
        accelerator.free_memory()  # the next group prepares its own model and optimizer
        if not accelerator.is_main_process:
            return
        for name, size, work, trajectory, run in zip(names, sizes, works, trajectories, runs):
            with atomic_dir(work / DONE) as tmp:
                shutil.copytree(trajectory, tmp / "checkpoints")
                save_adapter(model, tmp / "final", adapter=name)
            # train_seconds: this adapter's share of the pass it was trained in (pass_seconds).
            write_json(work / TRAINED, {"trainable_parameters": size, "train_steps": result.steps,
                                        "train_seconds": round(result.seconds / len(ranks), 2),
                                        "pass_seconds": round(result.seconds, 2), "trained_with": ranks,
                                        "mlflow_run_id": run.run_id})


def score_rank(cfg: Params, task: str, rank: int, seed: int, base_map50: float, prepared: Path = PREPARED_DIR,
               base_dir: Path = BASE_MODEL_DIR, state_root: Path = STATE_DIR) -> dict:
    """Score one trained adapter (process 0); metrics an interrupted run scored with the same
    settings on the same data are kept."""
    from peft import get_peft_model

    name = adapter_name(task, rank, seed)
    work = lora_state_dir(task, rank, seed, state_root)
    scoring = _scoring_fingerprint(cfg, task, rank, prepared)
    if (work / SCORED).is_file():
        saved = read_json(work / SCORED)
        if saved.get("scoring_fingerprint") == scoring:
            return saved["metrics"]
    trained = read_json(work / TRAINED)
    start = time.perf_counter()
    metrics = {"task": task, "rank": rank, "seed": seed,
               **{k: trained[k] for k in ("trainable_parameters", "train_steps", "train_seconds") if k in trained},
               **{k: trained[k] for k in ("pass_seconds", "trained_with") if k in trained}}
    base, processor = read_base_model(base_dir)
    model = get_peft_model(base, peft_config(cfg.lora, rank))
    weights, _ = read_adapter(work / DONE / "final")
    scorer = Scorer(model, processor, cfg.predict, cfg.lora.eval_images, prepared)
    metrics.update(scorer.score(task, weights, desc=f"{name}: evaluate"))
    metrics["base_map50"] = base_map50
    if rank in cfg.lora.cross_task_ranks:
        metrics["cross_task"] = {other: scorer.score(other, desc=f"{name} on {other}")
                                 for other in cfg.data.tasks if other != task}
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    write_json(work / SCORED, {"scoring_fingerprint": scoring, "metrics": metrics})
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("rank", "seed")}
    flat.update({f"cross.{o}.map50": m["map50"] for o, m in metrics.get("cross_task", {}).items()})
    log_to_run("train_lora", trained["mlflow_run_id"], flat)  # training's run, ended: scoring follows all training
    return metrics


def _base_map50(cfg: Params, task: str, base, processor, prepared: Path) -> float:
    """The base's score on the task, once for every rank (the adapters only add to the base)."""
    scorer = Scorer(base, processor, cfg.predict, cfg.lora.eval_images, prepared)
    return scorer.score(task, desc=f"{task}: base")["map50"]


def _worker(index: int, groups, cfg: Params, task: str, seed: int, inputs: str, parent_id: str | None,
            base_map50: float, prepared: Path, base_dir: Path, state_root: Path) -> None:
    """One of ``runtime.lora_workers`` processes: trains and scores each group of ranks it takes, one
    at a time, into their state folders (a process of its own: its own Accelerator, data and caches)."""
    configure_process()
    accelerator = make_accelerator(cfg.runtime)
    train_examples, train_folder = read_split(task, "train", prepared)
    _, processor = read_base_model(base_dir)
    dataset = DetectionDataset(train_examples, train_folder, processor, cfg.runtime.image_cache_mb)
    for ranks in groups:
        train_ranks(cfg, task, ranks, seed, accelerator, dataset, inputs, parent_id, base_dir, state_root,
                    bar_position=index)
        for rank in ranks:
            score_rank(cfg, task, rank, seed, base_map50, prepared, base_dir, state_root)
    finish()  # its tracking records sent (or spooled, with the warning) before the worker reports done


def _side_by_side(cfg: Params, task: str, seed: int, groups: list[list[int]], workers: int, inputs: str,
                  prepared: Path, base_dir: Path, state_root: Path) -> float:
    """Every group of ranks trained and scored in ``workers`` worker processes (their state folders
    filled); returns the base's score."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # e.g. `accelerate launch -m` with a multi-GPU saved config
        raise InputError(f"runtime.lora_workers: {cfg.runtime.lora_workers} workers in each of "
                         f"{os.environ['WORLD_SIZE']} launched processes: set runtime.lora_workers to 1 for a "
                         "multi-process launch, or launch one process (runtime.launcher: python -m)")
    # The costliest first (scored on every task, then the largest), so no long one starts last.
    order = sorted(groups, key=lambda g: (any(r in cfg.lora.cross_task_ranks for r in g), max(g)), reverse=True)
    with parent_run("train_lora", params=cfg.lora) as parent_id:  # (a tracking server is checked here, first)
        base, processor = read_base_model(base_dir)
        base_map50 = _base_map50(cfg, task, base, processor, prepared)
        del base, processor  # the workers load their own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # scored on the GPU: leave its memory to the workers
        print(f"train_lora: {len(cfg.lora.ranks)} adapters of {task}-s{seed} in {workers} worker processes "
              f"({len(order)} passes)", flush=True)
        run_workers(_worker, order, workers, threads=cfg.runtime.threads, what="ranks",
                    args=(cfg, task, seed, inputs, parent_id, base_map50, prepared, base_dir, state_root))
    return base_map50


def train_lora(cfg: Params, task: str, seed: int, prepared: Path = PREPARED_DIR, base_dir: Path = BASE_MODEL_DIR,
               out_root: Path = LORA_DIR, state_root: Path = STATE_DIR,
               metrics_dir: Path = LORA_METRICS_DIR) -> dict[int, dict]:
    """Train, score and write every rank's adapter of (task, seed); returns {rank: metrics}
    ({} on processes other than rank 0)."""
    set_threads(cfg.runtime)
    groups = lora_batches(cfg)
    workers = min(cfg.runtime.lora_workers, len(groups))
    inputs = content_digest(base_dir, annotations_file(task, "train", prepared))
    if workers > 1:
        # every rank trained and scored: score_rank below returns the metrics its worker saved
        base_map50 = _side_by_side(cfg, task, seed, groups, workers, inputs, prepared, base_dir, state_root)
    else:
        accelerator = make_accelerator(cfg.runtime)
        train_examples, train_folder = read_split(task, "train", prepared)
        # Kept untouched for the base's own score (each group adds its adapters to a copy of its own).
        base, processor = read_base_model(base_dir)
        dataset = DetectionDataset(train_examples, train_folder, processor, cfg.runtime.image_cache_mb)
        with parent_run("train_lora", params=cfg.lora) as parent_id:
            for ranks in groups:
                train_ranks(cfg, task, ranks, seed, accelerator, dataset, inputs, parent_id, base_dir, state_root)
        if not accelerator.is_main_process:
            return {}
        del dataset
        base_map50 = _base_map50(cfg, task, base, processor, prepared)
        del base
    results = {rank: score_rank(cfg, task, rank, seed, base_map50, prepared, base_dir, state_root)
               for rank in cfg.lora.ranks}
    works = [lora_state_dir(task, rank, seed, state_root) for rank in cfg.lora.ranks]
    # Outputs are copied out of the state folders, which go only once both are in place: a run
    # killed on the way finds every rank trained and scored, and only writes the outputs again.
    with atomic_dir(lora_metrics_group_dir(task, seed, metrics_dir)) as tmp:
        for rank in cfg.lora.ranks:
            write_json(tmp / lora_metrics_file(task, rank, seed, metrics_dir).name, results[rank])
    with atomic_dir(lora_group_dir(task, seed, out_root)) as tmp:
        for rank, work in zip(cfg.lora.ranks, works):
            shutil.copytree(work / DONE, tmp / lora_dir(task, rank, seed, out_root).name, copy_function=_link_or_copy)
    for work in works + [_group_state_dir(task, ranks, seed, state_root) for ranks in groups]:
        shutil.rmtree(work, ignore_errors=True)  # finished: nothing to resume
    return results


def main(argv: list[str] | None = None) -> dict[int, dict]:
    parser = stage_parser("train_lora", __doc__)
    parser.add_argument("--task", required=True, help="task (category) name from data.tasks")
    parser.add_argument("--seed", type=int, default=0, help="LoRA seed, from lora.seeds (default 0)")
    args, cfg = parser.parse(argv)
    require(args.task, cfg.data.tasks, "--task", "data.tasks")
    require(args.seed, cfg.lora.seeds, "--seed", "lora.seeds")
    try:
        results = train_lora(cfg, args.task, args.seed)
    except WorkerFailed as exc:  # each worker printed its own traceback above
        raise SystemExit(f"\nicmlora train_lora: {exc}; the outputs are unchanged, and the ranks finished are kept "
                         f"under {STATE_DIR}/: run the stage again to resume") from None
    if results:
        ranks = ", ".join(f"r{r} {m['map50']:.3f}" for r, m in results.items())
        seconds = statistics.median(m["train_seconds"] for m in results.values())
        print(f"train_lora: wrote {lora_group_dir(args.task, args.seed)} ({len(results)} adapters, "
              f"{cfg.lora.keep_checkpoints} checkpoints + final each, {seconds:.0f} s training median; valid mAP50 "
              f"{ranks} vs base {next(iter(results.values()))['base_map50']:.3f}) and "
              f"{lora_metrics_group_dir(args.task, args.seed)}/")
    return results


if __name__ == "__main__":
    run_stage(main)
