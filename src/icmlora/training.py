"""The one training loop: Florence-2 (full or with a PEFT adapter) on Florence JSONL examples,
through Accelerate, so the same code runs on a CPU, one GPU (bf16) or several
(``accelerate launch``). Only the main process writes files or logs runs.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from transformers.models.florence2.modeling_florence2 import shift_tokens_right

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

    def encode_many(self, indices) -> list[dict[str, torch.Tensor]]:
        """``[self.encode(i) for i in indices]``, the same tensors bit for bit, in one call of the
        processor (which works image by image, and pads the token rows that this unpads: a third of
        the time of one call per example)."""
        examples = [self.examples[i] for i in indices]
        inputs = encode(self.processor, load_images([self.root / ex.image for ex in examples]),
                        [ex.prefix for ex in examples], [ex.suffix for ex in examples])
        left = self.processor.tokenizer.padding_side == "left"
        items = []
        for j in range(len(examples)):
            item = {}
            for key, value in inputs.items():
                row = value[j]
                if key in ("input_ids", "attention_mask", "labels"):  # the padding off, on its side
                    kept = (inputs["attention_mask"][j] if key != "labels" else row != -100).nonzero().flatten()
                    row = row[int(kept[0]):] if left else row[:int(kept[-1]) + 1]
                item[key] = row.clone()
            items.append(item)
        return items

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
                missing = [i for i in indices if i not in self.cache]
                fresh = dict(zip(missing, self.encode_many(missing))) if missing else {}
                items = [self.cache[i] if i in self.cache else fresh[i] for i in indices]
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

    def join(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Collated batches one after another in one batch (token rows padded to the widest), so
        that batch k's rows are rows ``k * len(batch) ...`` of the result."""
        if len(batches) == 1:
            return batches[0]
        return self([{key: value[j] for key, value in batch.items()}
                     for batch in batches for j in range(len(next(iter(batch.values()))))])


