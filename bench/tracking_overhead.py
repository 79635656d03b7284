"""Benchmark (not a test): what the tracking spool (src/icmlora/spool.py) costs or saves a train_lora stage,
against the synchronous logging before it, side by side in one run.

    .venv/bin/python bench/tracking_overhead.py --before b28e932          # metrics/tracking_overhead.json

Clones --before (the last revision that logged synchronously) and HEAD, gives both the same work (the
previous default's data: task_kind category, six shapes; the base at --base-steps steps, whose quality
does not matter here), reproduces each up to base_model, then runs `python -m icmlora.stages.train_lora
--task circle` (four LoRAs of 200 steps, a metric per step) in each, alternately, --repeats times per
store: the clone's own SQLite file, and the basic-auth MLflow server of `make team` (PostgreSQL,
artifacts in S3) started on free ports of 127.0.0.1, as a user of it. Each stage's wall time; the
ratio HEAD / before per store.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from team import free_port  # noqa: E402  (bench/team.py)

from icmlora import team  # noqa: E402
from icmlora.files import write_json  # noqa: E402

OLD_DEFAULT = ("data:\n  tasks: [circle, square, triangle, cross, ring, star]\n  synthetic:\n    task_kind: category\n"
               "    objects_per_image: [1, 3]\n    object_size: [14, 30]\nheldout_tasks: [star]\n")


def prepared_clone(rev: str, dest: Path, base_steps: int) -> tuple[Path, dict]:
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)
    subprocess.run(["git", "checkout", "--quiet", rev], cwd=dest, check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    # The host's own kernels in both: only the logging differs (HEAD would pin them, its ancestor not).
    env.update(PYTHONPATH=str(dest / "src"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               ICMLORA_LOG="WARNING", ICMLORA_PORTABLE_KERNELS="0")
    profile = dest / "bench-profile.yaml"
    profile.write_text(OLD_DEFAULT + f"base:\n  train:\n    steps: {base_steps}\n")
    subprocess.run([sys.executable, "-m", "icmlora", "profile", str(profile)], cwd=dest, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "base_model"], cwd=dest, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dest, env


def stage_seconds(repo: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "icmlora.stages.train_lora", "--task", "circle"], cwd=repo, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return round(time.perf_counter() - start, 2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the revision that logged synchronously (e.g. b28e932)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "tracking_overhead.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tracking-overhead-"))
    revs = {"before": subprocess.check_output(["git", "rev-parse", args.before], cwd=ROOT, text=True).strip(),
            "after": subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()}
    clones = {name: prepared_clone(rev, work / name, args.base_steps) for name, rev in revs.items()}
    stack = team.Stack(work / "stack", team.Ports(free_port(), free_port(), free_port()))
    record: dict = {"revisions": revs, "work": "train_lora --task circle: 4 ranks x 200 steps, the previous default's data",
                    "stores": {}}
    try:
        stack.up()
        stores = {"sqlite (the clone's mlflow.db)": {}, "team server (basic auth, PostgreSQL, S3)": stack.client_env("alice")}
        for store, extra in stores.items():
            seconds: dict[str, list[float]] = {"before": [], "after": []}
            for i in range(args.repeats):
                for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
                    repo, env = clones[name]
                    seconds[name].append(stage_seconds(repo, {**env, **extra}))
                    print(f"tracking_overhead: {store}: {name} {seconds[name][-1]} s", flush=True)
            medians = {name: statistics.median(v) for name, v in seconds.items()}
            record["stores"][store] = {"seconds": seconds, "median": medians,
                                       "ratio_after_over_before": round(medians["after"] / medians["before"], 3)}
    finally:
        stack.down()
    record["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    write_json(args.out, record)
    subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"tracking_overhead: wrote {args.out}: " + "; ".join(f"{k}: {v['ratio_after_over_before']}"
                                                           for k, v in record["stores"].items()))


if __name__ == "__main__":
    main()
