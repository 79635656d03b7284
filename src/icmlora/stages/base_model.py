"""Stage `base_model`: materialize the base Florence-2 into models/base/.

    python -m icmlora.stages.base_model     # or: icmlora base_model  (params: seed, data.tasks, base, runtime, predict)

- ``base.model: tiny`` builds a small Florence-2 and its processor offline and pre-trains it
  with Accelerate on the split that holds every object, none named by its task: each box is
  named by its hue (synthetic ``base_labels: hue``, the default) or "object".
- ``base.model: <hub id or folder>`` (e.g. florence-community/Florence-2-base-ft) loads it once
  (the only network access of the pipeline, for a hub id), optionally fine-tunes it
  class-agnostically for ``base.finetune_steps``, and saves it.
Every later stage loads only models/base/ (``icmlora.artifacts.base_model``). Writes
metrics/base_model.json (class-agnostic detection metrics on the valid split),
metrics/base_model_loss.csv and metrics/timing/base_model.json (train and eval seconds).
"""

from __future__ import annotations

import time
from pathlib import Path

from icmlora.artifacts import BASE_MODEL_DIR, BASE_MODEL_LOSS, BASE_MODEL_METRICS, BASE_SPLIT, PREPARED_DIR, timing_file
from icmlora.artifacts.annotations import AGNOSTIC_LABEL, read_split
from icmlora.artifacts.base_model import write_base_model
from icmlora.config import Params
from icmlora.errors import InputError
from icmlora.files import write_json, write_text
from icmlora.runtime import accelerate_params, make_accelerator, seed_everything, set_threads
from icmlora.scoring import Scorer
from icmlora.stage_cli import run_stage, stage_parser
from icmlora.tracking import MetricBuffer, stage_params, start_run
from icmlora.training import DetectionDataset, train


def _image_size(examples, configured: int) -> int:
    if configured:
        return configured  # the processor resizes every image to configured x configured
    sizes = {(e.width, e.height) for e in examples}
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise ValueError("base.tiny.image_size 0 needs square images of one size (the synthetic source makes them); "
                         "set base.tiny.image_size (e.g. 768) to resize any image to that square")
    return next(iter(sizes))[0]


def _load_or_build(cfg: Params, train_examples):
    """(model, processor, optimizer params) for this configuration; optimizer params are None
    when nothing is trained."""
    import torch

    if cfg.base.model == "tiny":
        from icmlora.florence.model import build_tiny_model, build_tiny_processor

        size = _image_size(train_examples, cfg.base.tiny.image_size)
        names = sorted({box.label for example in train_examples for box in example.boxes})
        # Every word a target may write: the tasks' label words (a family's one word), "object", and
        # the base split's names. (The tokenizer learns them all; the base is trained on the last.)
        labels = list(dict.fromkeys([*cfg.data.tasks, AGNOSTIC_LABEL, *names, *map(cfg.task_label, cfg.data.tasks)]))
        processor = build_tiny_processor(labels, size, cfg.base.tiny)
        model = build_tiny_model(cfg.base.tiny, processor, size, cfg.seed)
        return model, processor, cfg.base.train
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    source = cfg.base.model
    kwargs = {"revision": cfg.base.revision} if cfg.base.revision else {}
    try:
        model = Florence2ForConditionalGeneration.from_pretrained(source, dtype=torch.float32, **kwargs)
        processor = AutoProcessor.from_pretrained(source, **kwargs)
    except OSError as exc:  # transformers' way of saying: not reachable, not cached, not there
        raise not_loadable(source, cfg.base.revision, exc) from None
    optim = cfg.base.train.model_copy(update={"steps": cfg.base.finetune_steps}) if cfg.base.finetune_steps else None
    return model, processor, optim


