"""Stage `base_model`: materialize the base Florence-2 into models/base/.

    python -m icmlora base_model          # reads params.yaml: seed, data.tasks, base, runtime, eval

- ``base.model: tiny`` builds a small Florence-2 and its processor offline and pre-trains it
  with Accelerate on the split that holds every object, none named by its task: each box is
  named by its hue (synthetic ``base_labels: hue``, the default) or "object".
- ``base.model: <hub id or folder>`` (e.g. florence-community/Florence-2-base-ft) loads it once
  (the only network access of the pipeline, for a hub id), optionally fine-tunes it
  class-agnostically for ``base.finetune_steps``, and saves it.
Every later stage loads only models/base/. Writes metrics/base_model.json (class-agnostic
detection metrics on the valid split, train_seconds) and metrics/base_model_loss.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from icmlora.config import Config, load_config
from icmlora.data.florence_format import ANNOTATIONS_FILE, read_annotations
from icmlora.data.prepare import AGNOSTIC_LABEL, AGNOSTIC_TASK, PREPARED_DIR, task_dir
from icmlora.detection import evaluate_annotations
from icmlora.files import atomic_dir, write_json, write_text
from icmlora.tracking import MetricBuffer, start_run
from icmlora.training import DetectionDataset, make_accelerator, seed_everything, set_threads, train

BASE_DIR = Path("models/base")
METRICS_FILE = Path("metrics/base_model.json")
LOSS_FILE = Path("metrics/base_model_loss.csv")


def _image_size(examples) -> int:
    sizes = {(e.width, e.height) for e in examples}
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise ValueError("the tiny model needs square images of one size (the synthetic source makes them)")
    return next(iter(sizes))[0]


def _load_or_build(cfg: Config, train_examples):
    """(model, processor, optim) for this configuration; optim is None when nothing is trained."""
    import torch

    if cfg.base.model == "tiny":
        from icmlora.florence import build_tiny_model, build_tiny_processor

        size = _image_size(train_examples)
        names = sorted({box.label for example in train_examples for box in example.boxes})
        labels = list(dict.fromkeys([*cfg.data.tasks, AGNOSTIC_LABEL, *names]))
        processor = build_tiny_processor(labels, size, cfg.base.tiny)
        model = build_tiny_model(cfg.base.tiny, processor, size, cfg.seed)
        return model, processor, cfg.base.train
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    source = cfg.base.model
    kwargs = {"revision": cfg.base.revision} if cfg.base.revision else {}
    model = Florence2ForConditionalGeneration.from_pretrained(source, dtype=torch.float32, **kwargs)
    processor = AutoProcessor.from_pretrained(source, **kwargs)
    optim = dataclasses.replace(cfg.base.train, steps=cfg.base.finetune_steps) if cfg.base.finetune_steps else None
    return model, processor, optim


def build_base_model(cfg: Config, prepared: Path = PREPARED_DIR, out_dir: Path = BASE_DIR,
                     metrics_file: Path = METRICS_FILE, loss_file: Path = LOSS_FILE) -> dict:
    set_threads(cfg.runtime)
    seed_everything(cfg.seed)
    train_file = task_dir(prepared, AGNOSTIC_TASK, "train") / ANNOTATIONS_FILE
    valid_file = task_dir(prepared, AGNOSTIC_TASK, "valid") / ANNOTATIONS_FILE
    train_examples = read_annotations(train_file, check_images=False)
    accelerator = make_accelerator(cfg.runtime)
    model, processor, optim = _load_or_build(cfg, train_examples)
    n_params = sum(p.numel() for p in model.parameters())
    metrics: dict = {"model": cfg.base.model, "parameters": n_params, "train_steps": 0, "train_seconds": 0.0}
    with start_run("base_model", f"base_model-{cfg.base.model.replace('/', '_')}", params=cfg, source="base") as mlflow:
        losses: list[float] = []
        if optim is not None:
            buffer = MetricBuffer()

            def on_step(step: int, loss: float) -> None:
                buffer.add("train_loss", loss, step)

            result = train(model, processor, DetectionDataset(train_examples, train_file.parent), optim, cfg.runtime,
                           cfg.seed, accelerator=accelerator, desc="base_model: train", on_step=on_step)
            buffer.flush()
            model = accelerator.unwrap_model(model)
            losses = result.losses
            metrics.update(train_steps=result.steps, train_seconds=round(result.seconds, 2))
        start = time.perf_counter()
        scores = evaluate_annotations(model, processor, valid_file, cfg.eval, class_agnostic=True, desc="base_model: evaluate")
        metrics.update(scores, eval_seconds=round(time.perf_counter() - start, 2))
        if accelerator.is_main_process:
            with atomic_dir(out_dir) as tmp:
                model.save_pretrained(tmp)
                processor.save_pretrained(tmp)
            write_text(loss_file, "step,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)))
            write_json(metrics_file, metrics)
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="icmlora base_model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("--prepared", default=str(PREPARED_DIR), help="prepared data folder (default: data/prepared)")
    parser.add_argument("--out", default=str(BASE_DIR), help="output folder (default: models/base)")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    metrics = build_base_model(cfg, Path(args.prepared), Path(args.out))
    print(f"base_model: wrote {args.out} ({metrics['parameters']:,} parameters, {metrics['train_steps']} steps in "
          f"{metrics['train_seconds']:.0f} s; valid class-agnostic mAP50 {metrics['map50']:.3f}, "
          f"mAP50-95 {metrics['map50_95']:.3f}) and {METRICS_FILE}")
    return metrics
