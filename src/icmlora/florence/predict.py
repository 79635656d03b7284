"""Batched ``<OD>`` inference with a confidence score per box.

Generated tokens are read by the format's one parser (``florence.format.parse_pieces``), the
way ``Florence2PostProcessor`` reads ``<OD>`` output, but coordinates stay at the bin centre
as floats and each box gets a score: the mean probability of its label tokens and its four
location tokens. With a constant score (the reference code's 1.0) mAP collapses to a single
operating point.

``encode_images`` runs the processor and the vision tower once over a list of images; ``predict``
given its output skips both (transformers' ``mm_encoder_outputs``): for scoring many adapters on the
same images when no adapter is in the image path (``image_features_fixed``).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from icmlora.config import PredictParams
from icmlora.florence.format import NUM_BINS, OD_PROMPT, Box, Loc, ParsedBox, parse_pieces


class TokenReader:
    """Generated token ids -> the parser's pieces: ``Loc`` for ``<loc_N>``, None for ``<s>``,
    the id itself for any other token; reading stops at ``</s>`` or padding."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.loc_bins = {tokenizer.convert_tokens_to_ids(f"<loc_{i}>"): i for i in range(NUM_BINS)}
        self.stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        self.skip = {tokenizer.bos_token_id}

    def pieces(self, ids: list[int]) -> list[object]:
        out: list[object] = []
        for tid in ids:
            if tid in self.stop:
                break
            out.append(None if tid in self.skip else Loc(self.loc_bins[tid]) if tid in self.loc_bins else tid)
        return out

    def parse(self, ids: list[int]) -> list[ParsedBox]:
        return parse_pieces(self.pieces(ids), self.tokenizer.decode)

    def boxes(self, ids: list[int], probs: list[float], width: int, height: int) -> list[Box]:
        """Scored boxes: each box's score is the mean probability of its label and location tokens."""
        out = []
        for parsed in self.parse(ids):
            p = [probs[i] for i in (*parsed.label_positions, *parsed.loc_positions)]
            out.append(parsed.box(width, height, sum(p) / len(p)))
        return out


def image_features_fixed(model) -> bool:
    """Whether ``model``'s image features stay its base's whatever adapter weights are loaded into it:
    a PEFT model with no adapter layer (a LoRA or other tuner layer, or a ``modules_to_save`` copy) in
    its vision tower or projector. A plain model: False (nothing says its weights stay as they are)."""
    if not hasattr(model, "get_base_model"):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    core = model.get_base_model().model
    return not any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))
                   for part in (core.vision_tower, core.multi_modal_projector) for m in part.modules())


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_images(model, processor, images, params: PredictParams, *, prompt: str = OD_PROMPT):
    """For each batch ``predict`` would make of ``images``: the prompt's token ids and attention mask
    and the vision tower + projector's output for the batch's images (``image_features``, on the
    CPU), computed as ``generate`` computes them. Yields batch by batch, so a caller can stop early."""
    model.eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device, dtype = _device_dtype(model)
    for start in range(0, len(images), params.batch_size):
        batch = images[start : start + params.batch_size]
        inputs = dict(processor(text=[prompt] * len(batch), images=batch, return_tensors="pt"))
        pixels = inputs.pop("pixel_values").to(device, dtype)
        inputs["image_features"] = base.get_image_features(pixels).pooler_output.cpu()
        yield inputs


@torch.no_grad()
def predict(model, processor, images, params: PredictParams, *, desc: str = "predict", prompt: str = OD_PROMPT,
            encoded: list[dict[str, torch.Tensor]] | None = None) -> list[list[Box]]:
    """Scored boxes for each PIL image (sizes are taken from the images). ``encoded``, what
    ``encode_images`` gave for these images, prompt and batch size, takes the place of the processor
    and the vision tower (the same boxes, bit for bit, when no adapter is in the image path)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model.eval()
    reader = TokenReader(processor.tokenizer)
    device, dtype = _device_dtype(model)
    sizes = [len(images[start : start + params.batch_size]) for start in range(0, len(images), params.batch_size)]
    if encoded is not None and [len(e["input_ids"]) for e in encoded] != sizes:
        raise ValueError(f"encoded holds batches of {[len(e['input_ids']) for e in encoded]} images, but these "
                         f"{len(images)} images at batch size {params.batch_size} make batches of {sizes}: "
                         f"encode_images must get the same images and batch size")
    results: list[list[Box]] = []
    for i, start in enumerate(tqdm(range(0, len(images), params.batch_size), desc=desc, unit="batch", leave=False)):
        batch = images[start : start + params.batch_size]
        if encoded is None:
            inputs = processor(text=[prompt] * len(batch), images=batch, return_tensors="pt")
            inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        else:
            inputs = {k: v.to(device) for k, v in encoded[i].items() if k != "image_features"}
            features = encoded[i]["image_features"].to(device, dtype)
            inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        out = model.generate(**inputs, max_new_tokens=params.max_new_tokens, num_beams=params.num_beams, do_sample=False,
                             return_dict_in_generate=True, output_scores=True)
        beam_indices = getattr(out, "beam_indices", None) if params.num_beams > 1 else None
        logp = model.compute_transition_scores(out.sequences, out.scores, beam_indices, normalize_logits=True)
        # sequences[:, 0] is the decoder start token; transition scores align with sequences[:, 1:].
        ids = out.sequences[:, 1:].tolist()
        probs = logp.float().exp().tolist()
        for image, seq, pr in zip(batch, ids, probs):
            results.append(reader.boxes(seq, pr, image.width, image.height))
    return results