def not_loadable(source: str, revision: str | None, exc: OSError) -> InputError:
    """What to do when ``base.model`` cannot be loaded: a folder that is not a model, or a hub id
    the hub could not give (no network, a wrong id or revision) and no cache holds."""
    import os

    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if Path(source).exists():
        return InputError(f"params.yaml: base.model {source!r} is a folder, but not one Florence-2 loads from ({reason})",
                          ["point base.model at a save_pretrained folder (config.json, the weights and the processor's "
                           "files), e.g. one `hf download` wrote"])
    rev = revision or "main"
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    flag = f" --revision {revision}" if revision else ""
    return InputError(
        f"params.yaml: base.model {source!r} (revision {rev}) could not be loaded: the hub at {endpoint} could not be "
        f"reached and no cache under {home} holds it, or the id or revision does not exist ({reason}). Nothing was "
        "written under models/base", [
            f"download it where there is network: `hf download {source}{flag} --local-dir <folder>`, bring the folder "
            "here and set base.model to it (`dvc exp run -S base.model=<folder>`; then nothing needs the network)",
            "or use a mirror of the hub: HF_ENDPOINT=<its URL> dvc repro base_model",
            f"or a Hugging Face cache that holds it: HF_HOME=<folder with hub/models--{source.replace('/', '--')}> "
            "(HF_HUB_OFFLINE=1 to read only from it)",
        ])


def build_base_model(cfg: Params, prepared: Path = PREPARED_DIR, out_dir: Path = BASE_MODEL_DIR,
                     metrics_file: Path = BASE_MODEL_METRICS, loss_file: Path = BASE_MODEL_LOSS,
                     timing: Path = timing_file("base_model")) -> dict:
    """Build (or fetch), train and score the base model; returns its metrics and timings."""
    set_threads(cfg.runtime)
    seed_everything(cfg.seed)
    train_examples, train_folder = read_split(BASE_SPLIT, "train", prepared)
    accelerator = make_accelerator(cfg.runtime)
    model, processor, optim = _load_or_build(cfg, train_examples)
    n_params = sum(p.numel() for p in model.parameters())
    metrics: dict = {"model": cfg.base.model, "parameters": n_params, "train_steps": 0}
    seconds = {"train_seconds": 0.0}
    with start_run("base_model", f"base_model-{cfg.base.model.replace('/', '_')}", params={**stage_params(cfg, "base_model"), **accelerate_params(accelerator)},
                   source="base") as run:
        losses: list[float] = []
        if optim is not None:
            buffer = MetricBuffer(run)

            def on_step(step: int, loss: float) -> None:
                buffer.add("train_loss", loss, step)

            result = train(model, processor, DetectionDataset(train_examples, train_folder, processor, cfg.runtime.image_cache_mb),
                           optim, cfg.runtime,
                           cfg.seed, accelerator=accelerator, desc="base_model: train", on_step=on_step)
            buffer.flush()
            model = accelerator.unwrap_model(model)
            losses = result.losses
            metrics["train_steps"] = result.steps
            seconds["train_seconds"] = round(result.seconds, 2)
        if not accelerator.is_main_process:
            return {}  # scoring and every write: process 0 only
        start = time.perf_counter()
        scorer = Scorer(model, processor, cfg.predict, cfg.base.eval_images, prepared)
        metrics.update(scorer.score(BASE_SPLIT, class_agnostic=True, desc="base_model: evaluate"))
        seconds["eval_seconds"] = round(time.perf_counter() - start, 2)
        write_base_model(model, processor, out_dir)
        write_text(loss_file, "step,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)))
        write_json(metrics_file, metrics)
        write_json(timing, seconds)
        run.log_metrics({k: float(v) for k, v in {**metrics, **seconds}.items() if isinstance(v, (int, float))})
    return {**metrics, **seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("base_model", __doc__)
    parser.add_argument("--prepared", type=Path, default=PREPARED_DIR, help=f"prepared data (default: {PREPARED_DIR})")
    parser.add_argument("--out", type=Path, default=BASE_MODEL_DIR, help=f"output folder (default: {BASE_MODEL_DIR})")
    args, cfg = parser.parse(argv)
    metrics = build_base_model(cfg, args.prepared, args.out)
    if not metrics:
        return metrics  # not process 0
    print(f"base_model: wrote {args.out} ({metrics['parameters']:,} parameters, {metrics['train_steps']} steps in "
          f"{metrics['train_seconds']:.0f} s; valid class-agnostic mAP50 {metrics['map50']:.3f}, "
          f"mAP50-95 {metrics['map50_95']:.3f}) and {BASE_MODEL_METRICS}")
    return metrics


if __name__ == "__main__":
    run_stage(main)
