"""Per-process peak memory for bench/gpu_check.py, without touching the stage code.

bench/gpu_check.py puts this folder first on PYTHONPATH of the pipelines it runs and sets
GPU_CHECK_MEM_DIR; Python imports `sitecustomize` at start-up, so every stage process writes,
when it exits normally, one JSON file there: its argv, start and end time (time.time()), peak
RSS and, if it used CUDA, torch's allocator peaks on each GPU (max_memory_allocated /
max_memory_reserved: this process alone, whatever else shares the GPU, without the CUDA
context). A process killed by a signal writes nothing. Only processes whose command line names
icmlora write a file (not dvc, git or pip).

If the interpreter has a sitecustomize of its own further down sys.path, it is run after this
one, so shadowing it changes nothing else.
"""

import atexit
import json
import os
import sys
import time

_DIR = os.environ.get("GPU_CHECK_MEM_DIR")
_START = time.time()


def _write() -> None:
    if not any("icmlora" in arg for arg in sys.argv):  # read at exit: under -m, argv[0] is "-m" at start-up
        return
    record = {"pid": os.getpid(), "argv": sys.argv, "start": _START, "end": time.time()}
    try:
        import resource

        record["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    except Exception:  # noqa: BLE001 - a measurement must never fail the stage
        pass
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            record["cuda"] = [{"device": i,
                               "max_allocated_mib": round(torch.cuda.max_memory_allocated(i) / 2**20, 1),
                               "max_reserved_mib": round(torch.cuda.max_memory_reserved(i) / 2**20, 1)}
                              for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001
        record["cuda_error"] = repr(exc)
    try:
        path = os.path.join(_DIR, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as handle:
            json.dump(record, handle)
        os.replace(path + ".tmp", path)
    except OSError:
        pass


if _DIR:
    atexit.register(_write)


def _chain() -> None:
    """Run the next sitecustomize on sys.path (the interpreter's own, if any)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or "."), "sitecustomize.py")
        if os.path.dirname(candidate) != here and os.path.isfile(candidate):
            with open(candidate) as handle:
                exec(compile(handle.read(), candidate, "exec"), {"__name__": "sitecustomize", "__file__": candidate})
            return


_chain()
