"""The CPU's numeric code paths, pinned so that a stage writes the same bits on any x86-64 host
with AVX2 (``runtime.portable_kernels``, on by default).

Floating point on a CPU depends on which kernels run, and the libraries under torch choose them
by the host: MKL (matrix products) by the instructions the CPU has and its vendor, oneDNN
(convolutions) by its instructions (AVX2, AVX-512, AMX), ATen's own kernels by
``ATEN_CPU_CAPABILITY``, and a reduction split over threads adds its partial sums in an order
that depends on how many there are. Left alone, two hosts write different models from the same
code and data (an AMD EPYC and an Intel Xeon gave 4 of the lock's 50 outputs alike). Pinned,
every host runs the same paths:

- ``MKL_CBWR=AVX2,STRICT``: MKL's conditional numerical reproducibility on its AVX2 code path,
  strict (its products give the same bits whatever the thread count);
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN never uses AVX-512 or AMX;
- ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorized kernels at AVX2;
- ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``: ``runtime.threads``, or ``PORTABLE_THREADS`` when it
  is 0 (a host's core count would otherwise decide how reductions split).

They must be set before torch is imported (MKL and oneDNN read them once): ``pin`` runs when the
``icmlora.stages`` package is imported, before any stage module imports torch, in every stage
process and in every worker a stage spawns (workers inherit the environment); tests pin in
conftest.py before importing torch. A variable already set in the environment is left as it is:
the user's choice wins (``.ci/run`` runs the equality tests a second time that way, under the
native kernels). On a host with an NVIDIA GPU nothing is pinned: GPU kernels are not pinned by
these, and there we promise only the seeds study's ranges (docs: reproducibility).

The host's own paths, for a benchmark or a fast run: ``runtime.portable_kernels: false``, or
``ICMLORA_PORTABLE_KERNELS=0`` in the environment (which wins over params.yaml either way).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PORTABLE_THREADS = 2  # every host of this project has 2 cores; a bigger one runs 2 threads when pinned
PINNED = {"MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SWITCH = "ICMLORA_PORTABLE_KERNELS"
PINNED_MARK = "ICMLORA_PINNED_THREADS"  # set by pin (and inherited by workers): the thread count it pinned


def portable_settings(threads: int = 0) -> dict[str, str]:
    """The variables ``pin`` sets (``threads``: ``runtime.threads``, 0 for ``PORTABLE_THREADS``)."""
    count = str(threads or PORTABLE_THREADS)
    return {**PINNED, **{name: count for name in THREAD_VARIABLES}}


def has_nvidia_gpu() -> bool:
    return Path("/dev/nvidiactl").exists()


def _params_file(argv: list[str]) -> Path:
    """The --params a stage is run with (``--params FILE`` or ``--params=FILE``), else params.yaml."""
    for i, arg in enumerate(argv):
        if arg == "--params" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--params="):
            return Path(arg.split("=", 1)[1])
    return Path("params.yaml")


def _runtime_settings(path: Path) -> tuple[bool, int]:
    """(runtime.portable_kernels, runtime.threads) of a params file; (True, 0) when it cannot be
    read here (the stage's own parse reports a bad file, with its line, after this)."""
    try:
        from icmlora.config import read_yaml

        runtime = (read_yaml(path.read_text(encoding="utf-8"), path) or {}).get("runtime") or {}
        portable, threads = runtime.get("portable_kernels", True), runtime.get("threads", 0)
    except Exception:  # noqa: BLE001 - any problem is the stage's parse's to report, not this one's
        return True, 0
    return portable is not False, threads if isinstance(threads, int) and threads > 0 else 0


def pin(argv: list[str] | None = None, environ: dict | None = None) -> dict[str, str]:
    """Set the portable kernel variables the environment does not set yet; returns those it set.
    Does nothing when switched off (``ICMLORA_PORTABLE_KERNELS=0`` or ``runtime.portable_kernels:
    false``), on a host with an NVIDIA GPU, or when torch is already imported (too late to matter:
    say so rather than pretend)."""
    env = os.environ if environ is None else environ
    switch = env.get(SWITCH)
    portable, threads = _runtime_settings(_params_file(sys.argv[1:] if argv is None else argv))
    if switch is not None:
        portable = switch.strip().lower() not in ("0", "false", "no", "off")
    if not portable or has_nvidia_gpu():
        return {}
    wanted = {k: v for k, v in portable_settings(threads).items() if k not in env}
    if wanted and "torch" in sys.modules and environ is None:
        print("icmlora: note: torch was imported before icmlora.kernels.pin: the portable kernels are not pinned in "
              "this process (import icmlora.stages first)", file=sys.stderr)
        return {}
    env.update(wanted)
    env[PINNED_MARK] = env["OMP_NUM_THREADS"]
    return wanted


def apply_threads() -> None:
    """torch's thread count as pinned: its default follows OMP_NUM_THREADS only up to the host's core
    count, so a 1-core host would run 1 thread where the pin says 2. Called once torch is imported
    (``stage_cli``, each worker)."""
    count = os.environ.get(PINNED_MARK)
    if count and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(count))
