"""Batched ``<OD>`` inference with a confidence score per box.

The boxes are parsed from the generated tokens the way ``Florence2PostProcessor`` reads
``<OD>`` output (a phrase, then groups of four ``<loc_N>``), but coordinates stay at the
bin centre as floats and each box gets a score: the mean probability of its label tokens
and its four location tokens. With a constant score (the reference code's 1.0) mAP
collapses to a single operating point.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from icmlora.config import EvalConfig
from icmlora.data.florence_format import NUM_BINS, OD_PROMPT, Box, Example, dequantize
from icmlora.florence import load_images


class TokenParser:
    """Turns generated token ids + per-token probabilities into scored boxes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.loc_bins = {tokenizer.convert_tokens_to_ids(f"<loc_{i}>"): i for i in range(NUM_BINS)}
        self.stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        self.skip = {tokenizer.bos_token_id}

    def parse(self, ids: list[int], probs: list[float], width: int, height: int) -> list[Box]:
        boxes: list[Box] = []
        label_ids: list[int] = []
        label_probs: list[float] = []
        locs: list[tuple[int, float]] = []
        label = ""
        for tid, p in zip(ids, probs):
            if tid in self.stop:
                break
            if tid in self.skip:
                continue
            if tid in self.loc_bins:
                if not locs and label_ids:  # the phrase before this run of locations is the label
                    label = self.tokenizer.decode(label_ids).strip()
                    label_ids = []
                locs.append((self.loc_bins[tid], p))
                if len(locs) == 4:
                    if label:
                        q = [b for b, _ in locs]
                        score = sum([*label_probs, *(lp for _, lp in locs)]) / (len(label_probs) + 4)
                        boxes.append(Box(label, dequantize(q[0], width), dequantize(q[1], height),
                                         dequantize(q[2], width), dequantize(q[3], height), score))
                    locs = []
            else:
                if locs:  # a phrase interrupted mid-box: drop the partial box, as the post-processor does
                    locs = []
                if not label_ids:
                    label_probs = []
                    label = ""
                label_ids.append(tid)
                label_probs.append(p)
        return boxes


@torch.no_grad()
def predict(model, processor, images, cfg: EvalConfig, *, desc: str = "predict", prompt: str = OD_PROMPT) -> list[list[Box]]:
    """Scored boxes for each PIL image (sizes are taken from the images)."""
    model.eval()
    parser = TokenParser(processor.tokenizer)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    results: list[list[Box]] = []
    for start in tqdm(range(0, len(images), cfg.batch_size), desc=desc, unit="batch", leave=False):
        batch = images[start : start + cfg.batch_size]
        inputs = processor(text=[prompt] * len(batch), images=batch, return_tensors="pt")
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, do_sample=False,
                             return_dict_in_generate=True, output_scores=True)
        beam_indices = getattr(out, "beam_indices", None) if cfg.num_beams > 1 else None
        logp = model.compute_transition_scores(out.sequences, out.scores, beam_indices, normalize_logits=True)
        # sequences[:, 0] is the decoder start token; transition scores align with sequences[:, 1:].
        ids = out.sequences[:, 1:].tolist()
        probs = logp.float().exp().tolist()
        for image, seq, pr in zip(batch, ids, probs):
            results.append(parser.parse(seq, pr, image.width, image.height))
    return results


def predict_examples(model, processor, examples: list[Example], root: Path, cfg: EvalConfig, desc: str = "predict"):
    """Predictions for the examples of one annotations file (``root`` = its folder)."""
    if cfg.max_images:
        examples = examples[: cfg.max_images]
    images = load_images([Path(root) / ex.image for ex in examples])
    return examples, predict(model, processor, images, cfg, desc=desc)


def evaluate_annotations(model, processor, annotations: Path, cfg: EvalConfig, *, class_agnostic: bool = False,
                         desc: str = "evaluate") -> dict[str, float]:
    """Detection metrics (COCO mAPs + P/R/F1 at IoU 0.5) of ``model`` on one annotations file."""
    from icmlora.data.florence_format import read_annotations
    from icmlora.evaluation.metrics import detection_metrics

    annotations = Path(annotations)
    examples = read_annotations(annotations, check_images=False)
    examples, predictions = predict_examples(model, processor, examples, annotations.parent, cfg, desc=desc)
    return detection_metrics([ex.boxes for ex in examples], predictions, [(ex.width, ex.height) for ex in examples],
                             class_agnostic=class_agnostic)
