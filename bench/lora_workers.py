"""Benchmark (not a test): every `train_lora@*` stage under several `runtime` settings of how its adapters
train: one after another (`lora_batch: 1`), together in one forward and backward pass a step (`lora_batch:
0`, the default), side by side in worker processes (`lora_workers: 2`), from a fresh clone.

    .venv/bin/python bench/lora_workers.py                      # lora_workers 1 against 2 (~30 min on a 2-core CPU)
    .venv/bin/python bench/lora_workers.py --settings lora_batch=1 lora_batch=0 lora_workers=2,lora_batch=2
    .venv/bin/python bench/lora_workers.py --profile micro      # a quick check of the script (~6 min)
    .venv/bin/python bench/lora_workers.py --repo DIR           # in a checkout reproduced up to base_model

Clones this repository at --rev into a temporary folder (stage commands import the clone's own src/,
MLflow logs to the clone's store), merges --profile into its params.yaml if given, runs `dvc repro
base_model` (prepare and the base) once, then for each --workers setting sets
the setting's `runtime` keys (`--settings`, or `lora_workers` from `--workers`; a key another setting names
and this one does not keeps params.yaml's value) and runs exactly the train_lora stages, `dvc repro --force --single-item
--glob 'train_lora@*'`, timing each stage from its "Running stage" line to the next (or to the
command's end). The first setting's outputs are the reference: every other setting's adapters
(every checkpoint and final tensor within --tolerance of the tensor's spread) and metrics files
(equal, timings aside) are compared with them. Writes metrics/lora_workers.json (under --label,
other labels kept): per setting the train_lora seconds (the stages' sum and the command's), the
speed-up over the first setting, and whether its outputs matched, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from repro_time import per_stage, timed_repro  # noqa: E402
from scale import stage_env  # noqa: E402

from icmlora.files import write_json  # noqa: E402

TIMING = ("train_seconds", "eval_seconds", "pass_seconds", "trained_with")  # seconds, and which pass (the setting)
TRAIN_LORA = ["repro", "--force", "--single-item", "--glob", "train_lora@*"]


def parse_setting(text: str) -> dict[str, int]:
    """``"lora_workers=2,lora_batch=2"`` -> {"lora_workers": 2, "lora_batch": 2}."""
    try:
        return {k.strip(): int(v) for k, v in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise SystemExit(f"--settings: {text!r} is not KEY=INT[,KEY=INT...] (e.g. lora_workers=2,lora_batch=2)") from None


def set_runtime(repo: Path, env: dict, values: dict[str, int], folder: Path) -> None:
    profile = folder / "setting.yaml"
    profile.write_text("runtime:\n" + "".join(f"  {k}: {v}\n" for k, v in values.items()))
    subprocess.run([sys.executable, "-m", "icmlora", "profile", str(profile)], cwd=repo, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def compare(reference: Path, other: Path, tolerance: float) -> dict:
    """Adapters within ``tolerance`` of each tensor's spread, other files and metrics equal (timings aside)."""
    import torch
    from safetensors.torch import load_file

    problems, worst, tensors = [], 0.0, 0
    ref_files = {p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file()}
    other_files = {p.relative_to(other).as_posix() for p in other.rglob("*") if p.is_file()}
    if ref_files != other_files:
        problems.append(f"files differ: {sorted(ref_files ^ other_files)[:10]}")
    for name in sorted(ref_files & other_files):
        a_path, b_path = reference / name, other / name
        if name.endswith(".safetensors"):
            a, b = load_file(a_path), load_file(b_path)
            if a.keys() != b.keys():
                problems.append(f"{name}: other tensor names")
                continue
            for key in a:
                tensors += 1
                if a[key].shape != b[key].shape:
                    problems.append(f"{name}: {key} shape {tuple(a[key].shape)} vs {tuple(b[key].shape)}")
                    continue
                spread = float(a[key].float().std()) or 1.0
                worst = max(worst, float((a[key].float() - b[key].float()).abs().max()) / spread)
                if not torch.isfinite(b[key]).all():
                    problems.append(f"{name}: {key} not finite")
        elif name.startswith("metrics/") and name.endswith(".json"):
            a, b = (json.loads(p.read_text()) for p in (a_path, b_path))
            if {k: v for k, v in a.items() if k not in TIMING} != {k: v for k, v in b.items() if k not in TIMING}:
                problems.append(f"{name}: metrics differ")
        elif a_path.read_bytes() != b_path.read_bytes():
            problems.append(f"{name}: contents differ")
    if worst > tolerance:
        problems.append(f"a tensor differs by {worst:.3g} of its spread (tolerance {tolerance:g})")
    return {"matched": not problems, "tensors_compared": tensors, "max_diff_over_spread": worst,
            "problems": problems[:20]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="a profile to merge into the clone's params.yaml first (e.g. micro)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="runtime.lora_workers settings, the first the reference (default: 1 2)")
    parser.add_argument("--settings", nargs="+",
                        help="runtime settings KEY=INT[,KEY=INT...] in place of --workers, the first the reference "
                             "(e.g. lora_batch=1 lora_batch=0 lora_workers=2,lora_batch=2)")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest tensor difference, over the tensor's spread, that counts as the same (default 1e-5,"
                             " as tests/test_lora_workers.py)")
    parser.add_argument("--label", help="name of this run in the output file (default: the profile, or default)")
    parser.add_argument("--rev", default="HEAD", help="git revision to clone (default HEAD)")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "lora_workers.json")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    parser.add_argument("--repo", type=Path,
                        help="a checkout already reproduced up to base_model to use in place of a fresh clone (e.g. "
                             "bench/repro_time.py --keep's): only its train_lora stages run; its params.yaml is put "
                             "back at the end, its train_lora outputs and dvc.lock entries are the last setting's")
    args = parser.parse_args(argv)
    label = args.label or args.profile or "default"

    tmp = Path(tempfile.mkdtemp(prefix="lora-workers-"))
    if args.repo:
        repo = args.repo.resolve()
        rev = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=repo, text=True).strip()
        env = stage_env(repo)
        stale = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "base_model"], cwd=repo, env=env,
                               capture_output=True, text=True, check=True).stdout
        if json.loads(stale or "{}"):
            raise SystemExit(f"{repo}: base_model or prepare is not up to date: `dvc repro base_model` there first")
        saved_params = (repo / "params.yaml").read_text()
        setup = 0.0
    else:
        rev = subprocess.check_output(["git", "rev-parse", args.rev], cwd=ROOT, text=True).strip()
        repo = tmp / "repo"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True)
        subprocess.run(["git", "checkout", "--quiet", rev], cwd=repo, check=True)
        env = stage_env(repo)
        saved_params = None
        if args.profile:
            subprocess.run([sys.executable, "-m", "icmlora", "profile", args.profile], cwd=repo, env=env, check=True)
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", "repro", "base_model"], cwd=repo, env=env, check=True)
        setup = time.perf_counter() - begin

    import yaml

    chosen = ([(text, parse_setting(text)) for text in args.settings] if args.settings else
              [(str(w), {"lora_workers": w}) for w in args.workers])
    original = yaml.safe_load(saved_params or (repo / "params.yaml").read_text())["runtime"]
    keys = sorted({k for _, values in chosen for k in values})
    settings: dict[str, dict] = {}
    reference = None
    for workers, values in chosen:
        values = {k: values.get(k, original[k]) for k in keys}
        print(f"lora_workers: train_lora stages with runtime {values}", flush=True)
        set_runtime(repo, env, values, tmp)
        total, starts = timed_repro(repo, env, TRAIN_LORA)
        seconds, items = per_stage(total, starts)
        kept = tmp / f"outputs-{workers}"
        for part in ("models/lora", "metrics/lora"):
            shutil.copytree(repo / part, kept / part)
        record = {"train_lora_seconds": seconds.get("train_lora"), "command_seconds": round(total, 1),
                  "stages": items.get("train_lora", 0),
                  "stage_seconds": {name: round(nxt - start, 1) for (name, start), nxt in
                                    zip(starts, [s for _, s in starts[1:]] + [total])}}
        if reference is None:
            reference = (workers, kept, record["train_lora_seconds"])
            record.update(speedup=1.0, outputs_match=None)
        else:
            record["speedup"] = round(reference[2] / record["train_lora_seconds"], 2)
            record["comparison"] = compare(reference[1], kept, args.tolerance)
            record["outputs_match"] = record["comparison"]["matched"]
        settings[str(workers)] = record
        record["runtime"] = values
        print(f"lora_workers: {workers}: {record['train_lora_seconds']} s of train_lora "
              f"({record['stages']} stages), speed-up {record['speedup']}x"
              + ("" if record["outputs_match"] is None else f", outputs match: {record['outputs_match']}"), flush=True)

    if saved_params is not None:
        (repo / "params.yaml").write_text(saved_params)
    import torch

    result = {"rev": rev, "profile": args.profile or "default", "reference": chosen[0][0],
              "tolerance": args.tolerance, "setup_seconds": round(setup, 1), "settings": settings,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "python": platform.python_version()}}
    runs = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs[label] = result
    write_json(args.out, runs)
    print(f"lora_workers: wrote {label} to {args.out}" + (f"; clone kept at {repo}" if args.keep else ""))
    if not args.keep or args.repo:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
