"""Stage `train_lora`: one PEFT LoRA per (task, rank, seed) on models/base, keeping its trajectory.

    python -m icmlora.stages.train_lora --task circle --rank 4 --seed 0     # or: icmlora train_lora ...
    accelerate launch -m icmlora.stages.train_lora --task dog --rank 8      # GPUs (runtime.launcher)

Writes models/lora/<task>-r<rank>-s<seed>/{checkpoints/step-<n>/, final/} (PEFT folders: the
last ``lora.keep_checkpoints`` checkpoints, one every ``lora.checkpoint_every`` steps, are the
generator's training data) and metrics/lora/<task>-r<rank>-s<seed>.json: strict detection
metrics on the task's valid split, the base model's there, and for ``lora.cross_task_ranks``
on every other task. Work in progress lives in state/lora/<name>/, outside the outputs (which
are replaced whole when the run completes): a killed run restarted with `dvc repro` continues
from its last saved training state (``icmlora.resume``) if its params and inputs are the same.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

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
    lora_metrics_file,
    lora_state_dir,
)
from icmlora.artifacts.annotations import read_split
from icmlora.artifacts.base_model import read_base_model
from icmlora.config import Params
from icmlora.files import atomic_dir, write_json
from icmlora.lora import peft_config
from icmlora.resume import TrainingState, content_digest, fingerprint
from icmlora.runtime import make_accelerator, seed_everything, set_threads
from icmlora.scoring import Scorer
from icmlora.stage_cli import require, run_stage, stage_parser
from icmlora.tracking import MetricBuffer, parent_run, stage_params, start_run
from icmlora.training import DetectionDataset, train


def train_lora(cfg: Params, task: str, rank: int, seed: int, prepared: Path = PREPARED_DIR,
               base_dir: Path = BASE_MODEL_DIR, out_root: Path = LORA_DIR, state_root: Path = STATE_DIR,
               metrics_dir: Path = LORA_METRICS_DIR) -> dict:
    """Train, score and write one adapter; returns its metrics ({} on processes other than rank 0)."""
    from peft import get_peft_model

    set_threads(cfg.runtime)
    name = adapter_name(task, rank, seed)
    # The seed does not depend on the task or rank's data: every task starts from the same
    # Gaussian A (B = 0), so adapters of different tasks live in one aligned parameter space
    # that a generator can interpolate; independent inits differ by arbitrary rotations.
    run_seed = cfg.seed + 7919 * seed
    seed_everything(run_seed)
    work = lora_state_dir(task, rank, seed, state_root)
    # The state belongs to these params and these inputs: a changed base model or training split
    # (or runtime) starts the run over instead of resuming weights trained on the old ones.
    inputs = content_digest(base_dir, annotations_file(task, "train", prepared))
    state = TrainingState(work / "train", fingerprint(cfg.lora, cfg.runtime, cfg.seed, task, rank, seed, inputs))
    if not state.resumable() and work.exists():
        shutil.rmtree(work)  # a state from other params or a different run: start over
    trajectory = work / "checkpoints"
    trajectory.mkdir(parents=True, exist_ok=True)

    accelerator = make_accelerator(cfg.runtime)
    base, processor = read_base_model(base_dir)
    model = get_peft_model(base, peft_config(cfg.lora, rank))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_examples, train_folder = read_split(task, "train", prepared)
    keep = cfg.lora.keep_checkpoints

    def on_checkpoint(step: int) -> None:
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(trajectory / checkpoint_name(step))
            for _, old in checkpoint_steps(trajectory)[:-keep]:
                shutil.rmtree(old)

    with parent_run("train_lora", params=cfg.lora) as parent_id, start_run(
        "train_lora", name, params=stage_params(cfg, "train_lora"), parent_run_id=parent_id,
        task=task, rank=rank, seed=seed, source="trained",
    ) as mlflow:
        buffer = MetricBuffer()
        result = train(model, processor, DetectionDataset(train_examples, train_folder), cfg.lora.train, cfg.runtime,
                       run_seed, accelerator=accelerator, desc=f"train_lora {name}",
                       on_step=lambda step, loss: buffer.add("train_loss", loss, step),
                       on_checkpoint=on_checkpoint, checkpoint_every=cfg.lora.checkpoint_every, state=state)
        buffer.flush()
        model = accelerator.unwrap_model(model)
        if not accelerator.is_main_process:
            return {}
        start = time.perf_counter()
        metrics = {"task": task, "rank": rank, "seed": seed, "trainable_parameters": n_trainable,
                   "train_steps": result.steps, "train_seconds": round(result.seconds, 2)}
        scorer = Scorer(model, processor, cfg.predict, cfg.lora.eval_images, prepared)
        metrics.update(scorer.score(task, desc=f"{name}: evaluate"))
        metrics["base_map50"] = scorer.score(task, disable_adapter=True, desc=f"{name}: base")["map50"]
        if rank in cfg.lora.cross_task_ranks:
            metrics["cross_task"] = {other: scorer.score(other, desc=f"{name} on {other}")
                                     for other in cfg.data.tasks if other != task}
        metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
        with atomic_dir(lora_dir(task, rank, seed, out_root)) as tmp:
            shutil.copytree(trajectory, tmp / "checkpoints")
            model.save_pretrained(tmp / "final")
        write_json(lora_metrics_file(task, rank, seed, metrics_dir), metrics)
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("rank", "seed")}
        flat.update({f"cross.{o}.map50": m["map50"] for o, m in metrics.get("cross_task", {}).items()})
        mlflow.log_metrics(flat)
    shutil.rmtree(work, ignore_errors=True)  # finished: nothing to resume
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("train_lora", __doc__)
    parser.add_argument("--task", required=True, help="task (category) name from data.tasks")
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank, from lora.ranks")
    parser.add_argument("--seed", type=int, default=0, help="LoRA seed, from lora.seeds (default 0)")
    args, cfg = parser.parse(argv)
    require(args.task, cfg.data.tasks, "--task", "data.tasks")
    require(args.rank, cfg.lora.ranks, "--rank", "lora.ranks")
    require(args.seed, cfg.lora.seeds, "--seed", "lora.seeds")
    metrics = train_lora(cfg, args.task, args.rank, args.seed)
    if metrics:
        print(f"train_lora: wrote {lora_dir(args.task, args.rank, args.seed)} ({cfg.lora.keep_checkpoints} checkpoints "
              f"+ final, {metrics['train_seconds']:.0f} s; valid mAP50 {metrics['map50']:.3f} vs base "
              f"{metrics['base_map50']:.3f}) and {lora_metrics_file(args.task, args.rank, args.seed)}")
    return metrics


if __name__ == "__main__":
    run_stage(main)
