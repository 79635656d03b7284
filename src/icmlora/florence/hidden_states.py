"""Task vectors from Florence-2's own hidden states (the last decoder layer).

Used by the ``task_vectors`` stage for every task, and by ``generate --examples`` for a task the
pipeline never saw, so both compute a vector the same way.

- ``icl_vectors``: the *base* model reads k labelled examples of a task; per example, states are
  pooled five ways. ``match``: the base describes the example image itself (greedy ``<OD>``) and
  the state at the position where it names the object that overlaps a labelled box best is
  taken: how the base sees the task's objects. ``object``: that state and the four that write
  the object's box, so the vector also carries the objects' size. ``last`` / ``mean`` / ``label``: the image and the
  target text are teacher-forced, and the state at the last target position, the mean over
  target positions, or the states right after the target's category-name tokens are taken.
- ``reference_vectors``: the paper's code: a tuned adapter generates; last position's state.
- ``text_vector``: the text encoder's mean state on a few descriptions of the task.
"""

from __future__ import annotations

import torch

from icmlora.florence.format import Box
from icmlora.florence.model import encode
from icmlora.florence.predict import TokenReader
from icmlora.metrics import MATCH_IOU, box_iou

POOLINGS = ("last", "mean", "label", "match", "object")
TEXT_TEMPLATES = ("Locate the {} in the image.", "Find every {}.", "Detect {} objects.", "Where is the {}?")


class LastDecoderLayer:
    """Records the output of the last decoder layer (a [B, T, d] tensor) during a forward."""

    def __init__(self, model):
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.layer = core.model.language_model.decoder.layers[-1]
        self.outputs: list[torch.Tensor] = []

    def __enter__(self):
        # Kept on the CPU in float32, wherever the model runs.
        self.handle = self.layer.register_forward_hook(
            lambda _m, _i, out: self.outputs.append((out[0] if isinstance(out, tuple) else out).detach().float().cpu()))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def named_objects(reader: TokenReader, sequence: list[int], width: int, height: int
                  ) -> list[tuple[int, Box, tuple[int, ...]]]:
    """(position whose state predicts the object's name, its box, the positions whose states
    predict its four locations) for each object a generated decoder sequence names.
    ``sequence[0]`` is the decoder start token; the state at position j predicts
    ``sequence[j + 1]``, so the state that predicts a piece is one before it. Only the first box
    of a phrase has its own name."""
    return [(1 + parsed.label_positions[-1] - 1, parsed.box(width, height), tuple(parsed.loc_positions))
            for parsed in reader.parse(sequence[1:]) if parsed.opens_phrase]


def _match_vectors(model, inputs: dict, examples, reader: TokenReader, max_new_tokens: int
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``match`` and ``object`` pooling: per-example vectors [k, d] each, and the fraction of
    labelled boxes matched at IoU >= 0.5. ``match`` takes the state where the base names the object
    that overlaps a labelled box best; ``object`` that one and the four that write its box (its
    size and place). An example whose description boxes nothing uses the state that starts it."""
    sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    with LastDecoderLayer(model) as hook:
        model(**inputs, decoder_input_ids=sequences)  # position j's state predicts sequences[:, j + 1]
    hidden = hook.outputs[-1]
    sequences = sequences.cpu()
    vectors, objects, matched, total = [], [], 0, 0
    for row, (example, seq) in enumerate(zip(examples, sequences.tolist())):
        named = named_objects(reader, seq, example.width, example.height)
        picks, spans = [], []
        for box in example.boxes:
            total += 1
            if not named:
                continue
            overlap, position, locs = max((box_iou(b, box), j, locs) for j, b, locs in named)
            matched += overlap >= MATCH_IOU
            picks.append(position)
            spans += [position, *locs]
        vectors.append(hidden[row, picks].mean(0) if picks else hidden[row, 0])
        objects.append(hidden[row, spans].mean(0) if spans else hidden[row, 0])
    return torch.stack(vectors), torch.stack(objects), matched / max(total, 1)


def _on_device(model, batch: dict) -> dict:
    """``batch``'s tensors where the model is (pixels in its dtype)."""
    p = next(model.parameters())
    return {k: v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device) for k, v in batch.items()}


@torch.no_grad()
def icl_vectors(model, processor, examples, images, max_new_tokens: int = 48) -> dict[str, torch.Tensor]:
    """Per-example vectors [k, d] for every pooling (on the CPU), and ``matched`` (match pooling's
    fraction of labelled boxes the base named at IoU >= 0.5). Runs where the model is."""
    batch = encode(processor, images, [e.prefix for e in examples], [e.suffix for e in examples])
    labels = batch["labels"]
    inputs = _on_device(model, {k: v for k, v in batch.items() if k != "labels"})
    with LastDecoderLayer(model) as hook:
        model(**inputs, labels=labels.to(next(model.parameters()).device))
    hidden = hook.outputs[-1]  # [k, T, d], position t is the state after reading labels[:t] (shifted)
    mask = (labels != -100).float()
    last = mask.sum(1).long() - 1
    # Category-name tokens (not <loc_N>, not special): the state one position later has read them.
    tok = processor.tokenizer
    reader = TokenReader(tok)
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    is_name = torch.tensor([[t not in special and t != -100 and t not in reader.loc_bins for t in row]
                            for row in labels.tolist()])
    name_mask = torch.zeros_like(mask)
    name_mask[:, 1:] = is_name[:, :-1].float()
    name_mask = torch.where(name_mask.sum(1, keepdim=True) > 0, name_mask, mask)  # no box: fall back to all positions
    match, objects, matched = _match_vectors(model, inputs, examples, reader, max_new_tokens)
    return {
        "last": hidden[torch.arange(len(examples)), last],
        "mean": (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
        "label": (hidden * name_mask[..., None]).sum(1) / name_mask.sum(1, keepdim=True),
        "match": match,
        "object": objects,
        "matched": torch.tensor(matched),
    }


@torch.no_grad()
def reference_vectors(model, processor, examples, images, max_new_tokens: int) -> torch.Tensor:
    """The paper's code: the tuned adapter generates; last decoder layer, last position."""
    inputs = _on_device(model, dict(processor(text=[e.prefix for e in examples], images=images, return_tensors="pt")))
    with LastDecoderLayer(model) as hook:
        model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    # One hook call per generated position; the last call holds the final position of each sequence.
    return hook.outputs[-1][:, -1]


@torch.no_grad()
def text_vector(model, processor, task: str) -> torch.Tensor:
    """[templates, d]: the text encoder's mean state on a few descriptions of the task."""
    tok = _on_device(model, dict(processor.tokenizer([t.format(task) for t in TEXT_TEMPLATES], return_tensors="pt",
                                                     padding=True)))
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = core.model.language_model.encoder
    hidden = encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state.float().cpu()
    mask = tok["attention_mask"][..., None].float().cpu()
    return (hidden * mask).sum(1) / mask.sum(1)