def _split_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoRA linear layer's forward over rows split between its adapters (``route_adapters``): the
    base layer once over every row, then each adapter's update added to its own rows only, computed
    as PEFT's forward computes it for one adapter (so each block of rows gets the bits it gets alone).
    A layer that sees several rows per example (the vision tower's window attention: each example's
    windows, example after example) splits them in the same proportion."""
    result = self.base_layer(x, *args, **kwargs)
    examples = sum(self._icmlora_sizes)
    if len(x) % examples:
        raise ValueError(f"a LoRA layer got {len(x)} rows for a batch of {examples} examples: its input does not "
                         "hold a whole number of rows per example, so adapters cannot train together; set "
                         "runtime.lora_batch: 1")
    sizes = [size * (len(x) // examples) for size in self._icmlora_sizes]
    parts = []
    for name, rows, out in zip(self._icmlora_names, x.split(sizes), result.split(sizes)):
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        rows = self._cast_input_dtype(rows, lora_A.weight.dtype)
        parts.append((out + lora_B(lora_A(self.lora_dropout[name](rows))) * self.scaling[name]).to(out.dtype))
    return torch.cat(parts)


@contextmanager
def route_adapters(model, names: list[str], sizes: list[int]):
    """Within the block, a batch's rows go in blocks of ``sizes``, block k through adapter
    ``names[k]`` only, in every LoRA layer of ``model`` (PEFT's mixed-adapter batch in effect, which
    PEFT offers at inference only and by gathering rows; contiguous blocks are split as views, so the
    backward pass is a concatenation, not a scatter)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("route_adapters: the model has no LoRA layer")
    for layer in layers:
        if not isinstance(layer, LoraLinear) or any(n in layer.lora_variant for n in names) or layer.merged:
            raise ValueError(f"route_adapters: {type(layer).__name__} layers (or DoRA, merged weights) cannot train "
                             "adapters together: set runtime.lora_batch to 1")
        missing = [n for n in names if n not in layer.lora_A]
        if missing:
            raise ValueError(f"route_adapters: no adapter {missing[0]!r} in a LoRA layer")
    for layer in layers:
        layer._icmlora_names, layer._icmlora_sizes = list(names), list(sizes)
        layer.forward = _split_forward.__get__(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward, layer._icmlora_names, layer._icmlora_sizes


def adapter_losses(model, batches: list[dict[str, torch.Tensor]], names: list[str], collate: Collate,
                   core) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One forward pass of ``model`` over ``batches`` joined into one, batch k's rows through
    adapter ``names[k]`` only; returns (loss of each adapter: the mean over its own batch's target
    tokens, as the model computes a lone batch's loss; the count of those tokens). The sum of the
    losses has, for each adapter's parameters, the gradient of that adapter's loss alone."""
    if len(batches) != len(names):
        raise ValueError(f"adapter_losses: {len(batches)} batches for {len(names)} adapters")
    sizes = [len(b["labels"]) for b in batches]
    joined = collate.join(batches)
    if "image_features" in joined:
        joined = _embed_inputs(core, joined)
    # The decoder's inputs as the model makes them from the labels, which it is not given: it would
    # compute the whole batch's loss too, which no adapter trains on.
    labels = joined.pop("labels")
    text = core.config.text_config
    joined["decoder_input_ids"] = shift_tokens_right(labels, text.pad_token_id, text.decoder_start_token_id)
    with route_adapters(model, names, sizes):
        logits = model(**joined).logits
    losses, tokens, start = [], [], 0
    for size in sizes:
        rows = slice(start, start + size)
        start += size
        target = labels[rows].to(logits.device)
        losses.append(nn.functional.cross_entropy(logits[rows].float().reshape(-1, logits.shape[-1]),
                                                  target.reshape(-1), ignore_index=-100))
        tokens.append((target != -100).sum())
    return losses, tokens


class AdapterDropout(nn.Module):
    """``nn.Dropout`` drawing its masks from a generator of its own, bit for bit as
    ``torch.nn.functional.dropout`` draws them on an AMD CPU: element by element, a uniform double
    from the generator, kept when below 1 - p, scaled by 1 / (1 - p).

    Two reasons. One generator per adapter, seeded as training seeds torch's own, gives each adapter
    trained together with others the masks it draws when trained alone, whatever the others draw.
    And the same masks on every CPU: torch's CPU ``bernoulli_`` (what dropout draws with) takes MKL's
    own random stream on an Intel CPU and the uniform draws above on any other, so a LoRA trained with
    dropout differs between an Intel and an AMD host whatever kernels are pinned (icmlora.kernels);
    uniform draws follow the generator alone. (On a GPU, masks from the GPU's own generator.)"""

    def __init__(self, p: float, generator: torch.Generator):
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        draws = torch.empty(x.shape, dtype=torch.float64, device=x.device).uniform_(0, 1, generator=self.generator)
        noise = (draws < keep).to(x.dtype)
        noise.div_(keep)
        return x * noise


@contextmanager
def own_dropout(model, names: list[str], seed: int, device) -> dict[str, torch.Generator]:
    """Within the block, each named adapter's LoRA dropout draws from a generator of its own,
    seeded with ``seed`` (yields them by name, for a training state to save); the modules PEFT made
    are put back after."""
    from peft.tuners.lora import LoraLayer

    generators = {name: torch.Generator(device=device).manual_seed(seed) for name in names}
    swapped = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in names:
                dropout = module.lora_dropout[name]
                if isinstance(dropout, nn.Dropout):
                    module.lora_dropout[name] = AdapterDropout(dropout.p, generators[name])
                    swapped.append((module, name, dropout))
    try:
        yield generators
    finally:
        for module, name, dropout in swapped:
            module.lora_dropout[name] = dropout


def _lora_adapters(model) -> list[str]:
    """The active adapters of a PEFT LoRA model ([] for any other model)."""
    from peft.tuners.lora import LoraLayer

    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        return []
    active = model.active_adapters if hasattr(model, "active_adapters") else []
    return [active] if isinstance(active, str) else list(active)


def adapter_parameters(model, name: str) -> list[nn.Parameter]:
    """The parameters of one named adapter of a PEFT model (its LoRA A and B in every layer)."""
    params = [p for n, p in model.named_parameters() if f".lora_A.{name}." in n or f".lora_B.{name}." in n]
    if not params:
        raise ValueError(f"the model has no adapter named {name!r}")
    return params


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list  # per step: the loss, or with several adapters the list of their losses


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
    adapters: list[tuple[str, OptimizerParams]] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters for ``optim.steps`` steps (AdamW, linear warm-up
    then cosine decay, gradient clipping). Every ``checkpoint_every`` steps and at the end,
    ``on_checkpoint(step)`` runs and then, with a ``state``, the training state is saved; a
    ``state`` saved by the same run (same fingerprint) is resumed from. ``bar_position``: the progress
    bar's line, for processes training side by side (``runtime.lora_workers``).

    ``adapters``: several (name, optimizer params) of a PEFT model trained together, one forward and
    backward pass a step (``runtime.lora_batch``): each step's batch goes through each adapter as its
    own copy (``adapter_losses``), each adapter has its own loss, learning rate (its own parameter
    group of AdamW, whose state is per parameter) and gradient clipping, so each trains as it would
    alone: each draws its LoRA dropout masks from a generator of its own (``own_dropout``), as alone
    from torch's, so on a CPU each adapter comes out as alone, bit for bit where the joined pass's
    matrix products sum as the lone pass's do (measured: tests/test_lora_batch.py). Their steps, batch
    size, warm-up and weight decay must be ``optim``'s. ``on_step`` then gets the list of their losses."""
    for name, own in adapters or []:
        if own.model_copy(update={"lr": optim.lr}) != optim:
            raise ValueError(f"adapter {name}: adapters trained together differ only in lr ({own} vs {optim})")
    accelerator = accelerator or make_accelerator(runtime)
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    collate = Collate(processor)
    loader = DataLoader(dataset, batch_size=optim.batch_size, shuffle=True, generator=generator,
                        collate_fn=collate, drop_last=len(dataset) >= optim.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if adapters:
        groups = [adapter_parameters(model, name) for name, _ in adapters]
        if sum(map(len, groups)) != len(params):
            raise ValueError("every trainable parameter must belong to one of the adapters trained together")
        optimizer = torch.optim.AdamW([{"params": group, "lr": own.lr} for group, (_, own) in zip(groups, adapters)],
                                      lr=optim.lr, weight_decay=optim.weight_decay)
    else:
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
    # A LoRA's dropout draws from a generator of its own (each adapter's, when several train together),
    # seeded as torch's is (seed_everything above): the masks it would draw from torch's on an AMD CPU,
    # on any CPU (AdapterDropout); a training state keeps the generators.
    names = [name for name, _ in adapters] if adapters else _lora_adapters(accelerator.unwrap_model(model))
    with (own_dropout(accelerator.unwrap_model(model), names, seed, accelerator.device) if names
          else nullcontext({})) as dropouts:
        start_step, skip = 0, 0
        if state is not None and state.resumable():
            # The state holds the loader RNG as it was when the interrupted epoch began and how many of
            # its batches were trained: that epoch's order is drawn again and those batches are passed
            # over, so a resumed run trains on what the uninterrupted run trains on, batch for batch. (A
            # state without the count, written before it was kept, starts a fresh order instead.)
            extra = state.load(accelerator.unwrap_model(model), optimizer, scheduler, generator, dropouts)
            start_step, skip = extra["step"], extra.get("epoch_batches", 0)
        model.train()
        losses: list[float] = []
        step = start_step
        start = time.perf_counter()
        bar = tqdm(total=optim.steps, initial=start_step, desc=desc, unit="step",
                   disable=not accelerator.is_main_process, position=bar_position)
        while step < optim.steps:
            epoch_start = generator.get_state()  # the epoch's order is drawn from here as the loader starts
            batches, into = iter(loader), 0
            if skip:  # loading a batch draws nothing from torch's RNG: dropout's stream stays the saved one
                for _ in range(skip):
                    next(batches)
                into, skip = skip, 0
            for batch in batches:
                into += 1
                with accelerator.accumulate(model):
                    if adapters:
                        each, tokens = adapter_losses(model, [batch] * len(names), names, collate, core)
                    else:
                        if "image_features" in batch:
                            batch = _embed_inputs(core, batch)
                        each, tokens = [model(**batch).loss], [(batch["labels"] != -100).sum()]
                    if accelerator.num_processes > 1:
                        # Each process's loss is the mean over its own target tokens and DDP averages the
                        # gradients: weighting by the token counts makes that the mean over the global
                        # batch's tokens, as one process computes it (halves rarely hold equal tokens).
                        totals = [accelerator.reduce(t.detach().clone(), reduction="sum") for t in tokens]
                        each = [loss * t * accelerator.num_processes / total
                                for loss, t, total in zip(each, tokens, totals)]
                    accelerator.backward(each[0] if len(each) == 1 else torch.stack(each).sum())
                    if optim.grad_clip and adapters:
                        accelerator.unscale_gradients()  # once a step (a GradScaler refuses a second unscale)
                        for group in optimizer.param_groups:  # each adapter clipped on its own
                            torch.nn.utils.clip_grad_norm_(group["params"], optim.grad_clip)
                    elif optim.grad_clip:
                        accelerator.clip_grad_norm_(params, optim.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                step += 1
                gathered = [accelerator.gather(loss.detach()).mean().item() for loss in each]
                value = gathered if adapters else gathered[0]
                losses.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{sum(gathered) / len(gathered):.3f}")
                if on_step is not None and accelerator.is_main_process:
                    on_step(step, value)
                if step == optim.steps or (checkpoint_every and step % checkpoint_every == 0):
                    accelerator.wait_for_everyone()
                    if on_checkpoint is not None:
                        on_checkpoint(step)
                    if state is not None and accelerator.is_main_process:
                        state.save(accelerator.unwrap_model(model), optimizer, scheduler,
                                   torch.Generator().set_state(epoch_start), dropouts, step=step, epoch_batches=into)
                if step >= optim.steps:
                    break
        bar.close()
    return TrainResult(steps=step, seconds=time.perf_counter() - start, losses=losses)
