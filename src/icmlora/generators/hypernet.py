"""``cvae.kind: hypernet``: a non-linear map from the task vector to the adapter row (Text-to-LoRA's
lineage): ``cond -> [Linear, GELU, Dropout] x layers -> Linear -> D``, fitted by the squared error
on every training checkpoint's row. No latent: z is read for its shape only, so every sample of a
task is one adapter (its spread is 0, and best-of-N cannot pay)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from icmlora.generators import architecture_from_json, check_shape


@dataclass
class HypernetArchitecture:
    input_dim: int
    condition_dim: int
    hidden: int
    layers: int
    dropout: float

    latent_dim = 1  # z is ignored; one value keeps every kind's sampling alike

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HypernetArchitecture:
        return architecture_from_json(cls, d)


class Hypernet(nn.Module):
    def __init__(self, config: HypernetArchitecture):
        super().__init__()
        self.config = c = config
        body: list[nn.Module] = []
        width = c.condition_dim
        for _ in range(c.layers):
            body += [nn.Linear(width, c.hidden), nn.GELU(), nn.Dropout(c.dropout)]
            width = c.hidden
        self.body = nn.Sequential(*body)
        self.out = nn.Linear(width, c.input_dim)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        check_shape("z", z, self.config.latent_dim)
        check_shape("cond", cond, self.config.condition_dim)
        if z.shape[0] != cond.shape[0]:
            raise ValueError(f"z and cond batch sizes differ: {z.shape[0]} vs {cond.shape[0]}")
        return self.out(self.body(cond.float()))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor | None = None):
        """(total, recon, kl) = (MSE, MSE, 0) of the predicted rows against ``x``."""
        check_shape("x", x, self.config.input_dim)
        pred = self.decode(cond.new_zeros(len(cond), 1), cond)
        mse = F.mse_loss(pred, x.to(pred.dtype))
        return mse, mse, mse.new_zeros(())
