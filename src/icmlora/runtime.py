"""How a process runs: seeds, torch threads, and the Accelerator (``runtime`` in params.yaml).

The same code runs on a CPU, one GPU (bf16) or several (``accelerate launch``): every training
stage gets its Accelerator here, and only its main process writes files or logs runs.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from icmlora.config import RuntimeParams


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(runtime: RuntimeParams) -> None:
    if runtime.threads:
        torch.set_num_threads(runtime.threads)


def make_accelerator(runtime: RuntimeParams):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=runtime.mixed_precision)
