"""Independent jobs side by side: N worker processes, each a single process of its own, take items
from one shared list until none is left (``runtime.lora_workers``: the adapters of a train_lora
stage). A worker that is free takes the next item, so a costly item does not hold back the others.

Workers are spawned, not forked: a fresh interpreter initializes torch (threads, CUDA) itself.
Each runs ``torch.set_num_threads(threads or max(1, cores // N))`` and, where CUDA is available,
sees one device (``CUDA_VISIBLE_DEVICES``), worker i the i-th of this process's visible devices,
round-robin. The caller waits for every worker; any that fails (an exception, a signal) makes
``run_workers`` raise ``WorkerFailed`` naming it and the item it was on, after the others finish
(what they finished is theirs to keep: the jobs write their work where a rerun resumes it).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

NO_ITEM = -1


class WorkerFailed(RuntimeError):
    """One or more workers exited without finishing their items."""


def cores() -> int:
    """The CPU cores this process may run on (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_threads(threads: int, workers: int) -> int:
    """Torch intra-op threads per worker: ``threads`` when set (``runtime.threads``); the pinned count
    under the portable kernels (``icmlora.kernels``: a reduction's summation order follows the thread
    count, so a worker with fewer threads would write other bits than one process); else an equal
    share of the cores, so N workers do not each start a thread per core and fight over them."""
    from icmlora.kernels import PINNED_MARK

    return threads or int(os.environ.get(PINNED_MARK) or 0) or max(1, cores() // workers)


def visible_devices() -> list[str]:
    """The CUDA devices this process sees, as ``CUDA_VISIBLE_DEVICES`` entries; [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _take(items: Sequence, next_item, current, index: int) -> Iterator:
    """The items this worker takes, one at a time; ``current[index]`` says which it is on (shared
    memory: still readable when the worker is killed)."""
    while True:
        with next_item.get_lock():
            k = next_item.value
            next_item.value += 1
        if k >= len(items):
            current[index] = NO_ITEM
            return
        current[index] = k
        yield items[k]


def _worker(index: int, workers: int, job: Callable, items: Sequence, next_item, current, threads: int,
            device: str | None, args: tuple) -> None:
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device  # before torch initializes CUDA in this process
    import torch

    torch.set_num_threads(worker_threads(threads, workers))
    job(index, _take(items, next_item, current, index), *args)


def _status(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def run_workers(job: Callable[..., None], items: Sequence, workers: int, *, threads: int = 0, what: str = "item",
                args: tuple[Any, ...] = ()) -> None:
    """Run ``job(index, items_it_takes, *args)`` in ``workers`` spawned processes (``job`` and ``args``
    must pickle: a module-level function and plain values); return when every worker has ended.
    Raises ``WorkerFailed`` naming each failed worker and the ``what`` (e.g. "rank") it was on."""
    ctx = multiprocessing.get_context("spawn")
    next_item = ctx.Value("i", 0)
    current = ctx.Array("i", [NO_ITEM] * workers)
    devices = visible_devices()
    procs = [ctx.Process(target=_worker, name=f"worker {i}",
                         args=(i, workers, job, list(items), next_item, current, threads,
                               devices[i % len(devices)] if devices else None, args)) for i in range(workers)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    finally:  # interrupted (Ctrl-C, an error here): no worker outlives the stage
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
    failed = []
    for i, proc in enumerate(procs):
        if proc.exitcode != 0:
            on = (f"{what} {items[current[i]]}" if current[i] != NO_ITEM
                  else f"no {what} (before its first or after its last)")
            failed.append(f"worker {i} of {workers} (pid {proc.pid}) failed on {on}: {_status(proc.exitcode)}")
    if failed:
        raise WorkerFailed("; ".join(failed))
