"""Generators: a task vector in, a normalized adapter row out. One module per kind; ``cvae.kind``
in params.yaml picks the one the pipeline trains (stage ``train_cvae``, whatever the kind) and
samples (``generate``, ``evaluate``):

- ``cvae``: the paper's 1-D conv CVAE (``icmlora.cvae``, kept for fidelity);
- ``ridge``: a closed-form linear map, its regularization chosen by leaving one training task out
  (``icmlora.generators.ridge``); also a held-out baseline of ``evaluate`` whatever the kind;
- ``hypernet``: a non-linear MLP from the task vector to the row (``icmlora.generators.hypernet``,
  Text-to-LoRA's lineage);
- ``flow``: conditional flow matching over rows (``icmlora.generators.flow``, the p-diff / RPG
  lineage): z is the starting noise, so samples differ.

Every kind is a torch module with the same face:
- ``config``: its exact shape, rebuilt from JSON (``to_json`` / ``model_from_json``), with
  ``input_dim`` (D), ``condition_dim`` (d) and ``latent_dim`` (the length of z);
- ``decode(z [B, latent_dim], cond [B, d]) -> rows [B, D]``, on the standardized condition
  (``icmlora.cvae.Generator`` standardizes and de-standardizes alike for every kind);
- ``num_parameters()``.
The trained kinds are fitted by one loop (``train_cvae``) through ``step_loss``; ridge is solved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

KINDS = ("cvae", "ridge", "hypernet", "flow")
TRAINED = ("cvae", "hypernet", "flow")


def build(params, input_dim: int, condition_dim: int) -> nn.Module:
    """A fresh, untrained module of kind ``params.kind`` (a trained kind) for rows of length
    ``input_dim`` and conditions of length ``condition_dim``; ``params`` is params.yaml's ``cvae``."""
    kind = params.kind
    if kind == "cvae":
        from icmlora.cvae import CVAE, architecture

        return CVAE(architecture(params, input_dim, condition_dim))
    if kind == "hypernet":
        from icmlora.generators.hypernet import Hypernet, HypernetArchitecture

        return Hypernet(HypernetArchitecture(input_dim, condition_dim, params.hypernet.hidden, params.hypernet.layers,
                                             params.hypernet.dropout))
    if kind == "flow":
        from icmlora.generators.flow import Flow, FlowArchitecture

        return Flow(FlowArchitecture(input_dim, condition_dim, params.flow.hidden, params.flow.layers, params.flow.steps))
    raise ValueError(f"cvae.kind {kind!r} is not trained by a loop (kinds trained so: {list(TRAINED)})")


def model_from_json(kind: str, config: dict[str, Any]) -> nn.Module:
    """The untrained module of ``kind`` whose shape ``config`` (a saved config.json's ``model``) records."""
    if kind == "cvae":
        from icmlora.cvae import CVAE, CVAEArchitecture

        return CVAE(CVAEArchitecture.from_json(config))
    if kind == "ridge":
        from icmlora.generators.ridge import RidgeArchitecture, RidgeGenerator

        return RidgeGenerator(RidgeArchitecture.from_json(config))
    if kind == "hypernet":
        from icmlora.generators.hypernet import Hypernet, HypernetArchitecture

        return Hypernet(HypernetArchitecture.from_json(config))
    if kind == "flow":
        from icmlora.generators.flow import Flow, FlowArchitecture

        return Flow(FlowArchitecture.from_json(config))
    raise ValueError(f"unknown generator kind {kind!r} (known: {list(KINDS)})")


def noise_width(kind: str, model: nn.Module) -> int:
    """Standard-normal values a training step draws per row (drawn alike in every process)."""
    c = model.config
    return {"cvae": c.latent_dim, "hypernet": 0, "flow": c.input_dim + 1}[kind]


def step_loss(kind: str, model: nn.Module, unwrapped: nn.Module, x: torch.Tensor, cond: torch.Tensor,
              noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, recon, kl) of one batch: ``model`` may be wrapped (DDP), so its forward runs; the CVAE's
    forward is the paper's (recon, mu, logvar) and its loss is taken after; the others' forwards
    return the loss triple (kl 0: they have no latent posterior)."""
    if kind == "cvae":
        recon, mu, logvar = model(x, cond, noise=noise)
        return unwrapped.loss(x, recon, mu, logvar)
    return model(x, cond, noise=noise)


def check_shape(name: str, t: torch.Tensor, width: int) -> None:
    if t.dim() != 2 or t.shape[1] != width:
        raise ValueError(f"{name} must have shape [batch, {width}], got {list(t.shape)}")


def architecture_from_json(cls, d: dict[str, Any]):
    """``cls(**d)`` naming unknown and missing keys (a dataclass of the kind's shape)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(d) - known), sorted(known - set(d))
    if unknown or missing:
        raise ValueError(f"invalid {cls.__name__}: unknown keys {unknown}, missing keys {missing} (keys: {sorted(known)})")
    return cls(**d)
