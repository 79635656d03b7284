"""Stage `collect_params`: every LoRA checkpoint of one rank -> one normalized float32 matrix.

    python -m icmlora collect_params --rank 4

Writes data/params/r<rank>.safetensors (``params`` [checkpoints x D], normalized, plus
``task_index``, ``seed`` and ``step`` per row) and data/params/r<rank>.json, the manifest:
tensor names in a fixed order, shapes, offsets, the adapter config, and the normalization
statistics. Statistics come from the checkpoints of the *training* tasks only (not
``generator.holdout``), so de-normalizing a generated adapter never uses a trained checkpoint
of the task being generated. ``generator.normalization``:

- ``centered`` (default): subtract the training checkpoints' element-wise mean (stored as the
  ``center`` row of the tensor file), then z-score per tensor. Every task's LoRA starts from
  the same Gaussian A, so ~80% of the per-tensor variance is that shared pattern, which a
  1-D conv decoder reproduces poorly; centered, the generator models what differs by task.
- ``train_tasks``: per-tensor z-score only (as the paper, with statistics over training tasks).
- ``per_checkpoint``: the paper's variant (each checkpoint z-scored by its own statistics),
  which leaks the target's statistics into generation.

Checkpoints are streamed into a preallocated matrix: peak memory stays near the size of the
output.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from icmlora.config import Config, load_config
from icmlora.errors import InputError
from icmlora.files import atomic_path, read_json, write_json
from icmlora.lora.adapters import flatten, read_adapter, unflatten, write_adapter
from icmlora.lora.train import LORA_DIR, adapter_name

PARAMS_DIR = Path("data/params")
EPS = 1e-8


@dataclass
class Manifest:
    """The manifest of one rank's parameter matrix; enough to turn a row back into an adapter."""

    data: dict
    center: torch.Tensor | None = None  # [D], the "centered" mode's element-wise mean

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        data = read_json(path)
        missing = [k for k in ("rank", "names", "shapes", "offsets", "dim", "normalization", "adapter_config", "tasks")
                   if k not in data]
        if missing:
            raise InputError(f"{path}: not a parameter manifest (missing {', '.join(missing)}); re-run collect_params")
        center = None
        if data["normalization"]["mode"] == "centered":
            from safetensors import safe_open

            tensor_file = path.with_suffix(".safetensors")
            try:
                with safe_open(str(tensor_file), framework="pt") as fh:
                    center = fh.get_tensor("center")
            except Exception as exc:  # missing file, not safetensors, no "center" tensor
                raise InputError(f"{tensor_file}: cannot read the 'center' tensor the manifest {path} needs ({exc}); "
                                 "re-run collect_params") from exc
            if center.shape != (data["dim"],):
                raise InputError(f"{tensor_file}: 'center' has shape {list(center.shape)}, the manifest says [{data['dim']}]")
        return cls(data, center)

    @property
    def names(self) -> list[str]:
        return self.data["names"]

    @property
    def shapes(self) -> list[list[int]]:
        return self.data["shapes"]

    @property
    def dim(self) -> int:
        return self.data["dim"]

    def _stats(self, row_stats: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        if row_stats is not None:
            return row_stats
        norm = self.data["normalization"]
        if norm["mode"] == "per_checkpoint":
            raise ValueError("per_checkpoint normalization needs the statistics of a checkpoint (row_stats)")
        return torch.tensor(norm["mean"]), torch.tensor(norm["std"])

    def _expand(self, per_tensor: torch.Tensor) -> torch.Tensor:
        sizes = [int(torch.tensor(s).prod()) for s in self.shapes]
        return torch.repeat_interleave(per_tensor, torch.tensor(sizes), dim=-1)

    def _center(self) -> torch.Tensor | float:
        if self.data["normalization"]["mode"] != "centered":
            return 0.0
        if self.center is None:
            raise ValueError("centered normalization needs the manifest's center row (use Manifest.load)")
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


def checkpoint_folders(lora_dir: Path, task: str, rank: int, seed: int) -> list[tuple[int, Path]]:
    folder = lora_dir / adapter_name(task, rank, seed) / "checkpoints"
    found = sorted(((int(p.name.split("-")[1]), p) for p in folder.glob("step-*") if p.is_dir()), key=lambda t: t[0])
    if not found:
        raise InputError(f"{folder}: no checkpoints (run `dvc repro train_lora` first)")
    return found


def _tensor_stats(vector: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = torch.split(vector, sizes)
    return torch.stack([p.mean() for p in parts]), torch.stack([p.std(unbiased=False).clamp_min(EPS) for p in parts])


def collect_params(cfg: Config, rank: int, lora_dir: Path = LORA_DIR, out_dir: Path = PARAMS_DIR) -> dict:
    rows: list[tuple[int, int, int, Path]] = []  # (task index, seed, step, folder)
    for ti, task in enumerate(cfg.data.tasks):
        for seed in cfg.lora.seeds:
            rows += [(ti, seed, step, path) for step, path in checkpoint_folders(lora_dir, task, rank, seed)]
    first, adapter_config = read_adapter(rows[0][3])
    names = sorted(first)
    shapes = [list(first[n].shape) for n in names]
    sizes = [first[n].numel() for n in names]
    dim = sum(sizes)
    matrix = torch.empty(len(rows), dim, dtype=torch.float32)
    problems = []
    for i, (_, _, _, path) in enumerate(tqdm(rows, desc=f"collect_params r{rank}", unit="ckpt")):
        tensors, config = read_adapter(path)
        if config.get("r") != rank:
            problems.append(f"{path}: adapter rank {config.get('r')} is not {rank}")
        if sorted(tensors) != names or any(list(tensors[n].shape) != s for n, s in zip(names, shapes)):
            problems.append(f"{path}: tensor names or shapes differ from {rows[0][3]} (another target set?)")
        if problems:
            continue
        matrix[i] = flatten(tensors, names)
    if problems:
        raise InputError(f"collect_params r{rank}: inconsistent checkpoints", problems)

    holdout = {cfg.data.tasks.index(t) for t in cfg.generator.holdout}
    train_rows = torch.tensor([r[0] not in holdout for r in rows])
    tensors_out: dict[str, torch.Tensor] = {}
    mode = cfg.generator.normalization
    if mode in ("train_tasks", "centered"):
        center = None
        if mode == "centered":
            # Streamed sum over the training rows: no copy of the matrix.
            center = torch.zeros(dim, dtype=torch.float64)
            for i in torch.nonzero(train_rows).flatten().tolist():
                center += matrix[i]
            center = (center / int(train_rows.sum())).float()
            tensors_out["center"] = center
        # Per-tensor statistics over every value of that tensor in the training tasks' rows.
        count = torch.zeros(len(sizes), dtype=torch.float64)
        total = torch.zeros(len(sizes), dtype=torch.float64)
        squares = torch.zeros(len(sizes), dtype=torch.float64)
        for i in torch.nonzero(train_rows).flatten().tolist():
            row = matrix[i] - center if center is not None else matrix[i]
            for j, part in enumerate(torch.split(row.double(), sizes)):
                count[j] += part.numel()
                total[j] += part.sum()
                squares[j] += (part * part).sum()
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(EPS)
        norm = {"mode": mode, "mean": mean.float().tolist(), "std": std.float().tolist()}
        manifest = Manifest({"normalization": norm, "shapes": shapes}, center)
        for i in range(len(rows)):  # in place, row by row: no second matrix in memory
            matrix[i] = manifest.normalize(matrix[i])
    else:
        row_mean = torch.empty(len(rows), len(names))
        row_std = torch.empty(len(rows), len(names))
        for i in range(len(rows)):
            row_mean[i], row_std[i] = _tensor_stats(matrix[i], sizes)
        manifest = Manifest({"normalization": {"mode": "per_checkpoint"}, "shapes": shapes})
        for i in range(len(rows)):
            matrix[i] = manifest.normalize(matrix[i], (row_mean[i], row_std[i]))
        norm = {"mode": "per_checkpoint", "note": "row_mean/row_std in the tensor file; leaks the target's statistics"}
        tensors_out.update(row_mean=row_mean, row_std=row_std)
    tensors_out.update(
        params=matrix,
        task_index=torch.tensor([r[0] for r in rows], dtype=torch.int64),
        seed=torch.tensor([r[1] for r in rows], dtype=torch.int64),
        step=torch.tensor([r[2] for r in rows], dtype=torch.int64),
    )
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    manifest_data = {
        "rank": rank, "dim": dim, "rows": len(rows), "tasks": list(cfg.data.tasks),
        "holdout": list(cfg.generator.holdout), "names": names, "shapes": shapes, "offsets": offsets,
        "normalization": norm, "adapter_config": adapter_config,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / f"r{rank}.safetensors") as tmp:
        save_file(tensors_out, str(tmp))
    write_json(out_dir / f"r{rank}.json", manifest_data)
    return manifest_data


def load_params(rank: int, params_dir: Path = PARAMS_DIR) -> tuple[dict[str, torch.Tensor], Manifest]:
    path = params_dir / f"r{rank}.safetensors"
    if not path.is_file():
        raise InputError(f"{path}: not found (run `dvc repro collect_params@{rank}`)")
    return load_file(str(path)), Manifest.load(params_dir / f"r{rank}.json")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="icmlora collect_params", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    m = collect_params(cfg, args.rank)
    print(f"collect_params: wrote {PARAMS_DIR}/r{args.rank}.safetensors ({m['rows']} checkpoints x {m['dim']} values, "
          f"{m['normalization']['mode']} normalization) and r{args.rank}.json")
    return m
