"""Resumable training state in safe formats: tensors in safetensors, the rest in JSON.

Accelerate's ``save_state`` pickles the optimizer, scheduler and RNG states, and loading a
pickle can run code; this project never unpickles anything. What a resumed run needs is
small: the trainable parameters, AdamW's moments and step counts, the scheduler's state and
the RNG states (torch's and the data loader's).

One mechanism for every resumable stage (LoRA and CVAE training): a ``TrainingState`` is a
folder plus the fingerprint of the run it belongs to (``fingerprint(...)`` of whatever decides
the run's result). A saved state whose fingerprint differs came from other parameters and is
never resumed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from icmlora.files import atomic_dir

TENSORS = "state.safetensors"
META = "state.json"


def fingerprint(*parts) -> str:
    """A short hash of JSON-able parts (pydantic models are dumped first)."""
    plain = [p.model_dump() if hasattr(p, "model_dump") else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


def content_digest(*paths: Path) -> str:
    """sha256 of the bytes of these files (a folder: every file under it, by relative path), so a
    run's fingerprint changes when its inputs do, not only its parameters."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def _torch_optimizer(optimizer):
    # Accelerate wraps an optimizer; the torch object is one attribute down.
    return getattr(optimizer, "optimizer", optimizer)


def _torch_scheduler(scheduler):
    # Accelerate's wrapper keeps it in .scheduler. Not .optimizer: every torch scheduler has
    # one, and taking it would save the optimizer's state in the scheduler's place.
    return getattr(scheduler, "scheduler", scheduler)


def _jsonable(value, where: str):
    """Tensors as numbers or lists, containers walked; any other type is an error, never a silent null."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    raise TypeError(f"training state: {where} is a {type(value).__name__}, which cannot be saved as JSON")


class TrainingState:
    """The resumable state of one training run, in ``folder``."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def saved_fingerprint(self) -> str | None:
        try:
            return json.loads((self.folder / META).read_text())["extra"]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def resumable(self) -> bool:
        return self.saved_fingerprint() == self.fingerprint

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def save(self, model, optimizer, scheduler, loader_generator: torch.Generator,
             generators: dict[str, torch.Generator] | None = None, **extra) -> None:
        """Write the state atomically: a kill mid-write leaves the previous state intact. ``generators``:
        other named RNGs of the run (e.g. each adapter's dropout, ``icmlora.training.own_dropout``)."""
        tensors: dict[str, torch.Tensor] = {}
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        for n in names:
            tensors[f"param/{n}"] = params[n].detach().cpu().contiguous()
        opt = _torch_optimizer(optimizer).state_dict()
        opt_meta = {}
        for index, state in opt["state"].items():
            for key, value in state.items():
                # Every tensor stays a tensor, of its dtype and shape (a one-value momentum buffer,
                # AdamW's step count); only what torch keeps as Python values goes to the JSON.
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
                else:
                    opt_meta[f"{index}/{key}"] = _jsonable(value, f"optimizer.state.{index}.{key}")
        tensors["rng/torch"] = torch.get_rng_state()
        tensors["rng/loader"] = loader_generator.get_state()
        for name, gen in (generators or {}).items():
            tensors[f"rng/own/{name}"] = gen.get_state()
        meta = {"names": names, "optimizer_scalars": opt_meta,
                "param_groups": _jsonable(opt["param_groups"], "optimizer.param_groups"),
                "scheduler": _jsonable(_torch_scheduler(scheduler).state_dict(), "scheduler"),
                "extra": _jsonable({**extra, "fingerprint": self.fingerprint}, "extra")}
        with atomic_dir(self.folder) as tmp:
            save_file(tensors, str(tmp / TENSORS))
            (tmp / META).write_text(json.dumps(meta))

    def load(self, model, optimizer, scheduler, loader_generator: torch.Generator,
             generators: dict[str, torch.Generator] | None = None) -> dict:
        """Restore what ``save`` wrote into these objects; returns its ``extra``."""
        tensors = load_file(str(self.folder / TENSORS))
        meta = json.loads((self.folder / META).read_text())
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
            # (A state written before step counts were saved as tensors has them here, as numbers:
            # torch's Adam/AdamW make them float32 tensors again as they load.)
            state.setdefault(int(index), {})[name] = value
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
        _torch_optimizer(optimizer).load_state_dict({"state": state, "param_groups": groups})
        _torch_scheduler(scheduler).load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng/torch"])
        loader_generator.set_state(tensors["rng/loader"])
        for name, gen in (generators or {}).items():
            # (A state written before a run kept generators of its own: they drew from torch's, restored above.)
            gen.set_state(tensors.get(f"rng/own/{name}", tensors["rng/torch"]))
        return meta["extra"]
