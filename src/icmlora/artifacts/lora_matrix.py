"""data/lora_matrix/r<rank>.{safetensors,json}: every LoRA checkpoint of one rank as one
normalized float32 matrix, and the manifest that turns a row back into a PEFT adapter.

The tensor file holds ``matrix`` [checkpoints x D] (normalized rows), ``task_index``, ``seed``
and ``step`` per row, and the normalization's tensors: ``center`` [D] (``centered`` mode) or
``row_mean``/``row_std`` [checkpoints x tensors] (``per_checkpoint``). The manifest (JSON) holds
tensor names in a fixed order, shapes, offsets, the adapter config, the task list, the held-out
tasks and the per-tensor statistics.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from icmlora.artifacts import LORA_MATRIX_DIR, lora_manifest_file, lora_matrix_file
from icmlora.artifacts.adapters import write_adapter
from icmlora.errors import InputError
from icmlora.files import atomic_path, read_json, write_json

MANIFEST_KEYS = ("rank", "dim", "rows", "tasks", "holdout", "names", "shapes", "offsets", "normalization", "adapter_config")


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


@dataclass
class Manifest:
    """The manifest of one rank's matrix: enough to turn a row back into an adapter."""

    data: dict
    center: torch.Tensor | None = None  # [D], the "centered" mode's element-wise mean

    @property
    def names(self) -> list[str]:
        return self.data["names"]

    @property
    def shapes(self) -> list[list[int]]:
        return self.data["shapes"]

    @property
    def dim(self) -> int:
        return self.data["dim"]

    @property
    def mode(self) -> str:
        return self.data["normalization"]["mode"]

    def _stats(self, row_stats: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        if row_stats is not None:
            return row_stats
        if self.mode == "per_checkpoint":
            raise ValueError("per_checkpoint normalization needs the statistics of a checkpoint (row_stats)")
        norm = self.data["normalization"]
        return torch.tensor(norm["mean"]), torch.tensor(norm["std"])

    def _expand(self, per_tensor: torch.Tensor) -> torch.Tensor:
        sizes = [int(torch.tensor(s).prod()) for s in self.shapes]
        return torch.repeat_interleave(per_tensor, torch.tensor(sizes), dim=-1)

    def _center(self) -> torch.Tensor | float:
        if self.mode != "centered":
            return 0.0
        if self.center is None:
            raise ValueError("centered normalization needs the matrix file's center (read_manifest reads it)")
        return self.center

    def normalize(self, vector: torch.Tensor, row_stats=None) -> torch.Tensor:
        mean, std = self._stats(row_stats)
        return (vector - self._center() - self._expand(mean)) / self._expand(std)

    def denormalize(self, vector: torch.Tensor, row_stats=None) -> torch.Tensor:
        mean, std = self._stats(row_stats)
        return vector * self._expand(std) + self._expand(mean) + self._center()

    def to_tensors(self, normalized_row: torch.Tensor, row_stats=None) -> dict[str, torch.Tensor]:
        return unflatten(self.denormalize(normalized_row.float(), row_stats), self.names, self.shapes)

    def write_adapter(self, folder: Path, normalized_row: torch.Tensor, row_stats=None, readme: str | None = None) -> Path:
        """A PEFT folder that ``PeftModel.from_pretrained(base, folder)`` loads."""
        return write_adapter(folder, self.to_tensors(normalized_row, row_stats), self.data["adapter_config"], readme)


@dataclass
class LoraMatrix:
    """One rank's checkpoints: normalized rows and what each row is."""

    rows: torch.Tensor  # [N, D], normalized
    task_index: torch.Tensor  # [N], index into manifest.data["tasks"]
    seed: torch.Tensor  # [N]
    step: torch.Tensor  # [N]
    manifest: Manifest
    row_mean: torch.Tensor | None = None  # per_checkpoint only: [N, tensors]
    row_std: torch.Tensor | None = None

    @property
    def tasks(self) -> list[str]:
        return self.manifest.data["tasks"]

    def row_stats(self, index: int):
        return None if self.row_mean is None else (self.row_mean[index], self.row_std[index])

    def raw(self, index: int) -> torch.Tensor:
        """Row ``index`` de-normalized: the checkpoint's flattened weights."""
        return self.manifest.denormalize(self.rows[index], self.row_stats(index))

    def task_stats(self, task: str):
        """per_checkpoint only (the paper's leak): the task's own checkpoints' mean statistics."""
        if self.row_mean is None:
            return None
        mask = self.task_index == self.tasks.index(task)
        return self.row_mean[mask].mean(0), self.row_std[mask].mean(0)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


def save_streamed(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory: the header (names,
    dtypes, shapes, offsets; padded to 8 bytes), then each tensor's bytes. ``save_file`` first
    copies every tensor into a bytes object, which for a rank's matrix (checkpoints x D floats, most
    of collect_params' memory) doubles the peak; this keeps it at one copy."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian values; this writer does not byte-swap")
    names = sorted(tensors)
    header, offset = {}, 0
    for name in names:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} not supported here ({sorted(map(str, SAFETENSORS_DTYPES))})")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in names:
            fh.write(memoryview(tensors[name].detach().contiguous().numpy()).cast("B"))


def write_lora_matrix(rank: int, matrix: LoraMatrix, root: Path = LORA_MATRIX_DIR) -> tuple[Path, Path]:
    tensors = {"matrix": matrix.rows, "task_index": matrix.task_index, "seed": matrix.seed, "step": matrix.step}
    if matrix.manifest.center is not None:
        tensors["center"] = matrix.manifest.center
    if matrix.row_mean is not None:
        tensors.update(row_mean=matrix.row_mean, row_std=matrix.row_std)
    Path(root).mkdir(parents=True, exist_ok=True)
    with atomic_path(lora_matrix_file(rank, root)) as tmp:
        save_streamed(tensors, tmp)
    write_json(lora_manifest_file(rank, root), matrix.manifest.data)
    return lora_matrix_file(rank, root), lora_manifest_file(rank, root)


def read_manifest(rank: int, root: Path = LORA_MATRIX_DIR) -> Manifest:
    """The manifest, with the ``center`` it needs from the tensor file in ``centered`` mode."""
    path = lora_manifest_file(rank, root)
    if not path.is_file():
        raise InputError(f"{path}: not found (run `dvc repro collect_params@{rank}`)")
    data = read_json(path)
    missing = [k for k in MANIFEST_KEYS if k not in data]
    if missing:
        raise InputError(f"{path}: not a LoRA matrix manifest (missing {', '.join(missing)}); re-run collect_params")
    center = None
    if data["normalization"]["mode"] == "centered":
        from safetensors import safe_open

        tensor_file = lora_matrix_file(rank, root)
        try:
            with safe_open(str(tensor_file), framework="pt") as fh:
                center = fh.get_tensor("center")
        except Exception as exc:  # missing file, not safetensors, no "center" tensor
            raise InputError(f"{tensor_file}: cannot read the 'center' tensor the manifest {path} needs ({exc}); "
                             "re-run collect_params") from exc
        if center.shape != (data["dim"],):
            raise InputError(f"{tensor_file}: 'center' has shape {list(center.shape)}, the manifest says [{data['dim']}]")
    return Manifest(data, center)


def read_lora_matrix(rank: int, root: Path = LORA_MATRIX_DIR) -> LoraMatrix:
    path = lora_matrix_file(rank, root)
    if not path.is_file():
        raise InputError(f"{path}: not found (run `dvc repro collect_params@{rank}`)")
    manifest = read_manifest(rank, root)
    t = load_file(str(path))
    return LoraMatrix(t["matrix"], t["task_index"], t["seed"], t["step"], manifest, t.get("row_mean"), t.get("row_std"))
