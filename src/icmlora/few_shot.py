"""Few-shot LoRA: what a user with a new task's k labelled examples would try instead of a generator.

The ``k`` support examples are the ones the task vector reads (the first ``task_vectors.examples``
of the task's train split): the generator and this baseline get the same information. A LoRA of the
pipeline's kind (``lora``: targets, alpha, init, batch size, warm-up, clipping) is trained on them
alone; its learning rate and step count are chosen on the support examples only, by k-fold cross-
validation over them (train on the other folds, score the held-back fold), never on the query (valid)
split every baseline is scored on:

- every learning rate of ``few_shot.lrs`` trains one run per fold, ``few_shot.steps`` steps (warm-up,
  then cosine decay over them), snapshotted every ``few_shot.select_every`` steps; a fold's runs, every
  rank of ``lora.ranks`` with every lr, train together, one forward and backward pass a step, each as it
  would alone (``fit``; on a CPU bit for bit), ``runtime.lora_batch`` of them a pass (0 = all, 1 = one
  after the other, as train_lora's ranks);
- each (lr, step) is scored by its mean mAP50 over the folds; the best wins (ties: fewer steps, then
  the smaller lr);
- the chosen lr trains on all k examples on the same schedule, and its weights at the chosen step are
  the adapter.

The stage records per task and rank the support examples' names, the choice and every candidate's
cross-validated mAP50 (metrics/few_shot.json), and the seconds (metrics/timing/few_shot.json): of
choosing (each rank's share of its task's), and of the chosen adapter's own training, alone, up to its
step (what a user who knew the settings would pay).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from icmlora.artifacts import PREPARED_DIR
from icmlora.artifacts.annotations import read_split
from icmlora.config import FewShotParams, LoraParams, PredictParams, RuntimeParams
from icmlora.errors import InputError
from icmlora.florence.format import Example
from icmlora.florence.predict import predict
from icmlora.images import load_images
from icmlora.lora import peft_config
from icmlora.metrics import detection_metrics
from icmlora.training import DetectionDataset, train


def support_examples(task: str, count: int, prepared: Path = PREPARED_DIR) -> tuple[list[Example], Path]:
    """The task's k support examples (the first ``count`` of its train split: the ones ``task_vectors``
    reads) and the folder their images are relative to."""
    examples, folder = read_split(task, "train", prepared)
    if len(examples) < count:
        raise InputError(f"{folder}: {len(examples)} train examples of {task}, but few_shot needs task_vectors.examples "
                         f"= {count} support examples; lower task_vectors.examples or add examples")
    return examples[:count], folder


def fold_indices(count: int, folds: int) -> list[list[int]]:
    """Example indices held back in each fold: example i in fold i % folds (every fold non-empty)."""
    if not 2 <= folds <= count:
        raise InputError(f"few_shot.folds is {folds}: it must be between 2 and the {count} support examples")
    return [list(range(f, count, folds)) for f in range(folds)]


def stops(params: FewShotParams) -> list[int]:
    """The candidate step counts: every ``select_every`` steps up to ``steps`` (``steps`` included)."""
    found = list(range(params.select_every, params.steps + 1, params.select_every))
    return found if found and found[-1] == params.steps else [*found, params.steps]


@dataclass
class Fit:
    snapshots: dict[int, dict[str, torch.Tensor]]  # step -> the LoRA's weights then
    seconds: dict[int, float]  # step -> seconds from the start of training (model wrapping included; of the whole
    # pass when several trained together)


def fit(base, processor, examples: list[Example], folder: Path, lora: LoraParams, runs: list[tuple[int, float]],
        params: FewShotParams, runtime: RuntimeParams, seed: int, accelerator) -> tuple[dict[tuple[int, float], Fit], object]:
    """Train one LoRA per (rank, lr) of ``runs`` on ``examples`` and snapshot each at every candidate
    step; returns {(rank, lr): fit} and the base model, unwrapped again. Several train together, one
    forward and backward pass a step (``icmlora.training.train``'s ``adapters``), each from the initial
    A it gets alone, with its own lr, clipping and dropout generator: each as it would train alone (on a
    CPU bit for bit, tests/test_few_shot.py; on a GPU within float rounding)."""
    from peft import get_peft_model, get_peft_model_state_dict

    start = time.perf_counter()
    torch.manual_seed(seed)  # the LoRA's initial A: seeded like the pipeline's (before the model is wrapped)
    names = ["default"] if len(runs) == 1 else [f"r{rank}-lr{i}" for i, (rank, _) in enumerate(runs)]
    initial = torch.get_rng_state()
    model = None
    for name, (rank, _) in zip(names, runs):
        torch.set_rng_state(initial)  # every adapter's A drawn as it is alone
        if model is None:
            model = get_peft_model(base, peft_config(lora, rank), adapter_name=name)
        else:
            model.add_adapter(name, peft_config(lora, rank))
    if len(names) > 1:
        model.base_model.set_adapter(names)  # every adapter trainable
    optims = [lora.train.model_copy(update={"lr": lr, "steps": params.steps}) for _, lr in runs]
    dataset = DetectionDataset(examples, folder, processor, runtime.image_cache_mb)
    wanted = set(stops(params))
    result = {run: Fit({}, {}) for run in runs}

    def on_checkpoint(step: int) -> None:
        if step in wanted:
            for name, run in zip(names, runs):
                state = get_peft_model_state_dict(accelerator.unwrap_model(model), adapter_name=name)
                result[run].snapshots[step] = {k: v.detach().clone() for k, v in state.items()}
                result[run].seconds[step] = time.perf_counter() - start

    train(model, processor, dataset, optims[0], runtime, seed, accelerator=accelerator,
          desc=f"few_shot {' '.join(f'r{rank} lr={lr:g}' for rank, lr in runs)}" if len(runs) < 3
          else f"few_shot {len(runs)} LoRAs", on_checkpoint=on_checkpoint, checkpoint_every=params.select_every,
          adapters=list(zip(names, optims)) if len(names) > 1 else None)
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return result, model.unload()


def map50(model, processor, examples: list[Example], images: list, predict_params: PredictParams) -> float:
    """mAP50 (strict labels) of the model as it is on these examples."""
    preds = predict(model, processor, images, predict_params, desc="few_shot: score a fold")
    return detection_metrics([e.boxes for e in examples], preds, [(e.width, e.height) for e in examples])["map50"]


def candidate(lr: float, step: int) -> str:
    """A candidate's key in few_shot.json's ``cv_map50``."""
    return f"lr={lr:g},steps={step}"


def choose(scores: dict[tuple[float, int], float]) -> tuple[float, int]:
    """The (lr, step) of the best mean mAP50; ties go to fewer steps, then the smaller lr."""
    return max(scores, key=lambda key: (scores[key], -key[1], -key[0]))


def select_and_fit(base, processor, task: str, ranks: list[int], lora: LoraParams, params: FewShotParams,
                   runtime: RuntimeParams, predict_params: PredictParams, support: int, seed: int, accelerator,
                   prepared: Path = PREPARED_DIR):
    """For each rank, choose (lr, step) by k-fold over the support examples, then train on all of them.
    A fold's runs, every rank with every lr, train ``runtime.lora_batch`` a pass (0: all; ``fit``). Returns ({rank: (weights,
    record, seconds)}, base): what was chosen and why (the same on any run), and the wall clock: the
    seconds of choosing are each rank's share of the task's (its ranks are chosen together), those of
    training the chosen adapter its own (trained alone, as a user who knew the settings would)."""
    from peft import get_peft_model, set_peft_model_state_dict

    examples, folder = support_examples(task, support, prepared)
    images = load_images([folder / e.image for e in examples])
    start = time.perf_counter()
    scores: dict[int, dict[tuple[float, int], list[float]]] = {rank: {} for rank in ranks}
    for f, held in enumerate(fold_indices(len(examples), params.folds)):
        kept = [e for i, e in enumerate(examples) if i not in held]
        wanted = [(rank, lr) for rank in ranks for lr in params.lrs]
        size = runtime.lora_batch or len(wanted)  # as train_lora's ranks: 0 = all in one pass, 1 = each alone
        runs: dict[tuple[int, float], Fit] = {}
        for i in range(0, len(wanted), size):
            part, base = fit(base, processor, kept, folder, lora, wanted[i:i + size], params, runtime, seed + f,
                             accelerator)
            runs.update(part)
        for rank in ranks:
            model = get_peft_model(base, peft_config(lora, rank))
            for lr in params.lrs:
                for step, weights in runs[(rank, lr)].snapshots.items():
                    set_peft_model_state_dict(model, weights)
                    value = map50(model, processor, [examples[i] for i in held], [images[i] for i in held],
                                  predict_params)
                    scores[rank].setdefault((lr, step), []).append(value)
            base = model.unload()
    choosing = (time.perf_counter() - start) / len(ranks)
    chosen = {}
    for rank in ranks:
        mean = {key: sum(v) / len(v) for key, v in scores[rank].items()}
        lr, step = choose(mean)
        finals, base = fit(base, processor, examples, folder, lora, [(rank, lr)], params, runtime, seed, accelerator)
        final = finals[(rank, lr)]
        record = {"support": [e.image for e in examples], "lr": lr, "steps": step,
                  "cv_map50": {candidate(*k): round(v, 6) for k, v in sorted(mean.items())}}
        seconds = {"select_seconds": round(choosing, 2), "train_seconds": round(final.seconds[step], 2)}
        chosen[rank] = (final.snapshots[step], record, seconds)
    return chosen, base
