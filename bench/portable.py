"""Benchmark (not a test): which outputs stay byte-identical across CPU dispatch settings, and what the
portable kernels (src/icmlora/kernels.py) cost in time.

    .venv/bin/python bench/portable.py                 # metrics/portable.json

One machine stands in for several hosts: the micro profile's whole pipeline (every stage) is
reproduced from scratch once per setting in SETTINGS, each in its own clone of HEAD, and every output
in dvc.lock is compared with the first setting's. With the pin on, what varies between hosts is the
ISA the libraries could use (capped by the pin) and the core count (the pin fixes the thread count):
the pinned settings here run on 2 cores and on 1 (taskset). Without the pin, the host's own paths
decide: its native capability (AVX-512 here), or AVX2 only (an older host), each as a setting.
Then the cost: the default profile's base_model (--steps steps) with the pin and without, alternated
--repeats times in one clone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from icmlora.files import write_json  # noqa: E402

NATIVE = {"ICMLORA_PORTABLE_KERNELS": "0"}
SETTINGS = {  # name: (environment, taskset cores or None)
    "pinned, 2 cores": ({}, None),
    "pinned, 1 core": ({}, "0"),
    "native (AVX-512 here)": (NATIVE, None),
    "native, an AVX2-only host (MKL, oneDNN, ATen capped at AVX2)": (
        {**NATIVE, "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, None),
}
CLEARED = ("ICMLORA_PORTABLE_KERNELS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
           "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ICMLORA_PINNED_THREADS")


def clone(dest: Path, profile: str | None) -> tuple[Path, dict]:
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(PYTHONPATH=str(dest / "src"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               ICMLORA_LOG="WARNING")
    env.pop("MLFLOW_TRACKING_URI", None)
    if profile:
        subprocess.run([sys.executable, "-m", "icmlora", "profile", profile], cwd=dest, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    (dest / "dvc.lock").unlink(missing_ok=True)
    return dest, env


def _without_timings(value):
    """A JSON value with every wall-clock figure (a key naming seconds) left out."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _content(repo: Path, path: str, md5: str) -> str:
    """What an output holds, wall-clock timings aside: the lock's md5, or for JSON (a file, or a
    folder of them) a hash of the JSON without its `*seconds*` keys; metrics/timing/ is timings only."""
    if path.startswith("metrics/timing/"):
        return "timings only"
    target = repo / path
    files = sorted(f for f in target.rglob("*") if f.is_file()) if target.is_dir() else [target]
    if not files or any(f.suffix != ".json" for f in files):
        return md5
    digest = hashlib.md5()
    for f in files:
        digest.update(f.relative_to(repo).as_posix().encode())
        digest.update(json.dumps(_without_timings(json.loads(f.read_text())), sort_keys=True).encode())
    return "json:" + digest.hexdigest()


def lock_outputs(repo: Path) -> dict[str, tuple[str, str]]:
    """{output path: (md5, content without timings)} of every output and metrics/plots file dvc.lock records."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: (o["md5"], _content(repo, o["path"], o["md5"]))
            for stage in lock["stages"].values() for o in stage.get("outs", [])}


def reproduce(repo: Path, env: dict, changes: dict, cores: str | None, targets: list[str] | None = None) -> float:
    command = [sys.executable, "-m", "dvc", "repro", *(targets or [])]
    if cores is not None:
        command = ["taskset", "-c", cores, *command]
    start = time.perf_counter()
    subprocess.run(command, cwd=repo, env={**env, **changes}, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def identity(tmp: Path) -> dict:
    """The micro pipeline from scratch under every setting: which outputs equal the first setting's."""
    outputs, seconds = {}, {}
    for i, (name, (changes, cores)) in enumerate(SETTINGS.items()):
        repo, env = clone(tmp / f"micro-{i}", "micro")
        seconds[name] = round(reproduce(repo, env, changes, cores), 1)
        outputs[name] = lock_outputs(repo)
        print(f"portable: {name}: micro pipeline in {seconds[name]} s", flush=True)
    first = next(iter(SETTINGS))
    reference = outputs[first]
    same = {name: sorted(p for p, h in found.items() if reference.get(p) == h) for name, found in outputs.items()}
    differ = {name: sorted(p for p, h in found.items() if reference.get(p) != h) for name, found in outputs.items()}
    # what differs beyond wall-clock seconds (the LoRA metrics' train_seconds, metrics/timing/)
    differ_content = {name: sorted(p for p, h in found.items() if reference.get(p, (None, None))[1] != h[1])
                      for name, found in outputs.items()}
    return {
        "profile": "micro (every stage), reproduced from scratch per setting",
        "settings": {name: {"environment": changes, "taskset": cores, "seconds": seconds[name],
                            "outputs": len(outputs[name]), "identical_to_first": len(same[name]),
                            "differ_from_first": differ[name],
                            "differ_beyond_timings": differ_content[name]}
                     for name, (changes, cores) in SETTINGS.items()},
        "first": first,
        "timings": "wall-clock seconds differ between any two runs: metrics/timing/*.json, and the `*seconds*` keys "
                   "of JSON outputs (metrics/lora/<task>-s<seed>/r<rank>.json's train_seconds); differ_beyond_timings "
                   "compares those outputs without them",
        "pinned_outputs_identical": not differ_content["pinned, 1 core"],
    }


def cost(tmp: Path, steps: int, repeats: int) -> dict:
    """The pin's cost: base_model of the default profile, pinned and native alternately, in one clone."""
    repo, env = clone(tmp / "timing", None)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "prepare"], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    text = (repo / "params.yaml").read_text()
    changed = text.replace("    steps: 2400 ", f"    steps: {steps} ", 1)
    if changed == text:
        raise SystemExit("portable: params.yaml's base.train.steps is not 2400 as this script expects; update it")
    (repo / "params.yaml").write_text(changed)
    timing: dict[str, list[float]] = {"pinned": [], "native": []}
    for _ in range(repeats):
        for side, changes in (("pinned", {}), ("native", NATIVE)):
            timing[side].append(round(reproduce(repo, env, changes, None, ["--force", "--single-item", "base_model"]), 1))
    found = {side: {"runs": values, "median": statistics.median(values)} for side, values in timing.items()}
    return {"what": f"default profile, base_model at {steps} steps, pinned and native alternated", **found,
            "ratio_pinned_over_native": round(found["pinned"]["median"] / found["native"]["median"], 3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="base_model steps of the timing runs (default 300)")
    parser.add_argument("--repeats", type=int, default=2, help="timing runs per side (default 2)")
    parser.add_argument("--part", choices=("both", "identity", "cost"), default="both",
                        help="identity (outputs across settings; needs no idle machine), cost (the timing; run it "
                             "with nothing beside it) or both (default); one part keeps the other's record in --out")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "portable.json")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="portable-"))
    record = json.loads(args.out.read_text()) if args.part != "both" and args.out.exists() else {}
    if args.part in ("both", "identity"):
        record.update(identity(tmp))
    if args.part in ("both", "cost"):
        record["cost"] = cost(tmp, args.steps, args.repeats)
    record["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}
    write_json(args.out, record)
    subprocess.run(["rm", "-rf", str(tmp)], check=False)
    print(f"portable: wrote {args.out}: pinned outputs identical across the pinned settings: "
          f"{record.get('pinned_outputs_identical')}; pinned / native time "
          f"{record.get('cost', {}).get('ratio_pinned_over_native')}")


if __name__ == "__main__":
    main()
