"""Benchmark (not a test): one stage under two revisions' code, side by side in one run, on the same
reproduced outputs.

    .venv/bin/python bench/stage_time.py --repo DIR --stage few_shot --before caace39
    .venv/bin/python bench/stage_time.py --repo DIR --stage train_lora --args "--task circle-top --seed 0" \\
        --before caace39 --after HEAD --rounds 2

``--repo`` is a checkout whose pipeline has been reproduced (its inputs to the stage are in place).
Each revision's ``src/`` is checked out into a temporary git worktree of this repository, and the stage
runs in ``--repo`` as ``python -m icmlora.stages.<stage> <args>`` with that ``src/`` first on the path,
for ``--rounds`` rounds, each running both revisions, the first round before first, the next after
first, and so on, so a machine that speeds up or slows down (or a cold cache) weighs on both alike.
Wall clock per run, process start-up included; each side's best is kept. After each run the stage's
outputs that ``--outputs`` names (default: its ``outs``, ``metrics`` and ``plots`` in ``--repo``'s
dvc.yaml, timing files left out) are hashed: every run must write the same bytes, or the record says
which differ.
Writes ``--out`` (metrics/stage_time.json) under ``--label`` (default the stage), other labels kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from icmlora.files import write_json  # noqa: E402


def stage_outputs(repo: Path, stage: str) -> list[str]:
    """The stage's ``outs``, ``metrics`` and ``plots`` in ``repo``'s dvc.yaml, timing files
    (metrics/timing/) left out; a matrix or foreach stage's templated paths are refused (name them
    with --outputs)."""
    import yaml

    entry = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].get(stage)
    if entry is None:
        raise SystemExit(f"{repo / 'dvc.yaml'}: no stage {stage!r}")
    entry = entry.get("do", entry)
    paths = [next(iter(o)) if isinstance(o, dict) else o
             for key in ("outs", "metrics", "plots") for o in entry.get(key, [])]
    if any("${" in p for p in paths):
        raise SystemExit(f"stage {stage!r} names its outputs per item ({', '.join(p for p in paths if '${' in p)}): "
                         f"pass the item's paths with --outputs")
    return [p for p in paths if not p.startswith("metrics/timing/")]


def digest(repo: Path, paths: list[str]) -> dict[str, str]:
    """md5 of every file under each path (a file or a folder), by path relative to ``repo``."""
    out = {}
    for path in paths:
        root = repo / path
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[f.relative_to(repo).as_posix()] = hashlib.md5(f.read_bytes()).hexdigest()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True, help="a checkout with the pipeline reproduced")
    parser.add_argument("--stage", required=True, help="the stage module under icmlora.stages (e.g. few_shot)")
    parser.add_argument("--args", default="", help="the stage's arguments (e.g. \"--task circle-top --seed 0\")")
    parser.add_argument("--before", required=True, help="git revision of the code timed first")
    parser.add_argument("--after", default="HEAD", help="git revision of the code timed second (default HEAD)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (before, after) (default 1)")
    parser.add_argument("--outputs", nargs="+", help="paths to hash after each run (default: the stage's outs)")
    parser.add_argument("--label", help="name of this run in the output file (default: the stage)")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "stage_time.json")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    outputs = args.outputs or stage_outputs(repo, args.stage)
    revs = {"before": args.before, "after": args.after}
    shas = {k: subprocess.run(["git", "-C", str(ROOT), "rev-parse", v], capture_output=True, text=True,
                              check=True).stdout.strip() for k, v in revs.items()}
    seconds: dict[str, list[float]] = {"before": [], "after": []}
    hashes: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="stage-time-") as tmp:
        trees = {}
        for side, sha in shas.items():
            trees[side] = Path(tmp) / side
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(trees[side]), sha],
                           check=True)
        try:
            for round_ in range(args.rounds):
                for side in ("before", "after") if round_ % 2 == 0 else ("after", "before"):
                    env = {**os.environ, "PYTHONPATH": str(trees[side] / "src")}
                    cmd = [sys.executable, "-m", f"icmlora.stages.{args.stage}", *shlex.split(args.args)]
                    start = time.perf_counter()
                    proc = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True)
                    took = time.perf_counter() - start
                    if proc.returncode:
                        raise SystemExit(f"{side} ({revs[side]}): {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                    seconds[side].append(round(took, 1))
                    hashes[f"{side}-{round_}"] = digest(repo, outputs)
                    print(f"stage_time: {args.stage} {side} ({revs[side]}) round {round_ + 1}: {took:.1f} s",
                          flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    first = next(iter(hashes.values()))
    if not first:
        raise SystemExit(f"no file under {outputs} in {repo}: nothing to compare the runs' outputs by")
    differing = sorted({f for h in hashes.values() for f in set(h) | set(first) if h.get(f) != first.get(f)})
    best = {side: min(values) for side, values in seconds.items()}
    import torch

    record = {"stage": args.stage, "args": args.args, "revs": shas, "seconds": seconds,
              "ratio": round(best["after"] / best["before"], 3), "outputs_hashed": len(first),
              "outputs_identical": not differing, "outputs_differing": differing,
              "order": "rounds alternate which side runs first (before first in the first); best of each side's runs",
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "python": platform.python_version()}}
    out = args.out.resolve()
    existing = json.loads(out.read_text()) if out.is_file() else {}
    write_json(out, {**existing, args.label or args.stage: record})
    print(f"stage_time: {args.stage}: after / before = {record['ratio']} ({best['after']} vs {best['before']} s); "
          f"outputs identical: {record['outputs_identical']} ({len(first)} files) -> {out}")
    return record


if __name__ == "__main__":
    main()
