"""The one training loop: Florence-2 (full or with a PEFT adapter) on Florence JSONL examples,
through Accelerate, so the same code runs on a CPU, one GPU (bf16) or several
(``accelerate launch``). Only the main process writes files or logs runs.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from icmlora.config import OptimizerParams, RuntimeParams
from icmlora.florence.format import Example
from icmlora.florence.model import encode
from icmlora.images import load_images
from icmlora.resume import TrainingState
from icmlora.runtime import make_accelerator, seed_everything


class DetectionDataset(Dataset):
    """The examples of one annotations file (images resolved against ``root``, its folder), as
    model inputs: image decoded and preprocessed, prompt and target tokenized.

    An example is encoded on first use and kept while the kept pixels fit ``cache_mb``, so later
    epochs, and later adapters trained on the same dataset in the same process, never decode or
    preprocess it again (the image processor works image by image, so a cached example equals a
    freshly encoded one bit for bit). ``cache_mb=0`` encodes every example each time it is drawn.

    When training cannot change the image features (``frozen_image_features``: a LoRA on the
    language model), ``cache_image_features`` runs the vision tower once over every example and
    keeps its output in place of the pixels (within the same ``cache_mb``): each step then skips
    the vision tower, about a third of a LoRA step on the tiny model.
    """

    def __init__(self, examples: list[Example], root: Path, processor, cache_mb: int = 0):
        self.examples = examples
        self.root = Path(root)
        self.processor = processor
        self.cache_bytes = cache_mb * 2**20
        self.cached_bytes = 0
        self.cache: dict[int, dict[str, torch.Tensor]] = {}
        self.features: torch.Tensor | None = None  # [examples, image tokens, width], with self.text
        self.text: list[dict[str, torch.Tensor]] = []
        self.features_digest = ""
        self.features_unfit = ""  # the digest of weights whose features did not fit cache_mb

    def __len__(self) -> int:
        return len(self.examples)

    def encode(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        inputs = encode(self.processor, load_images([self.root / ex.image]), [ex.prefix], [ex.suffix])
        return {k: v[0] for k, v in inputs.items()}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.features is not None:
            return {**self.text[i], "image_features": self.features[i]}
        item = self.cache.get(i)
        if item is None:
            item = self.encode(i)
            size = item["pixel_values"].numel() * item["pixel_values"].element_size()
            if self.cached_bytes + size <= self.cache_bytes:
                self.cache[i] = item
                self.cached_bytes += size
        return item


    def cache_image_features(self, model, batch_size: int, accelerator) -> bool:
        """Run ``model``'s vision tower and projector over every example, in fixed batches in
        order (so a resumed run computes the same values), and serve their output instead of the
        pixels, which are let go as their features are computed. The features are kept with a
        digest of the weights that made them: a later adapter on the same base reuses them,
        another base recomputes them. Returns False, and keeps serving pixels, when they would not
        fit ``cache_mb`` (found from the first batch, and remembered for these weights)."""
        core = _florence(accelerator.unwrap_model(model))
        digest = _weights_digest(core.vision_tower, core.multi_modal_projector)
        if self.features is not None and self.features_digest == digest:
            return True
        self.drop_image_features()
        if self.features_unfit == digest or not len(self):
            return False
        features: torch.Tensor | None = None
        text: list[dict[str, torch.Tensor]] = []
        with torch.no_grad(), accelerator.autocast():
            for lo in tqdm(range(0, len(self), batch_size), desc="image features", unit="batch",
                           disable=not accelerator.is_main_process, leave=False):
                indices = range(lo, min(len(self), lo + batch_size))
                items = [self.cache.get(i) or self.encode(i) for i in indices]
                pixels = torch.stack([item["pixel_values"] for item in items]).to(accelerator.device)
                out = core.get_image_features(pixels).pooler_output
                if features is None:
                    if len(self) * out[0].numel() * out.element_size() > self.cache_bytes:
                        self.features_unfit = digest
                        return False
                    features = torch.empty((len(self), *out.shape[1:]), dtype=out.dtype)
                features[lo : lo + len(items)] = out.cpu()
                text += [{k: v for k, v in item.items() if k != "pixel_values"} for item in items]
                for i in indices:  # these pixels are not needed any more
                    dropped = self.cache.pop(i, None)
                    if dropped is not None:
                        self.cached_bytes -= dropped["pixel_values"].numel() * dropped["pixel_values"].element_size()
        self.features, self.text, self.features_digest = features, text, digest
        return True

    def drop_image_features(self) -> None:
        """Serve pixels again (for a model whose training can change the image features)."""
        self.features, self.text, self.features_digest = None, [], ""


def _florence(model):
    """The Florence2Model inside a Florence2ForConditionalGeneration, PEFT-wrapped or not."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.model


