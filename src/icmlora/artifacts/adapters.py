"""PEFT adapter folders, read and written only as safetensors + JSON.

An adapter folder is what ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained``
loads: ``adapter_config.json`` + ``adapter_model.safetensors``. The pipeline writes them as a
LoRA's trajectory and final adapter (models/lora/...) and as generated samples
(models/generated/...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from icmlora.artifacts import checkpoint_steps, checkpoints_dir
from icmlora.errors import InputError
from icmlora.files import atomic_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def save_adapter(model, folder: str | Path, adapter: str = "default") -> None:
    """``model.save_pretrained(folder)`` holding the LoRA weights only. With ``lm_head`` among the
    targets (the ``reference`` preset) PEFT would also save the tied embedding matrix (51,289 x 768
    on Florence-2-base: 157 MB per checkpoint) into every adapter, and flattening would take it for
    part of the adapter; it is the base's, unchanged by LoRA, so it is never saved.

    ``adapter``: one of several adapters of ``model`` (trained together), written as a folder of its
    own, the same files as a model holding only it writes (PEFT writes a named adapter into a
    subfolder named after it: moved up)."""
    folder = Path(folder)
    if adapter == "default":
        model.save_pretrained(str(folder), save_embedding_layers=False)
        return
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), selected_adapters=[adapter], save_embedding_layers=False)
    for path in (folder / adapter).iterdir():
        path.replace(folder / path.name)
    (folder / adapter).rmdir()


def read_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter config) of one adapter folder, with clear errors for bad files."""
    folder = Path(folder)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    for path in (weights, config):
        if not path.is_file():
            inside = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_FILE}")) if folder.is_dir() else []
            hint = f"; adapter folders inside it: {', '.join(inside)} (e.g. {folder / inside[0]})" if inside else ""
            raise InputError(f"{path}: not found (an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}){hint}")
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


def adapter_bytes(folder: Path) -> int:
    """Size of an adapter's weights file."""
    return (Path(folder) / WEIGHTS_FILE).stat().st_size


def trajectory(task: str, rank: int, seed: int, lora_root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint a LoRA kept, by step."""
    folder = checkpoints_dir(task, rank, seed, lora_root)
    found = checkpoint_steps(folder)
    if not found:
        raise InputError(f"{folder}: no checkpoints (run `dvc repro train_lora` first)")
    return found
