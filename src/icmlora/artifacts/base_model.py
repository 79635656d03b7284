"""models/base/: the base Florence-2 and its processor, as one ``save_pretrained`` folder.

The tiny model built here and a real one downloaded once are saved the same way; every stage
after ``base_model`` loads only this folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from icmlora.artifacts import BASE_MODEL_DIR
from icmlora.errors import InputError
from icmlora.files import atomic_dir


def write_base_model(model, processor, folder: Path = BASE_MODEL_DIR) -> Path:
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(folder)


def read_base_model(folder: Path = BASE_MODEL_DIR, dtype: torch.dtype = torch.float32):
    """(model, processor) from a ``save_pretrained`` folder."""
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: no base model here (config.json missing); run `dvc repro base_model` first")
    model = Florence2ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor
