"""data/task_vectors.{safetensors,json}: one vector per task, what the generator is conditioned on.

The tensor file holds ``vectors`` [tasks x d] (the chosen method's, one row per task in
``data.tasks`` order) and ``<method>_examples`` (the per-example vectors of every method
computed, tasks in order, for the comparison); its one metadata key ``tasks`` names the rows.
The JSON beside it records the task names, method, pooling and d.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from icmlora.artifacts import TASK_VECTORS_FILE, TASK_VECTORS_INFO
from icmlora.errors import InputError
from icmlora.files import atomic_path, write_json


def write_task_vectors(tasks: list[str], vectors: torch.Tensor, per_example: dict[str, torch.Tensor], info: dict,
                       path: Path = TASK_VECTORS_FILE, info_path: Path = TASK_VECTORS_INFO) -> Path:
    tensors = {"vectors": vectors.contiguous(), **{f"{k}_examples": v.contiguous() for k, v in per_example.items()}}
    with atomic_path(path) as tmp:
        # One metadata key: safetensors writes a metadata dict in an order that varies between runs.
        save_file(tensors, str(tmp), metadata={"tasks": ",".join(tasks)})
    write_json(info_path, {"tasks": tasks, **info, "dim": vectors.shape[1]})
    return Path(path)


def read_task_vectors(path: Path = TASK_VECTORS_FILE) -> dict[str, torch.Tensor]:
    """{task: vector}."""
    if not Path(path).is_file():
        raise InputError(f"{path}: not found (run `dvc repro task_vectors`)")
    with safe_open(str(path), framework="pt") as fh:
        tasks = fh.metadata()["tasks"].split(",")
        vectors = fh.get_tensor("vectors")
    return dict(zip(tasks, vectors))


def read_task_vector_file(path: Path) -> torch.Tensor:
    """A user's task vector: a safetensors file holding one tensor ``vector`` [d]."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise InputError(f"{path}: task vector file not found")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise InputError(f"{path}: not a safetensors file ({exc}); save the vector with safetensors.torch.save_file") from None
    vec = tensors.get("vector", tensors.get("vectors"))
    if vec is None and len(tensors) == 1:
        vec = next(iter(tensors.values()))
    if vec is None or vec.dim() > 2 or (vec.dim() == 2 and vec.shape[0] != 1):
        raise InputError(f"{path}: expected one tensor 'vector' of shape [d] (found {list(tensors)})")
    return vec.reshape(-1)
