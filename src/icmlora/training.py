"""The one training loop: Florence-2 (full or with a PEFT adapter) on Florence JSONL examples,
through Accelerate, so the same code runs on a CPU, one GPU (bf16) or several
(``accelerate launch``). Only the main process writes files or logs runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from icmlora.config import OptimizerParams, RuntimeParams
from icmlora.florence.format import Example
from icmlora.florence.model import encode, load_images
from icmlora.resume import TrainingState
from icmlora.runtime import make_accelerator, seed_everything


class DetectionDataset(Dataset):
    """The examples of one annotations file (images resolved against ``root``, its folder), as
    model inputs: image decoded and preprocessed, prompt and target tokenized.

    An example is encoded on first use and kept while the kept pixels fit ``cache_mb``, so later
    epochs, and later adapters trained on the same dataset in the same process, never decode or
    preprocess it again (the image processor works image by image, so a cached example equals a
    freshly encoded one bit for bit). ``cache_mb=0`` encodes every example each time it is drawn.
    """

    def __init__(self, examples: list[Example], root: Path, processor, cache_mb: int = 0):
        self.examples = examples
        self.root = Path(root)
        self.processor = processor
        self.cache_bytes = cache_mb * 2**20
        self.cached_bytes = 0
        self.cache: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def encode(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        inputs = encode(self.processor, load_images([self.root / ex.image]), [ex.prefix], [ex.suffix])
        return {k: v[0] for k, v in inputs.items()}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.cache.get(i)
        if item is None:
            item = self.encode(i)
            size = item["pixel_values"].numel() * item["pixel_values"].element_size()
            if self.cached_bytes + size <= self.cache_bytes:
                self.cache[i] = item
                self.cached_bytes += size
        return item


class Collate:
    """Stack encoded examples into a batch, padded as the processor pads a batch: token ids with
    the pad token on the tokenizer's padding side (attention mask 0), labels with -100."""

    def __init__(self, processor):
        self.pad_id = processor.tokenizer.pad_token_id
        self.left = processor.tokenizer.padding_side == "left"

    def _pad(self, rows: list[torch.Tensor], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
        for j, row in enumerate(rows):
            if self.left:
                out[j, width - len(row):] = row
            else:
                out[j, : len(row)] = row
        return out

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = {}
        for key in batch[0]:
            rows = [item[key] for item in batch]
            if key == "pixel_values":
                out[key] = torch.stack(rows)
            else:
                fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": -100}.get(key)
                out[key] = torch.stack(rows) if fill is None else self._pad(rows, fill)
        return out


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float]


def train(
    model,
    processor,
    dataset: DetectionDataset,
    optim: OptimizerParams,
    runtime: RuntimeParams,
    seed: int,
    *,
    accelerator=None,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    checkpoint_every: int = 0,
    state: TrainingState | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters for ``optim.steps`` steps (AdamW, linear warm-up
    then cosine decay, gradient clipping). Every ``checkpoint_every`` steps and at the end,
    ``on_checkpoint(step)`` runs and then, with a ``state``, the training state is saved; a
    ``state`` saved by the same run (same fingerprint) is resumed from."""
    accelerator = accelerator or make_accelerator(runtime)
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=optim.batch_size, shuffle=True, generator=generator,
                        collate_fn=Collate(processor), drop_last=len(dataset) >= optim.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)

    def schedule(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
        return 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    start_step = 0
    if state is not None and state.resumable():
        start_step = state.load(accelerator.unwrap_model(model), optimizer, scheduler, generator)["step"]
    model.train()
    losses: list[float] = []
    step = start_step
    start = time.perf_counter()
    bar = tqdm(total=optim.steps, initial=start_step, desc=desc, unit="step", disable=not accelerator.is_main_process)
    while step < optim.steps:
        # A resumed run draws a fresh order from the restored loader RNG rather than replaying
        # the rest of the interrupted epoch: deterministic given the saved state.
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                if accelerator.num_processes > 1:
                    # Each process's loss is the mean over its own target tokens and DDP averages the
                    # gradients: weighting by the token counts makes that the mean over the global
                    # batch's tokens, as one process computes it (halves rarely hold equal tokens).
                    tokens = (batch["labels"] != -100).sum()
                    total = accelerator.reduce(tokens.detach().clone(), reduction="sum")
                    loss = loss * tokens * accelerator.num_processes / total
                accelerator.backward(loss)
                if optim.grad_clip:
                    accelerator.clip_grad_norm_(params, optim.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step += 1
            value = accelerator.gather(loss.detach()).mean().item()
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
            if on_step is not None and accelerator.is_main_process:
                on_step(step, value)
            if step == optim.steps or (checkpoint_every and step % checkpoint_every == 0):
                accelerator.wait_for_everyone()
                if on_checkpoint is not None:
                    on_checkpoint(step)
                if state is not None and accelerator.is_main_process:
                    state.save(accelerator.unwrap_model(model), optimizer, scheduler, generator, step=step)
            if step >= optim.steps:
                break
    bar.close()
    return TrainResult(steps=step, seconds=time.perf_counter() - start, losses=losses)
