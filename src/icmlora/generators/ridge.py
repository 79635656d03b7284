"""The ridge map: a closed-form linear map from a task vector to a normalized adapter row.

What a user with a folder of adapters and their task vectors can fit in a second instead of a
generator: ``row = row_mean + W ((vector - cond_mean) / cond_scale)``, with ``W`` minimizing the
squared error over the training tasks plus ``lam * |W|^2``. The condition is standardized as
the CVAE's is (``icmlora.cvae.Generator.standardization``); the target of a task is the mean of
its normalized checkpoint rows (every checkpoint of a task has the task's one vector, so fitting
all rows is the same fit weighted by their counts).

``lam`` is chosen by leave-one-task-out over the training tasks only (``fit_ridge_loto``): each
training task in turn is left out, the map is fitted on the others (standardization included)
and its row predicted; the grid value whose predictions point most nearly where the left-out
rows do (the largest mean cosine similarity) wins. Not the least squared error: shrinking toward
the mean adapter always lowers it and removes what makes an adapter do its task. Measured on the
default at rank 4 (leave-one-training-task-out, each predicted adapter scored on its task's valid
split): the squared error picks the largest lam of the grid, whose adapters reach median mAP50 0.00;
the cosine picks lam <= 1e-3 of the unit, 0.64. Nothing of a task outside the rows passed in is
read, so a held-out task cannot reach the map.

As a generator kind (``cvae.kind: ridge``), ``RidgeGenerator`` holds the fitted map as a module,
saved and sampled like every kind; it has no latent (every sample of a task is one adapter).

Solved and kept in its dual form in float64: ``W = X^T (X X^T + lam I)^-1 (Y - mean Y)`` is never
formed; an n x n system for n training tasks, and n x D numbers kept, whatever the adapter's length D.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from icmlora.cvae import Generator
from icmlora.generators import architecture_from_json, check_shape

standardization = Generator.standardization  # the CVAE's condition, exactly

# lam = c * the mean squared norm of the standardized training vectors, for c on this grid
LAMBDA_GRID = tuple(10.0 ** (k / 2) for k in range(-8, 5))


@dataclass(frozen=True)
class RidgeMap:
    """The fitted map, kept in its dual form: memory n x D for n training tasks (the primal weight
    matrix would be D x d: 11.9 GB in float64 at Florence-2-base's rank-8 D of 1.9 M and d of 768)."""

    cond_mean: torch.Tensor  # [d]
    cond_scale: torch.Tensor  # [d]
    row_mean: torch.Tensor  # [D] the intercept: the training targets' mean
    conditions: torch.Tensor  # [n, d] float64, the training tasks' standardized vectors
    dual: torch.Tensor  # [n, D] float64, (X X^T + lam I)^-1 (Y - mean Y)
    lam: float

    def predict(self, vector: torch.Tensor) -> torch.Tensor:
        """The normalized adapter row [D] (float32) for one task vector [d]: mean + (X x)^T dual."""
        x = (vector.double().reshape(-1) - self.cond_mean.double()) / self.cond_scale.double()
        return (self.row_mean.double() + (self.conditions @ x) @ self.dual).float()


def fit_ridge(vectors: torch.Tensor, targets: torch.Tensor, lam: float) -> RidgeMap:
    """The map fitted on task vectors [n, d] and their target rows [n, D] with ridge ``lam``
    (absolute: on the standardized vectors)."""
    if len(vectors) != len(targets) or len(vectors) < 1:
        raise ValueError(f"ridge needs one target row per task vector, got {len(vectors)} vectors and {len(targets)} rows")
    cond_mean, cond_scale = standardization(vectors.float())
    x = ((vectors.float() - cond_mean) / cond_scale).double()
    y = targets.double()
    row_mean = y.mean(0)
    dual = torch.linalg.solve(x @ x.T + lam * torch.eye(len(x), dtype=torch.float64), y - row_mean)
    return RidgeMap(cond_mean, cond_scale, row_mean.float(), x, dual, float(lam))


def loto_scores(vectors: torch.Tensor, targets: torch.Tensor, grid: tuple[float, ...] = LAMBDA_GRID) -> dict[float, float]:
    """{c: mean cosine similarity of the left-out task's predicted row with its row}, leaving each task
    out in turn, with lam = c * the mean squared norm of the fold's standardized vectors."""
    n = len(vectors)
    if n < 2:
        raise ValueError(f"choosing ridge's lam by leave-one-task-out needs at least 2 training tasks, got {n}")
    scores = {}
    for c in grid:
        total = 0.0
        for out in range(n):
            keep = [i for i in range(n) if i != out]
            fitted = fit_ridge(vectors[keep], targets[keep], c * _scale(vectors[keep]))
            total += float(torch.nn.functional.cosine_similarity(fitted.predict(vectors[out]).double(),
                                                                 targets[out].double(), dim=0))
        scores[c] = total / n
    return scores


def _scale(vectors: torch.Tensor) -> float:
    """The mean squared norm of the standardized vectors: lam's unit, so the grid fits any d."""
    mean, scale = standardization(vectors.float())
    return float(((vectors.float() - mean) / scale).double().pow(2).sum(1).mean().clamp_min(1e-12))


def fit_ridge_loto(vectors: torch.Tensor, targets: torch.Tensor,
                   grid: tuple[float, ...] = LAMBDA_GRID) -> tuple[RidgeMap, dict[float, float]]:
    """The map on every task passed in, its lam chosen by leave-one-task-out among them; and the
    score of every grid value (ties go to the larger lam, the simpler map)."""
    if len(vectors) == 1:  # nothing to leave out, and the map is that task's row whatever lam is
        return fit_ridge(vectors, targets, max(grid) * _scale(vectors)), {}
    scores = loto_scores(vectors, targets, grid)
    best = max(scores, key=lambda c: (scores[c], c))
    return fit_ridge(vectors, targets, best * _scale(vectors)), scores


def task_targets(rows: torch.Tensor, task_index: torch.Tensor, tasks: list[int]) -> torch.Tensor:
    """[len(tasks), D]: the mean normalized row of each task (its checkpoints)."""
    return torch.stack([rows[task_index == t].double().mean(0).float() for t in tasks])


def fit_training_tasks(rows: torch.Tensor, task_index: torch.Tensor, tasks: list[str],
                       vectors: dict[str, torch.Tensor], heldout: set[str] | list[str]) -> tuple[RidgeMap, dict[float, float]]:
    """The map of one rank's matrix (normalized ``rows``, each of task ``tasks[task_index]``) fitted on
    the tasks not in ``heldout``, lam by leave-one-task-out among them: a held-out task's rows and
    vector are never read."""
    train_ids = [i for i, t in enumerate(tasks) if t not in heldout]
    return fit_ridge_loto(torch.stack([vectors[tasks[i]] for i in train_ids]), task_targets(rows, task_index, train_ids))


@dataclass
class RidgeArchitecture:
    input_dim: int
    condition_dim: int
    tasks: int  # training tasks the map was fitted on (rows of its dual form)
    lam: float

    latent_dim = 1  # z is ignored

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RidgeArchitecture:
        return architecture_from_json(cls, d)


class RidgeGenerator(nn.Module):
    """A fitted ``RidgeMap`` as a generator module: ``decode`` reads the standardized condition."""

    def __init__(self, config: RidgeArchitecture):
        super().__init__()
        self.config = c = config
        self.register_buffer("conditions", torch.zeros(c.tasks, c.condition_dim, dtype=torch.float64))
        self.register_buffer("dual", torch.zeros(c.tasks, c.input_dim, dtype=torch.float64))
        self.register_buffer("row_mean", torch.zeros(c.input_dim))

    @classmethod
    def from_map(cls, fitted: RidgeMap) -> RidgeGenerator:
        module = cls(RidgeArchitecture(fitted.dual.shape[1], fitted.conditions.shape[1], len(fitted.conditions), fitted.lam))
        module.conditions.copy_(fitted.conditions)
        module.dual.copy_(fitted.dual)
        module.row_mean.copy_(fitted.row_mean)
        return module

    def num_parameters(self) -> int:
        return sum(b.numel() for b in self.buffers())

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        check_shape("z", z, self.config.latent_dim)
        check_shape("cond", cond, self.config.condition_dim)
        if z.shape[0] != cond.shape[0]:
            raise ValueError(f"z and cond batch sizes differ: {z.shape[0]} vs {cond.shape[0]}")
        return (self.row_mean.double() + (cond.double() @ self.conditions.T) @ self.dual).float()