def _weights_digest(*modules: nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def frozen_image_features(model) -> bool:
    """Whether training ``model`` leaves its image features as they are: no trainable parameter in
    the vision tower, the projector or the token embeddings, and nothing in the first two that is
    random or keeps state in train mode (dropout, drop path, batch norm). True for a LoRA on the
    language model of the tiny model; Florence-2-base's vision tower has drop path 0.1, so its
    features change from step to step in train mode and are computed every step."""
    core = _florence(model)
    parts = [core.vision_tower, core.multi_modal_projector]
    # parameters(), not .weight: a PEFT LoRA on the embeddings trains lora_embedding_A/B beside a frozen weight.
    if any(p.requires_grad for m in [core.get_input_embeddings(), *parts] for p in m.parameters()):
        return False
    for module in (m for part in parts for m in part.modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return False
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return False
        if getattr(module, "drop_prob", 0.0) > 0:
            return False
    return True


def _embed_inputs(core, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch with cached image features as the model's inputs: the prompt's token embeddings
    with the features written over the image tokens, as Florence2Model.forward does."""
    batch = dict(batch)
    features, input_ids = batch.pop("image_features"), batch.pop("input_ids")
    with torch.no_grad():
        embeds = core.get_input_embeddings()(input_ids)
        features = features.to(embeds.device, embeds.dtype)
        mask = core.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
        batch["inputs_embeds"] = embeds.masked_scatter(mask, features)
    return batch


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
            if key in ("pixel_values", "image_features"):
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
    bar_position: int | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters for ``optim.steps`` steps (AdamW, linear warm-up
    then cosine decay, gradient clipping). Every ``checkpoint_every`` steps and at the end,
    ``on_checkpoint(step)`` runs and then, with a ``state``, the training state is saved; a
    ``state`` saved by the same run (same fingerprint) is resumed from. ``bar_position``: the progress
    bar's line, for processes training side by side (``runtime.lora_workers``)."""
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
    core = _florence(accelerator.unwrap_model(model))
    if frozen_image_features(accelerator.unwrap_model(model)) and dataset.cache_bytes:
        dataset.cache_image_features(model, optim.batch_size, accelerator)
    else:
        dataset.drop_image_features()  # features a previous adapter kept would not follow this training
    start_step, skip = 0, 0
    if state is not None and state.resumable():
        # The state holds the loader RNG as it was when the interrupted epoch began and how many of
        # its batches were trained: that epoch's order is drawn again and those batches are passed
        # over, so a resumed run trains on what the uninterrupted run trains on, batch for batch. (A
        # state without the count, written before it was kept, starts a fresh order instead.)
        extra = state.load(accelerator.unwrap_model(model), optimizer, scheduler, generator)
        start_step, skip = extra["step"], extra.get("epoch_batches", 0)
    model.train()
    losses: list[float] = []
    step = start_step
    start = time.perf_counter()
    bar = tqdm(total=optim.steps, initial=start_step, desc=desc, unit="step", disable=not accelerator.is_main_process,
               position=bar_position)
    while step < optim.steps:
        epoch_start = generator.get_state()  # the epoch's order is drawn from here as the loader starts
        batches, into = iter(loader), 0
        if skip:  # loading a batch draws nothing from torch's RNG: dropout's stream stays the saved one
            for _ in range(skip):
                next(batches)
            into, skip = skip, 0
        for batch in batches:
            into += 1
            if "image_features" in batch:
                batch = _embed_inputs(core, batch)
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
                    state.save(accelerator.unwrap_model(model), optimizer, scheduler,
                               torch.Generator().set_state(epoch_start), step=step, epoch_batches=into)
            if step >= optim.steps:
                break
    bar.close()
    return TrainResult(steps=step, seconds=time.perf_counter() - start, losses=losses)
