"""Stage `train_lora`: one PEFT LoRA per (task, rank, seed) on models/base, keeping its trajectory.

    python -m icmlora train_lora --task circle --rank 4 --seed 0
    accelerate launch -m icmlora train_lora --task dog --rank 8      # GPUs (runtime.launcher)

Writes models/lora/<task>-r<rank>-s<seed>/{checkpoints/step-<n>/, final/} (PEFT folders: the
last ``lora.keep_checkpoints`` checkpoints, one every ``lora.checkpoint_every`` steps, are the
generator's training data) and metrics/lora/<task>-r<rank>-s<seed>.json. Work in progress
lives in state/lora/<name>/ (outside DVC outputs, which DVC deletes before a stage runs): a
killed run restarted with `dvc repro` continues from its last saved training state
(safetensors + JSON, see icmlora/resume.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

from icmlora.config import Config, LoraConfig, load_config
from icmlora.data.florence_format import ANNOTATIONS_FILE, read_annotations
from icmlora.data.prepare import PREPARED_DIR, task_dir
from icmlora.files import atomic_dir, write_json
from icmlora.florence import load_base
from icmlora.tracking import MetricBuffer, parent_run, start_run
from icmlora.training import DetectionDataset, make_accelerator, seed_everything, set_threads, train

BASE_DIR = Path("models/base")
LORA_DIR = Path("models/lora")
STATE_DIR = Path("state/lora")
METRICS_DIR = Path("metrics/lora")


def adapter_name(task: str, rank: int, seed: int) -> str:
    return f"{task}-r{rank}-s{seed}"


def peft_config(lora: LoraConfig, rank: int):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
        init_lora_weights="gaussian" if lora.init == "gaussian" else True,
        target_modules=lora.target_modules, bias="none",
    )


def evaluate_task(model, processor, prepared: Path, task: str, cfg: Config, desc: str) -> dict:
    """Strict (label must match) detection metrics on the task's valid split."""
    import dataclasses

    from icmlora.detection import evaluate_annotations

    eval_cfg = dataclasses.replace(cfg.eval, max_images=cfg.lora.eval_max_images or cfg.eval.max_images)
    return evaluate_annotations(model, processor, task_dir(prepared, task, "valid") / ANNOTATIONS_FILE, eval_cfg, desc=desc)


def _fingerprint(cfg: Config, task: str, rank: int, seed: int) -> str:
    """Identifies the run a saved state belongs to; a state from other params is discarded."""
    import dataclasses

    blob = json.dumps([dataclasses.asdict(cfg.lora), cfg.seed, task, rank, seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _saved_fingerprint(state_dir: Path) -> str | None:
    try:
        return json.loads((state_dir / "state.json").read_text())["extra"]["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def train_lora(cfg: Config, task: str, rank: int, seed: int, prepared: Path = PREPARED_DIR, base_dir: Path = BASE_DIR,
               out_root: Path = LORA_DIR, state_root: Path = STATE_DIR, metrics_dir: Path = METRICS_DIR) -> dict:
    from peft import get_peft_model

    set_threads(cfg.runtime)
    name = adapter_name(task, rank, seed)
    # The seed does not depend on the task or rank's data: every task starts from the same
    # Gaussian A (B = 0), so adapters of different tasks live in one aligned parameter space
    # that a generator can interpolate; independent inits differ by arbitrary rotations.
    run_seed = cfg.seed + 7919 * seed
    seed_everything(run_seed)
    state = state_root / name
    fingerprint = _fingerprint(cfg, task, rank, seed)
    resume = _saved_fingerprint(state / "train") == fingerprint
    if not resume and state.exists():
        shutil.rmtree(state)  # a state from other params or a different run: start over
    (state / "checkpoints").mkdir(parents=True, exist_ok=True)

    accelerator = make_accelerator(cfg.runtime)
    base, processor = load_base(base_dir)
    model = get_peft_model(base, peft_config(cfg.lora, rank))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_file = task_dir(prepared, task, "train") / ANNOTATIONS_FILE
    dataset = DetectionDataset(read_annotations(train_file, check_images=False), train_file.parent)
    keep = cfg.lora.keep_checkpoints

    def on_checkpoint(step: int) -> None:
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(state / "checkpoints" / f"step-{step}")
            kept = sorted((state / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in kept[:-keep]:
                shutil.rmtree(old)

    with parent_run("train_lora", params=cfg.lora) as parent_id, start_run(
        "train_lora", name, params=cfg, parent_run_id=parent_id,
        task=task, rank=rank, seed=seed, source="trained",
    ) as mlflow:
        buffer = MetricBuffer()
        result = train(model, processor, dataset, cfg.lora.train, cfg.runtime, run_seed, accelerator=accelerator,
                       desc=f"train_lora {name}", on_step=lambda step, loss: buffer.add("train_loss", loss, step),
                       on_checkpoint=on_checkpoint, checkpoint_every=cfg.lora.checkpoint_every,
                       state_dir=state / "train", state_extra={"fingerprint": fingerprint}, resume=resume)
        buffer.flush()
        model = accelerator.unwrap_model(model)
        if not accelerator.is_main_process:
            return {}
        start = time.perf_counter()
        metrics = {"task": task, "rank": rank, "seed": seed, "trainable_parameters": n_trainable,
                   "train_steps": result.steps, "train_seconds": round(result.seconds, 2)}
        metrics.update(evaluate_task(model, processor, prepared, task, cfg, f"{name}: evaluate"))
        with model.disable_adapter():
            metrics["base_map50"] = evaluate_task(model, processor, prepared, task, cfg, f"{name}: base")["map50"]
        if rank in cfg.lora.cross_eval_ranks:
            metrics["cross_task"] = {
                other: evaluate_task(model, processor, prepared, other, cfg, f"{name} on {other}")
                for other in cfg.data.tasks if other != task
            }
        metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
        with atomic_dir(out_root / name) as tmp:
            shutil.copytree(state / "checkpoints", tmp / "checkpoints")
            model.save_pretrained(tmp / "final")
        write_json(metrics_dir / f"{name}.json", metrics)
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("rank", "seed")}
        flat.update({f"cross.{o}.map50": m["map50"] for o, m in metrics.get("cross_task", {}).items()})
        mlflow.log_metrics(flat)
    shutil.rmtree(state, ignore_errors=True)  # finished: nothing to resume
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="icmlora train_lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="task (category) name from data.tasks")
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank, from lora.ranks")
    parser.add_argument("--seed", type=int, default=0, help="LoRA seed, from lora.seeds (default 0)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    from icmlora.errors import InputError

    if args.task not in cfg.data.tasks:
        raise InputError(f"--task {args.task!r} is not in data.tasks ({', '.join(cfg.data.tasks)})")
    metrics = train_lora(cfg, args.task, args.rank, args.seed)
    if metrics:
        name = adapter_name(args.task, args.rank, args.seed)
        print(f"train_lora: wrote {LORA_DIR / name} ({cfg.lora.keep_checkpoints} checkpoints + final, "
              f"{metrics['train_seconds']:.0f} s; valid mAP50 {metrics['map50']:.3f} vs base {metrics['base_map50']:.3f}) "
              f"and {METRICS_DIR / name}.json")
    return metrics
