"""Stage `collect_params`: every LoRA checkpoint of one rank -> one normalized float32 matrix.

    python -m icmlora.stages.collect_params --rank 4      # or: icmlora collect_params --rank 4

Reads models/lora/<task>-s<seed>/r<rank>/checkpoints/ and writes data/lora_matrix/r<rank>.safetensors
and its manifest r<rank>.json (``icmlora.artifacts.lora_matrix``). Statistics come from the
checkpoints of the *training* tasks only (not ``heldout_tasks``), so de-normalizing a
generated adapter never uses a trained checkpoint of the task being generated.
``cvae.normalization``:

- ``centered`` (default): subtract the training checkpoints' element-wise mean (stored as the
  ``center`` tensor), then z-score per tensor. Every task's LoRA starts from the same Gaussian
  A, so ~80% of the per-tensor variance is that shared pattern, which a 1-D conv decoder
  reproduces poorly; centered, the generator models what differs by task.
- ``train_tasks``: per-tensor z-score only (as the paper, with statistics over training tasks).
- ``per_checkpoint``: the paper's variant (each checkpoint z-scored by its own statistics),
  which leaks the target's statistics into generation.

Checkpoints are streamed into a preallocated matrix, and every later pass (the center, the
statistics, the normalization) works in place, one tensor's span of one row at a time, with the
same float operations as a whole-row pass (the same bytes out): peak memory stays near the size of
the output (`make scale` measures it at Florence-2-base's D).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from icmlora.artifacts import LORA_DIR, LORA_MATRIX_DIR, lora_matrix_file
from icmlora.artifacts.adapters import read_adapter, trajectory
from icmlora.artifacts.lora_matrix import LoraMatrix, Manifest, write_lora_matrix
from icmlora.config import Params
from icmlora.errors import InputError
from icmlora.stage_cli import require, run_stage, stage_parser

EPS = 1e-8


def _tensor_stats(vector: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = torch.split(vector, sizes)
    return torch.stack([p.mean() for p in parts]), torch.stack([p.std(unbiased=False).clamp_min(EPS) for p in parts])


def _offsets(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


def collect_params(cfg: Params, rank: int, lora_root: Path = LORA_DIR, out_root: Path = LORA_MATRIX_DIR) -> dict:
    """Write one rank's matrix and manifest; returns the manifest."""
    rows: list[tuple[int, int, int, Path]] = []  # (task index, seed, step, folder)
    for ti, task in enumerate(cfg.data.tasks):
        for seed in cfg.lora.seeds:
            rows += [(ti, seed, step, path) for step, path in trajectory(task, rank, seed, lora_root)]
    first, adapter_config = read_adapter(rows[0][3])
    names = sorted(first)
    shapes = [list(first[n].shape) for n in names]
    sizes = [first[n].numel() for n in names]
    dim = sum(sizes)
    spans = [slice(start, start + size) for start, size in zip(_offsets(sizes), sizes)]
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
        for name, span in zip(names, spans):  # what flatten() gives, without a whole-row temporary
            matrix[i, span] = tensors[name].reshape(-1)
        del tensors
    if problems:
        raise InputError(f"collect_params r{rank}: inconsistent checkpoints", problems)

    heldout = {cfg.data.tasks.index(t) for t in cfg.heldout_tasks}
    train_rows = torch.tensor([r[0] not in heldout for r in rows])
    mode = cfg.cvae.normalization
    row_mean = row_std = None
    if mode in ("train_tasks", "centered"):
        center = None
        train = torch.nonzero(train_rows).flatten().tolist()
        if mode == "centered":
            # The training rows' mean, summed in float64 one tensor's span at a time.
            center = torch.empty(dim, dtype=torch.float32)
            for span in spans:
                total = torch.zeros(span.stop - span.start, dtype=torch.float64)
                for i in train:
                    total += matrix[i, span]
                center[span] = total / len(train)
        # Per-tensor statistics over every value of that tensor in the training tasks' rows.
        count = torch.zeros(len(sizes), dtype=torch.float64)
        total = torch.zeros(len(sizes), dtype=torch.float64)
        squares = torch.zeros(len(sizes), dtype=torch.float64)
        for i in train:
            for j, span in enumerate(spans):
                part = (matrix[i, span] - center[span] if center is not None else matrix[i, span]).double()
                count[j] += part.numel()
                total[j] += part.sum()
                squares[j] += (part * part).sum()
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(EPS)
        norm = {"mode": mode, "mean": mean.float().tolist(), "std": std.float().tolist()}
        manifest = Manifest({"normalization": norm, "shapes": shapes}, center)
        # In place, a tensor's span at a time: (x - center - mean) / std, as Manifest.normalize.
        mean32, std32 = mean.float(), std.float()
        for i in range(len(rows)):
            for j, span in enumerate(spans):
                part = matrix[i, span]
                if center is not None:
                    part.sub_(center[span])
                part.sub_(mean32[j].expand_as(part)).div_(std32[j].expand_as(part))
    else:
        row_mean = torch.empty(len(rows), len(names))
        row_std = torch.empty(len(rows), len(names))
        for i in range(len(rows)):
            row_mean[i], row_std[i] = _tensor_stats(matrix[i], sizes)
        manifest = Manifest({"normalization": {"mode": "per_checkpoint"}, "shapes": shapes})
        for i in range(len(rows)):
            matrix[i] = manifest.normalize(matrix[i], (row_mean[i], row_std[i]))
        norm = {"mode": "per_checkpoint", "note": "row_mean/row_std in the tensor file; leaks the target's statistics"}
    manifest.data = {
        "rank": rank, "dim": dim, "rows": len(rows), "tasks": list(cfg.data.tasks),
        "holdout": list(cfg.heldout_tasks), "names": names, "shapes": shapes,
        "offsets": _offsets(sizes), "normalization": norm, "adapter_config": adapter_config,
    }
    write_lora_matrix(rank, LoraMatrix(
        matrix, torch.tensor([r[0] for r in rows], dtype=torch.int64), torch.tensor([r[1] for r in rows], dtype=torch.int64),
        torch.tensor([r[2] for r in rows], dtype=torch.int64), manifest, row_mean, row_std), out_root)
    return manifest.data


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("collect_params", __doc__)
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank, from lora.ranks")
    args, cfg = parser.parse(argv)
    require(args.rank, cfg.lora.ranks, "--rank", "lora.ranks")
    m = collect_params(cfg, args.rank)
    print(f"collect_params: wrote {lora_matrix_file(args.rank)} ({m['rows']} checkpoints x {m['dim']} values, "
          f"{m['normalization']['mode']} normalization) and its manifest r{args.rank}.json")
    return m


if __name__ == "__main__":
    run_stage(main)
