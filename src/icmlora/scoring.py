"""Score adapter weights on a task: the one way every stage measures a model's detections.

A ``Scorer`` holds a model (the base, or a PEFT model over it), a processor and how many valid
images to score per task. ``score(task)`` runs batched ``<OD>`` prediction on the first
``eval_images`` images of the task's valid split and returns COCO mAPs plus precision/recall/F1
at IoU 0.5 (``icmlora.metrics``). The same weights on the same images give the same numbers in
every stage: the images are decoded once per task and kept.

When no adapter of the model can change the image features (``image_features_fixed``: a PEFT
model whose adapters are all on the language model), the prompt's tokens and the vision tower's
output are kept too, per task, within ``predict.image_cache_mb``: scoring another adapter on the
same task then runs neither the image processor nor the vision tower (the same boxes, bit for bit).
"""

from __future__ import annotations

from pathlib import Path

import torch

from icmlora.artifacts import PREPARED_DIR
from icmlora.artifacts.annotations import read_split
from icmlora.config import PredictParams
from icmlora.florence.format import Box, read_annotations
from icmlora.florence.predict import encode_images, image_features_fixed, predict
from icmlora.images import load_images
from icmlora.metrics import detection_metrics
from icmlora.runtime import scoring_device


IMAGE_PATH = ("vision_tower.", "multi_modal_projector.")  # the modules whose output a Scorer may keep


class Scorer:
    def __init__(self, model, processor, predict_params: PredictParams, eval_images: int, prepared: Path = PREPARED_DIR):
        # On the GPU when there is one: stages load models on the CPU. Always float32, whatever
        # runtime.mixed_precision trained with, so figures compare across precisions.
        self.model, self.processor, self.predict_params = model.to(scoring_device()), processor, predict_params
        self.eval_images, self.prepared = eval_images, Path(prepared)
        self._valid: dict[str, tuple] = {}
        self.cache_bytes = predict_params.image_cache_mb * 2**20 if image_features_fixed(model) else 0
        self.cached_bytes = 0
        self._encoded: dict[str | Path, list[dict[str, torch.Tensor]] | None] = {}

    def valid_split(self, task: str | Path):
        """(examples, PIL images) of the first ``eval_images`` (0 = all) valid examples of ``task``,
        or of the examples of an annotations file (a Path)."""
        if task not in self._valid:
            if isinstance(task, Path):
                examples, folder = read_annotations(task), task.parent  # a user's file: its images are checked
            else:
                examples, folder = read_split(task, "valid", self.prepared)
            if self.eval_images:
                examples = examples[: self.eval_images]
            self._valid[task] = (examples, load_images([folder / e.image for e in examples]))
        return self._valid[task]

    def encoded(self, task: str | Path) -> list[dict[str, torch.Tensor]] | None:
        """``encode_images`` of ``task``'s valid images, computed on first use and kept; None when
        the model's adapters could change them or they would not fit what is left of the cache."""
        if task not in self._encoded:
            self._encoded[task] = None
            _, images = self.valid_split(task)
            if self.cache_bytes and images:
                batches: list[dict[str, torch.Tensor]] = []
                size = 0
                for batch in encode_images(self.model, self.processor, images, self.predict_params):
                    size += sum(v.numel() * v.element_size() for v in batch.values())
                    if not batches and self.cached_bytes + size / len(batch["input_ids"]) * len(images) > self.cache_bytes:
                        return None  # judged from the first batch: the whole task's would not fit
                    batches.append(batch)
                self._encoded[task], self.cached_bytes = batches, self.cached_bytes + size
        return self._encoded[task]

    def predictions(self, task: str | Path, weights: dict[str, torch.Tensor] | None = None, *, disable_adapter: bool = False,
                    desc: str | None = None) -> list[list[Box]]:
        """Scored boxes per valid image of ``task``: of the model as it is, after loading these
        adapter ``weights`` into it, or with its adapter disabled (the base model)."""
        from contextlib import nullcontext

        _, images = self.valid_split(task)
        if weights is not None:
            from peft import set_peft_model_state_dict

            if self.cache_bytes and any(part in key for key in weights for part in IMAGE_PATH):
                # Weights for the image path itself (loaded non-strictly, not through an adapter layer):
                # what was kept may no longer be what the vision tower computes.
                self.cache_bytes, self.cached_bytes, self._encoded = 0, 0, {}
            set_peft_model_state_dict(self.model, weights)
        encoded = self.encoded(task)
        with self.model.disable_adapter() if disable_adapter else nullcontext():
            return predict(self.model, self.processor, images, self.predict_params, desc=desc or f"score on {task}",
                           encoded=encoded)

    def metrics(self, task: str | Path, predictions: list[list[Box]], *, class_agnostic: bool = False) -> dict[str, float]:
        examples, _ = self.valid_split(task)
        return detection_metrics([e.boxes for e in examples], predictions, [(e.width, e.height) for e in examples],
                                 class_agnostic=class_agnostic)

    def score(self, task: str | Path, weights: dict[str, torch.Tensor] | None = None, *, disable_adapter: bool = False,
              class_agnostic: bool = False, desc: str | None = None) -> dict[str, float]:
        """Detection metrics on ``task``'s valid split (see ``predictions``)."""
        preds = self.predictions(task, weights, disable_adapter=disable_adapter, desc=desc)
        return self.metrics(task, preds, class_agnostic=class_agnostic)
