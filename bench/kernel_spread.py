"""Benchmark (not a test): the spread behind the tests' tolerances, under several CPU dispatch settings.

    .venv/bin/python bench/kernel_spread.py            # the fast equality tests, every setting
    .venv/bin/python bench/kernel_spread.py --long     # and the two-process tests (a micro pipeline each)

The tests that compare two computations of one thing (two thread counts, two processes, cached image
features against pixels, a resumed run against an uninterrupted one) check each measured value with
``tests/spread.py``'s ``within``, which records it when ICMLORA_SPREAD_LOG is set. This runs those tests
under each dispatch setting in SETTINGS (ATen's CPU capability, MKL's and oneDNN's code paths, thread
counts, the portable pin of icmlora.kernels on or off) and writes, per setting, the largest value each
measure reached, beside its tolerance, to metrics/kernel_spread.json. A tolerance is kept only if every
setting leaves a margin under it; docs/reproducibility.md quotes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from icmlora.files import write_json  # noqa: E402

NATIVE = {"ICMLORA_PORTABLE_KERNELS": "0"}
SETTINGS = {
    "portable (the default pin)": {},
    "portable, 1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "native (this host's fastest paths)": NATIVE,
    "native, ATen at AVX2": {**NATIVE, "ATEN_CPU_CAPABILITY": "avx2"},
    "native, MKL and oneDNN at AVX2": {**NATIVE, "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "native, 1 thread": {**NATIVE, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}
TESTS = [
    "tests/test_lora_workers.py::test_two_workers_write_what_one_process_writes",
    "tests/test_florence.py::test_lora_training_on_cached_image_features_equals_training_on_pixels",
    "tests/test_resume.py::test_killed_cvae_run_resumes_with_only_the_remaining_epochs",
    "tests/test_lora_batch.py",
    "tests/test_few_shot.py::test_a_folds_runs_trained_in_one_pass_train_as_each_would_alone",
]
LONG_TESTS = ["tests/test_multiprocess.py::test_two_processes_train_what_one_process_trains"]


def run_setting(env_changes: dict[str, str], tests: list[str]) -> tuple[dict[str, dict], float, str]:
    """({measure: {"measured": max, "tolerance": t}}, seconds, pytest's last line) of the tests under one setting."""
    with tempfile.TemporaryDirectory(prefix="spread-") as tmp:
        log = Path(tmp) / "spread.jsonl"
        env = {k: v for k, v in os.environ.items() if k not in ("ICMLORA_PORTABLE_KERNELS", "ATEN_CPU_CAPABILITY",
                                                                 "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS",
                                                                 "MKL_NUM_THREADS")}
        env.update(env_changes, ICMLORA_SPREAD_LOG=str(log))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                              env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        measures: dict[str, dict] = {}
        for line in log.read_text().splitlines() if log.exists() else []:
            record = json.loads(line)
            seen = measures.setdefault(record["name"], {"measured": 0.0, "tolerance": record["tolerance"]})
            seen["measured"] = max(seen["measured"], record["measured"])
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        return measures, seconds, summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="also the two-process tests (minutes per setting)")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "kernel_spread.json")
    args = parser.parse_args(argv)
    tests = TESTS + (LONG_TESTS if args.long else [])
    settings, worst = {}, {}
    for name, changes in SETTINGS.items():
        measures, seconds, summary = run_setting(changes, tests)
        settings[name] = {"environment": changes, "pytest": summary, "seconds": round(seconds, 1),
                          "measured": {k: v["measured"] for k, v in sorted(measures.items())}}
        for key, value in measures.items():
            entry = worst.setdefault(key, {"tolerance": value["tolerance"], "largest": 0.0, "where": None})
            if value["measured"] >= entry["largest"]:
                entry.update(largest=value["measured"], where=name)
        print(f"kernel_spread: {name}: {summary} ({seconds:.0f} s)", flush=True)
    for entry in worst.values():
        entry["margin"] = round(entry["tolerance"] / entry["largest"], 1) if entry["largest"] else None
    # A measure a setting did not record (its test failed, or was skipped) is named, not left out.
    for name, entry in worst.items():
        entry["not_measured_in"] = [s for s, v in settings.items() if name not in v["measured"]]
    failed = [s for s, v in settings.items() if " failed" in v["pytest"] or " error" in v["pytest"]]
    import torch

    write_json(args.out, {
        "tests": tests, "settings": settings, "measures": dict(sorted(worst.items())), "settings_with_failures": failed,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": _cpu_name(),
                    "torch": torch.__version__, "native_capability": _native_capability()},
    })
    print(f"kernel_spread: wrote {args.out}" + (f"; tests FAILED under {failed}" if failed else ""))
    if failed:
        raise SystemExit(1)


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _native_capability() -> str:
    env = {**os.environ, **NATIVE}
    return subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
