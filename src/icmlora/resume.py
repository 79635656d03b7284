"""Resumable training state in safe formats: tensors in safetensors, the rest in JSON.

Accelerate's ``save_state`` pickles the optimizer, scheduler and RNG states, and loading a
pickle can run code; this project never unpickles anything. What a resumed run needs is
small: the trainable parameters, AdamW's moments and step counts, the scheduler's counters
and the RNG states (torch's and the data loader's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from icmlora.files import atomic_dir

TENSORS = "state.safetensors"
META = "state.json"


def _unwrap(obj):
    # Accelerate wraps optimizers and schedulers; the torch object is one attribute down.
    return getattr(obj, "optimizer", None) or getattr(obj, "scheduler", None) or obj


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (int, float, str, bool)) else None


def save_training_state(folder: Path, model, optimizer, scheduler, loader_generator: torch.Generator, extra: dict) -> None:
    """Write the state atomically: a kill mid-write leaves the previous state intact."""
    tensors: dict[str, torch.Tensor] = {}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    for n in names:
        tensors[f"param/{n}"] = params[n].detach().cpu().contiguous()
    opt = _unwrap(optimizer).state_dict()
    opt_meta = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1 or key.startswith("exp_avg"):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                opt_meta[f"{index}/{key}"] = _jsonable(value)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/loader"] = loader_generator.get_state()
    meta = {"names": names, "optimizer_scalars": opt_meta, "param_groups": _jsonable(opt["param_groups"]),
            "scheduler": _jsonable(_unwrap(scheduler).state_dict()), "extra": extra}
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps(meta))


def load_training_state(folder: Path, model, optimizer, scheduler, loader_generator: torch.Generator) -> dict:
    """Restore what ``save_training_state`` wrote; returns its ``extra``."""
    tensors = load_file(str(folder / TENSORS))
    meta = json.loads((folder / META).read_text())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in meta["names"]:
            params[n].copy_(tensors[f"param/{n}"])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = torch.tensor(value, dtype=torch.float32) if name == "step" else value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    _unwrap(optimizer).load_state_dict({"state": state, "param_groups": groups})
    sched = _unwrap(scheduler)
    sched_state = {k: v for k, v in meta["scheduler"].items() if k != "lr_lambdas"}
    sched.__dict__.update(sched_state)
    torch.set_rng_state(tensors["rng/torch"])
    loader_generator.set_state(tensors["rng/loader"])
    return meta["extra"]
