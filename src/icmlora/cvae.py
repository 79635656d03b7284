"""The generator: the paper's 1-D convolutional conditional VAE over flattened LoRA weights.

A flattened adapter ``x`` of length ``input_dim`` is zero-padded to ``padded_dim`` (a
multiple of ``pad_multiple``), read as a sequence of ``patch``-value steps (``patch``
channels; the paper: 1) and halved in length by each stride-2 convolution of the encoder. The task vector ``cond`` joins twice: before the
mu / log-variance heads and with ``z`` before the decoder, which mirrors the encoder with
stride-2 transposed convolutions and ends in a Conv1d to one channel; the output is cut
back to ``input_dim``. With ``patch`` P > 1 the decoder's last convolution writes P channels,
read back as P consecutive values: no layer runs at the full length D, where 1-D convolutions
with a handful of channels are slow and their activations are most of the memory.

``CVAEArchitecture`` is a network's exact shape (saved with a trained generator, it rebuilds
the network); ``architecture(params.cvae, D, d)`` resolves params.yaml's knobs, some of which
follow D, into one. A ``Generator`` is a trained CVAE plus the standardization of its condition:
task vector in, normalized adapter row out.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from icmlora.config import CvaeParams

PAPER_CHANNELS = [8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8]
NORMS = ("group", "batch", "none")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class CVAEArchitecture:
    """A network's exact shape. Every field is set from params.yaml (``architecture``) or a saved
    generator's config.json, never defaulted here. The paper's: 12 layers (PAPER_CHANNELS),
    kernel 7, latent 256, padding to 4096, kl_weight 0.005, hidden_dim None, norm "batch"."""

    input_dim: int
    condition_dim: int
    channels: list[int]
    kernel_size: int
    latent_dim: int
    pad_multiple: int
    kl_weight: float
    hidden_dim: int | None  # encoder feature before the heads; None -> latent_dim (the paper's 7.5 M count)
    # GroupNorm by default, not the paper's BatchNorm: the paper trains at batch 2, where
    # BatchNorm's batch statistics make each sample's encoding depend on the other sample
    # and differ from the running statistics used in eval; at batch 1 it raises once a
    # layer's output has a single value per channel. GroupNorm normalises each sample on its
    # own and behaves the same in train and eval. "batch" reproduces the paper.
    norm: str
    # Values per input step (space-to-depth): 1 reproduces the paper; P > 1 starts the encoder at
    # D / P positions with P channels and ends the decoder the same way. Total stride P * 2**layers.
    patch: int = 1
    # Width of an affine path from the condition to the output, added to the decoder's (0: none, the
    # paper). The conv decoder given a task vector it never saw returns something near a training
    # task's adapter; a map that is affine in the condition can also combine what training tasks
    # taught it (a new hue with a known row). Rank-limited: condition -> head -> D.
    condition_head: int = 0
    # Whether the conv decoder reads the condition too (the paper: it does). With a condition head,
    # False leaves the decoder the latent alone: the task enters the output affinely, and z models
    # what varies within a task (its checkpoints).
    decoder_condition: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.channels, tuple):
            self.channels = list(self.channels)
        problems = self.problems()
        if problems:
            raise ValueError(
                "invalid CVAEArchitecture: " + "; ".join(f"{key}: {msg}" for key, msg in problems)
            )

    def problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for key in ("input_dim", "condition_dim", "kernel_size", "latent_dim", "pad_multiple", "patch"):
            v = getattr(self, key)
            if not _is_int(v) or v < 1:
                out.append((key, f"must be a positive integer, got {v!r}"))
        if not _is_int(self.condition_head) or self.condition_head < 0:
            out.append(("condition_head", f"must be an integer >= 0, got {self.condition_head!r}"))
        if not isinstance(self.decoder_condition, bool):
            out.append(("decoder_condition", f"must be true or false, got {self.decoder_condition!r}"))
        elif not self.decoder_condition and not self.condition_head:
            out.append(("decoder_condition", "false needs a condition_head: otherwise nothing generated depends on the task"))
        if self.hidden_dim is not None and (not _is_int(self.hidden_dim) or self.hidden_dim < 1):
            out.append(("hidden_dim", f"must be a positive integer or null, got {self.hidden_dim!r}"))
        if _is_int(self.kernel_size) and self.kernel_size % 2 == 0:
            # With padding k//2 an even kernel cannot make a stride-2 transposed conv
            # exactly double the length (it would need output_padding 2 >= stride).
            out.append(("kernel_size", f"must be odd, got {self.kernel_size}"))
        if not isinstance(self.channels, list) or not self.channels:
            out.append(("channels", f"must be a non-empty list of positive integers, got {self.channels!r}"))
        elif not all(_is_int(c) and c >= 1 for c in self.channels):
            out.append(("channels", f"every entry must be a positive integer, got {self.channels!r}"))
        elif _is_int(self.pad_multiple) and self.pad_multiple >= 1:
            stride = self.total_stride if _is_int(self.patch) and self.patch >= 1 else 2 ** len(self.channels)
            if self.pad_multiple % stride:
                out.append((
                    "pad_multiple",
                    f"{self.pad_multiple} is not a multiple of patch * 2**len(channels) = {stride}",
                ))
        if (
            not isinstance(self.kl_weight, (int, float))
            or isinstance(self.kl_weight, bool)
            or not math.isfinite(self.kl_weight)
            or self.kl_weight < 0
        ):
            out.append(("kl_weight", f"must be a finite number >= 0, got {self.kl_weight!r}"))
        if self.norm not in NORMS:
            out.append(("norm", f"must be one of {list(NORMS)}, got {self.norm!r}"))
        return out

    @property
    def padded_dim(self) -> int:
        return -(-self.input_dim // self.pad_multiple) * self.pad_multiple

    @property
    def total_stride(self) -> int:
        return self.patch * 2 ** len(self.channels)

    @property
    def bottleneck_length(self) -> int:
        """Sequence length after the encoder's convolutions."""
        return self.padded_dim // self.total_stride

    @property
    def feature_dim(self) -> int:
        return self.hidden_dim if self.hidden_dim is not None else self.latent_dim

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CVAEArchitecture:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"invalid CVAEArchitecture: unknown keys {unknown} (allowed: {sorted(known)})")
        # Generators saved before ``patch`` / ``condition_head`` existed are the paper's layout.
        d = {"patch": 1, "condition_head": 0, "decoder_condition": True, **d}
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"invalid CVAEArchitecture: missing keys {missing}")
        return cls(**d)


