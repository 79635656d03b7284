"""How a process runs: seeds, torch threads, and the Accelerator (``runtime`` in params.yaml).

The same code runs in one process (CPU or one GPU) or several (``runtime.launcher``: torchrun on
CPUs, ``accelerate launch`` on GPUs): every training stage gets its Accelerator here, and only
its main process writes files, scores or logs runs. Batches are split, not multiplied: a
``batch_size`` in params.yaml is the global batch whatever the number of processes, so N
processes train what one process trains (up to floating-point summation order).
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


def scoring_device() -> torch.device:
    """Where scoring runs: this process's GPU when there is one (process 0 scores), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def set_threads(runtime: RuntimeParams) -> None:
    if runtime.threads:
        torch.set_num_threads(runtime.threads)


def make_accelerator(runtime: RuntimeParams):
    """The stage's Accelerator; its main process prints what Accelerate saw (``describe``)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(mixed_precision=runtime.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if accelerator.is_main_process:
        seen = describe(accelerator)
        print(f"accelerate: {seen['num_processes']} process(es), {seen['distributed_type']}, device {seen['device']}, "
              f"mixed precision {seen['mixed_precision']}", flush=True)
    return accelerator


def describe(accelerator) -> dict[str, str | int]:
    """What Accelerate runs on: logged as ``accelerate.*`` params of every training run in MLflow."""
    return {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type.value),
            "device": str(accelerator.device), "mixed_precision": str(accelerator.mixed_precision)}


def accelerate_params(accelerator) -> dict[str, str | int]:
    return {f"accelerate.{k}": v for k, v in describe(accelerator).items()}
