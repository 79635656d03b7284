"""PEFT adapter folders <-> tensors, read and written only as safetensors + JSON.

An adapter folder is what ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained``
loads: ``adapter_config.json`` + ``adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from icmlora.errors import InputError
from icmlora.files import atomic_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def read_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter config) of one adapter folder, with clear errors for bad files."""
    folder = Path(folder)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    for path in (weights, config):
        if not path.is_file():
            raise InputError(f"{path}: not found (an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{weights}: not a readable safetensors file ({exc}); re-run the stage that wrote it") from None
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{config}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise InputError(f"{weights}: non-finite weights (NaN or inf)", [f"tensor {n}" for n in bad])
    return tensors, cfg


def write_adapter(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict, readme: str | None = None) -> Path:
    """Write a PEFT adapter folder atomically."""
    with atomic_dir(folder) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if readme:
            (tmp / "README.md").write_text(readme)
    return Path(folder)


def flatten(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Concatenate tensors in ``names`` order into one float32 vector."""
    return torch.cat([tensors[n].reshape(-1).float() for n in names])


def unflatten(vector: torch.Tensor, names: list[str], shapes: list[list[int]]) -> dict[str, torch.Tensor]:
    total = sum(math.prod(shape) for shape in shapes)
    if total != vector.numel():
        raise ValueError(f"vector has {vector.numel()} values, the manifest describes {total}")
    out, offset = {}, 0
    for name, shape in zip(names, shapes):
        size = math.prod(shape)
        out[name] = vector[offset : offset + size].reshape(shape).clone()
        offset += size
    return out