def default_channels(input_dim: int, max_layers: int = 12, min_length: int = 8) -> list[int]:
    """Encoder channels for ``input_dim``: the paper's list when D is large, fewer layers when small.

    Uses the most layers (at most ``max_layers``) that leave at least ``min_length`` positions
    after the convolutions when padding to the total stride, and at least one layer. Channels
    double from 8 over the first half and mirror back, so 12 layers give the paper's list.
    """
    if not _is_int(input_dim) or input_dim < 1:
        raise ValueError(f"input_dim: must be a positive integer, got {input_dim!r}")
    if not _is_int(max_layers) or max_layers < 1:
        raise ValueError(f"max_layers: must be a positive integer, got {max_layers!r}")
    if not _is_int(min_length) or min_length < 1:
        raise ValueError(f"min_length: must be a positive integer, got {min_length!r}")
    n = 1
    while n < max_layers and -(-input_dim // 2 ** (n + 1)) >= min_length:
        n += 1
    up = [8 * 2**i for i in range((n + 1) // 2)]
    return up + up[: n // 2][::-1]


def architecture(params: CvaeParams, input_dim: int, condition_dim: int) -> CVAEArchitecture:
    """The network for D = ``input_dim`` and task vectors of ``condition_dim``: channels from
    ``default_channels`` unless set, padding to the total stride unless set (the paper's 4096 is
    exactly 2**12, its total stride; padding tiny inputs to 4096 would mostly feed it zeros)."""
    channels = list(params.channels) or default_channels(-(-input_dim // params.patch), params.max_layers)
    return CVAEArchitecture(
        input_dim=input_dim, condition_dim=condition_dim, channels=channels, kernel_size=params.kernel_size,
        latent_dim=params.latent_dim, hidden_dim=params.hidden_dim or None,
        pad_multiple=params.pad_multiple or params.patch * 2 ** len(channels), kl_weight=params.kl_weight,
        norm=params.norm, patch=params.patch, condition_head=params.condition_head,
        decoder_condition=params.decoder_condition,
    )


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    return nn.Identity()


class CVAE(nn.Module):
    def __init__(self, config: CVAEArchitecture):
        super().__init__()
        self.config = config
        c = config
        k, pad = c.kernel_size, c.kernel_size // 2
        chans = list(c.channels)

        enc: list[nn.Module] = []
        prev = c.patch
        for ch in chans:
            enc += [nn.Conv1d(prev, ch, k, stride=2, padding=pad), _norm(c.norm, ch), nn.LeakyReLU()]
            prev = ch
        self.encoder = nn.Sequential(*enc)
        flat = chans[-1] * c.bottleneck_length
        self.enc_fc = nn.Sequential(nn.Linear(flat, c.feature_dim), nn.LeakyReLU())
        self.fc_mu = nn.Linear(c.feature_dim + c.condition_dim, c.latent_dim)
        self.fc_logvar = nn.Linear(c.feature_dim + c.condition_dim, c.latent_dim)

        self.dec_fc = nn.Linear(c.latent_dim + (c.condition_dim if c.decoder_condition else 0), flat)
        rev = chans[::-1]
        dec: list[nn.Module] = []
        for i, ch in enumerate(rev):
            out = rev[i + 1] if i + 1 < len(rev) else rev[-1]
            # (L-1)*2 - 2*(k//2) + k = 2L - 1 for odd k, so output_padding=1 doubles exactly.
            dec += [nn.ConvTranspose1d(ch, out, k, stride=2, padding=pad, output_padding=1), nn.ELU()]
        self.decoder = nn.Sequential(*dec)
        self.out_conv = nn.Conv1d(rev[-1], c.patch, k, padding=pad)
        if c.condition_head:
            self.condition_head = nn.Sequential(nn.Linear(c.condition_dim, c.condition_head, bias=False),
                                                nn.Linear(c.condition_head, c.input_dim))
            # Starts as the paper's network: the path adds nothing until training moves it.
            nn.init.zeros_(self.condition_head[1].weight)
            nn.init.zeros_(self.condition_head[1].bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check(self, name: str, t: torch.Tensor, width: int) -> None:
        if t.dim() != 2 or t.shape[1] != width:
            raise ValueError(f"{name} must have shape [batch, {width}], got {list(t.shape)}")

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        self._check("x", x, c.input_dim)
        self._check("cond", cond, c.condition_dim)
        if cond.shape[0] != x.shape[0]:
            raise ValueError(f"x and cond batch sizes differ: {x.shape[0]} vs {cond.shape[0]}")
        h = F.pad(x, (0, c.padded_dim - c.input_dim))
        # [B, D'] -> [B, patch, D' / patch]: channel j of step i is value i * patch + j.
        h = h.view(x.shape[0], c.padded_dim // c.patch, c.patch).transpose(1, 2)
        h = self.encoder(h).flatten(1)
        h = torch.cat([self.enc_fc(h), cond.to(h.dtype)], dim=1)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = self.config
        self._check("z", z, c.latent_dim)
        self._check("cond", cond, c.condition_dim)
        if cond.shape[0] != z.shape[0]:
            raise ValueError(f"z and cond batch sizes differ: {z.shape[0]} vs {cond.shape[0]}")
        h = self.dec_fc(torch.cat([z, cond.to(z.dtype)], dim=1) if c.decoder_condition else z)
        h = h.view(z.shape[0], c.channels[-1], c.bottleneck_length)
        h = self.out_conv(self.decoder(h))  # [B, patch, D' / patch]
        out = h.transpose(1, 2).reshape(z.shape[0], c.padded_dim)[:, : c.input_dim]
        if c.condition_head:
            out = out + self.condition_head(cond.to(out.dtype))
        return out

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, sample: bool | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sample`` (default: ``self.training``) draws z ~ N(mu, sigma), with ``noise`` as the
        standard normal draw when given (else ``torch.randn_like(mu)``); otherwise z = mu."""
        mu, logvar = self.encode(x, cond)
        if self.training if sample is None else sample:
            z = mu + (torch.randn_like(mu) if noise is None else noise.to(mu)) * torch.exp(0.5 * logvar)
        else:
            z = mu
        return self.decode(z, cond), mu, logvar

    def loss(
        self, x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, recon_mse, kl): MSE per element, KL summed over latents and averaged per sample."""
        # The reference code compared a [B, D] output with a [B, 1, D] target; broadcasting
        # made that [B, B, D], scoring every reconstruction against every input of the batch.
        # Shapes must match exactly so each output is compared with its own input.
        if recon.shape != x.shape or x.dim() != 2:
            raise ValueError(f"recon and x must both be [batch, D]; got {list(recon.shape)} and {list(x.shape)}")
        if mu.shape != logvar.shape or mu.dim() != 2 or mu.shape[0] != x.shape[0]:
            raise ValueError(f"mu and logvar must both be [batch, latent]; got {list(mu.shape)} and {list(logvar.shape)}")
        recon_mse = F.mse_loss(recon, x.to(recon.dtype))
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()
        return recon_mse + self.config.kl_weight * kl, recon_mse, kl


class Generator:
    """A trained generator of any kind (``icmlora.generators``; the paper's CVAE first) + the condition
    standardization: task vector -> normalized adapter row.

    The condition is the task vector minus the training tasks' mean vector, over their spread:
    raw hidden-state summaries of different tasks differ by little next to what they share.
    """

    def __init__(self, model: CVAE, cond_mean: torch.Tensor, cond_scale: torch.Tensor, meta: dict):
        self.model, self.cond_mean, self.cond_scale, self.meta = model.eval(), cond_mean, cond_scale, meta

    @staticmethod
    def standardization(train_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, scale) of the training tasks' vectors [tasks, d]: one scale for every dimension.
        With one training task there is no spread to measure: scale 1 (not 0, which would blow
        any other task's vector up)."""
        mean = train_vectors.mean(0)
        if len(train_vectors) < 2:
            return mean, torch.ones_like(mean)
        return mean, (train_vectors - mean).std().clamp_min(1e-8).expand_as(mean).clone()

    def condition(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors.float() - self.cond_mean) / self.cond_scale

    def to(self, device) -> Generator:
        self.model.to(device)
        return self

    @torch.no_grad()
    def sample(self, vector: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Normalized adapter rows [len(z), D] (on the CPU) for one task vector, decoded where the model is."""
        device = next(iter([*self.model.parameters(), *self.model.buffers()])).device  # a ridge map has buffers only
        cond = self.condition(vector.reshape(1, -1).cpu()).expand(len(z), -1)
        return self.model.decode(z.to(device), cond.to(device)).float().cpu()
