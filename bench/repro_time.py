"""Benchmark (not a test): a newcomer's first `dvc repro` from a fresh clone, per stage, and a no-op repro.

    .venv/bin/python bench/repro_time.py --label after            # this checkout's HEAD
    .venv/bin/python bench/repro_time.py --label before --rev 6bf29a0
    .venv/bin/python bench/repro_time.py --label issue34 --compare b28e932   # two revisions side by side

With --compare REV, both revisions (REV and --rev, default HEAD) are cloned fresh and reproduced in the
same run, stage group by stage group in pipeline order (`dvc repro -f -s <group>`: every item of a
matrix stage, forced, since a revision whose fresh outputs equal its own committed lock bit for bit, as
they do on the machine that made the lock, would skip a stage whose outputs are all git-tracked
metrics), alternating which revision goes first, so a machine that speeds up or slows down during the
run weighs on both alike; the record holds both runs' per-stage seconds and their ratios (after /
before).

Clones this repository at --rev into a temporary folder, runs `dvc repro` there (stage commands
import the clone's own src/, MLflow logs to the clone's store), timestamps each "Running stage"
line, then runs `dvc repro` again (nothing to do) and times it. Stage times are wall clock from one
stage's start to the next's, so a stage's process start-up (imports) is counted in it; the 24
`train_lora@...` items are summed into `train_lora`. Writes the run under --label in
metrics/repro_time.json (other labels kept), with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from icmlora.files import write_json  # noqa: E402

STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def timed_repro(repo: Path, env: dict, command: list[str] | None = None) -> tuple[float, list[tuple[str, float]]]:
    """Run `dvc repro` (or another dvc ``command`` that runs stages, e.g. ``exp run ...``) in repo;
    return (total seconds, [(stage, start offset)])."""
    starts = []
    begin = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *(command or ["repro"])], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        sys.stdout.write(line)
        match = STAGE_LINE.match(line)
        if match:
            starts.append((match.group(1), time.perf_counter() - begin))
    if proc.wait() != 0:
        raise SystemExit(f"`dvc {' '.join(command or ['repro'])}` failed in {repo} (exit {proc.returncode})")
    return time.perf_counter() - begin, starts


def per_stage(total: float, starts: list[tuple[str, float]]) -> tuple[dict, dict]:
    seconds, items = {}, {}
    for (name, start), nxt in zip(starts, [s for _, s in starts[1:]] + [total]):
        stage = name.split("@")[0]
        seconds[stage] = round(seconds.get(stage, 0.0) + nxt - start, 1)
        items[stage] = items.get(stage, 0) + 1
    return seconds, items


def stage_groups(*repos: Path) -> list[str]:
    """The stages of these checkouts' dvc.yaml, in pipeline order, each once (a stage one revision
    lacks, e.g. few_shot before it existed, is in the list and runs only where it is)."""
    import yaml

    groups: list[str] = []
    for repo in repos:
        stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
        for i, name in enumerate(stages):
            if name not in groups:
                later = [g for g in stages[i + 1:] if g in groups]  # before the first later stage already listed
                groups.insert(groups.index(later[0]) if later else len(groups), name)
    return groups


def clone(rev: str, dest: Path) -> tuple[Path, dict, str]:
    """A fresh clone of ``rev`` at ``dest``, the environment its stage commands run with, its full sha."""
    full = subprocess.check_output(["git", "rev-parse", rev], cwd=ROOT, text=True).strip()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)
    subprocess.run(["git", "checkout", "--quiet", full], cwd=dest, check=True)
    env = dict(os.environ, PYTHONPATH=str(dest / "src"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return dest, env, full


def compare(before_rev: str, after_rev: str, keep: bool) -> dict:
    """Both revisions reproduced side by side, group by group; returns the record."""
    tmp = Path(tempfile.mkdtemp(prefix="repro-compare-"))
    repos = {"before": clone(before_rev, tmp / "before"), "after": clone(after_rev, tmp / "after")}
    seconds = {name: {} for name in repos}
    groups = stage_groups(repos["after"][0], repos["before"][0])
    for i, group in enumerate(groups):
        for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
            repo, env, _ = repos[name]
            if group not in stage_groups(repo):
                continue  # a stage this revision does not have
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dvc", "repro", "-f", "-s", group], cwd=repo, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            seconds[name][group] = round(time.perf_counter() - start, 1)
            print(f"repro_time: {name} {group} {seconds[name][group]} s", flush=True)
    record = {}
    for name, (repo, env, rev) in repos.items():
        noop_start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
        total = sum(seconds[name].values())
        record[name] = {"rev": rev, "total_seconds": round(total, 1), "total_minutes": round(total / 60, 1),
                        "stage_seconds": seconds[name], "noop_repro_seconds": round(time.perf_counter() - noop_start, 1)}
    record["ratio"] = round(record["after"]["total_seconds"] / record["before"]["total_seconds"], 3)
    record["stage_ratio"] = {g: round(seconds["after"][g] / seconds["before"][g], 3) for g in groups
                             if seconds["before"].get(g) and g in seconds["after"]}
    record["order"] = "stage groups in pipeline order, alternating which revision runs first"
    record["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    if keep:
        record["clones"] = {name: str(repo) for name, (repo, _, _) in repos.items()}
    else:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="name of this run in the output file (e.g. before, after)")
    parser.add_argument("--rev", default="HEAD", help="git revision to clone (default HEAD)")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "repro_time.json")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    parser.add_argument("--compare", metavar="REV", help="reproduce REV and --rev side by side (before, after)")
    args = parser.parse_args(argv)
    if args.compare:
        record = compare(args.compare, args.rev, args.keep)
        runs = json.loads(args.out.read_text()) if args.out.exists() else {}
        runs[args.label] = record
        write_json(args.out, runs)
        print(f"repro_time: {args.label}: after / before = {record['ratio']} ({record['after']['total_minutes']} vs "
              f"{record['before']['total_minutes']} min) -> {args.out}"
              + (f"; clones kept at {record['clones']}" if args.keep else ""))
        return

    tmp = Path(tempfile.mkdtemp(prefix="repro-time-"))
    repo, env, rev = clone(args.rev, tmp / "repo")
    total, starts = timed_repro(repo, env)
    seconds, items = per_stage(total, starts)
    noop_start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    noop = time.perf_counter() - noop_start

    record = {"rev": rev, "total_seconds": round(total, 1), "total_minutes": round(total / 60, 1),
              "stage_seconds": seconds, "stage_items": items, "noop_repro_seconds": round(noop, 1),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    runs = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs[args.label] = record
    write_json(args.out, runs)
    print(f"repro_time: {args.label} = {record['total_minutes']} min (no-op repro {record['noop_repro_seconds']} s) "
          f"-> {args.out}" + (f"; clone kept at {repo}" if args.keep else ""))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
