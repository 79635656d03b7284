"""``cvae.kind: flow``: conditional flow matching over normalized adapter rows (the p-diff / RPG
lineage of generating weights from noise).

A velocity field ``v(x, t, cond)`` is fitted on straight paths from noise to rows: for a training
row ``x1``, noise ``x0 ~ N(0, I)`` and ``t ~ U(0, 1)``, ``x_t = (1 - t) x0 + t x1`` and the target is
``x1 - x0`` (Lipman et al. 2023, rectified flow). A sample starts at ``z`` (of the row's length: the
latent is the starting noise; z = 0 is the pipeline's deterministic sample) and takes ``steps``
Euler steps to t = 1. The network: ``x``, the condition and sinusoidal features of ``t`` each
projected to ``hidden``, summed, ``layers`` residual MLP blocks, a zero-initialized output layer.
The loss logged as ``recon`` is the velocity's mean squared error; ``kl`` is 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from icmlora.generators import architecture_from_json, check_shape

TIME_FEATURES = 16


@dataclass
class FlowArchitecture:
    input_dim: int
    condition_dim: int
    hidden: int
    layers: int
    steps: int

    @property
    def latent_dim(self) -> int:
        return self.input_dim  # z is the starting point of the flow

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FlowArchitecture:
        return architecture_from_json(cls, d)


def time_features(t: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, TIME_FEATURES]: sines and cosines of t at geometric frequencies."""
    freqs = torch.exp(torch.arange(TIME_FEATURES // 2, dtype=torch.float32, device=t.device) * (math.log(100.0) / 7))
    angles = t.float()[:, None] * freqs[None] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Flow(nn.Module):
    def __init__(self, config: FlowArchitecture):
        super().__init__()
        self.config = c = config
        self.x_in = nn.Linear(c.input_dim, c.hidden)
        self.c_in = nn.Linear(c.condition_dim, c.hidden)
        self.t_in = nn.Linear(TIME_FEATURES, c.hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(c.hidden), nn.Linear(c.hidden, c.hidden), nn.GELU(),
                                                  nn.Linear(c.hidden, c.hidden)) for _ in range(c.layers))
        self.out = nn.Linear(c.hidden, c.input_dim)
        nn.init.zeros_(self.out.weight)  # starts as the zero field: a sample stays where it starts
        nn.init.zeros_(self.out.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.x_in(x) + self.c_in(cond.to(x.dtype)) + self.t_in(time_features(t))
        for block in self.blocks:
            h = h + block(h)
        return self.out(F.gelu(h))

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = self.config
        check_shape("z", z, c.latent_dim)
        check_shape("cond", cond, c.condition_dim)
        if z.shape[0] != cond.shape[0]:
            raise ValueError(f"z and cond batch sizes differ: {z.shape[0]} vs {cond.shape[0]}")
        x, dt = z.float(), 1.0 / c.steps
        for k in range(c.steps):
            x = x + dt * self.velocity(x, torch.full((len(x),), k * dt, device=x.device), cond)
        return x

    def forward(self, x1: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor | None = None):
        """(total, recon, kl) = (velocity MSE, the same, 0). ``noise`` [B, D + 1]: the starting points
        and, through the normal CDF, the times (drawn here when not given)."""
        c = self.config
        check_shape("x", x1, c.input_dim)
        check_shape("cond", cond, c.condition_dim)
        if noise is None:
            noise = torch.randn(len(x1), c.input_dim + 1, device=x1.device)
        noise = noise.to(x1.device, torch.float32)
        x0, t = noise[:, : c.input_dim], torch.special.ndtr(noise[:, c.input_dim])
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1.float()
        mse = F.mse_loss(self.velocity(xt, t, cond), x1.float() - x0)
        return mse, mse, mse.new_zeros(())
