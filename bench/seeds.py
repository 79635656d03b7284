"""The spread over seeds (not a test): the default pipeline for several values of the top-level
`seed`, as DVC experiments, and one table of every quality figure per seed with median and range.

    make seeds                                        # = .venv/bin/python bench/seeds.py
    .venv/bin/python bench/seeds.py --seeds 1 2 --jobs 1
    .venv/bin/python bench/seeds.py --collect         # only (re)write the table from `dvc exp show`

`seed` decides the draw: the synthetic data, the base model's initialization and batches, the
LoRA and CVAE seeds derived from it, the generated latents and the bootstrap resamples. Each
seed not yet run becomes `dvc exp run --queue -S seed=<s> -n seed-<s>`; `dvc queue start -j
<jobs>` runs them (each in a temporary copy of the workspace: the workspace itself is not
touched), and the script waits for the queue. The workspace's own run (params.yaml's seed, the
committed `dvc.lock` and `metrics/`) is the first column. Then it reads every experiment's
metrics from `dvc exp show --json` and writes metrics/seeds.json and metrics/seeds.csv: per seed
base valid mAP50, the rank-4 LoRA own-task mAP50 median, trained and generated mAP50 medians and
generated / trained per rank, the task-vector silhouette and the held-out task's figures; then
per figure its median, min and max. `dvc exp show` and `dvc metrics diff <exp>` compare the same
runs; in MLflow each experiment's runs carry the tag `dvc_exp = seed-<s>`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from icmlora.files import write_json, write_text  # noqa: E402

DVC = [sys.executable, "-m", "dvc"]


# Stage commands (`python -m icmlora.stages...`) and queue workers need this interpreter's bin/ first.
ENV = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def dvc(*args: str, check: bool = True) -> str:
    proc = subprocess.run([*DVC, *args], cwd=ROOT, capture_output=True, text=True, env=ENV)
    if check and proc.returncode:
        raise SystemExit(f"seeds: `dvc {' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def experiments() -> dict[str, dict]:
    """{name: {"params": params.yaml values, "metrics": {file: values}}} of the workspace (name
    "workspace") and of every experiment of HEAD, from `dvc exp show --json`."""
    out = {}
    for commit in json.loads(dvc("exp", "show", "--json", "--no-pager")):
        entries = [commit] + [rev for exp in commit.get("experiments") or [] for rev in exp.get("revs", [])]
        for entry in entries:
            data = entry.get("data") or {}
            name = entry.get("name") or entry.get("rev")
            if not data or (entry is commit and commit.get("rev") != "workspace"):
                continue
            params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
            metrics = {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}
            out[name] = {"params": params, "metrics": metrics, "status": data.get("status")}
    return out


def figures(metrics: dict[str, dict]) -> dict[str, float]:
    """The quality figures of one run (flat, dotted keys)."""
    summary = metrics.get("metrics/summary.json", {})
    base = metrics.get("metrics/base_model.json", {})
    vectors = metrics.get("metrics/task_vectors.json", {})
    row = {"base_valid_map50": base.get("map50"), "base_valid_map50_95": base.get("map50_95")}
    for rank, r in sorted((summary.get("ranks") or {}).items(), key=lambda kv: int(kv[0])):
        for key in ("trained_map50_median", "generated_map50_median", "generated_over_trained_median",
                    "avg_checkpoint_map50_median", "heldout_generated_map50_median", "heldout_trained_map50_median"):
            row[f"r{rank}.{key}"] = r.get(key)
    # the silhouette of the method in use (icl with its pooling: icl_match by default), and of the others
    silhouettes = vectors.get("silhouette") or {}
    method = vectors.get("method")
    used = f"{method}_{vectors.get('pooling')}" if method == "icl" else method
    row["task_vector_silhouette"] = silhouettes.get(used)
    for key, value in silhouettes.items():
        row[f"silhouette.{key}"] = value
    return {k: v for k, v in row.items() if isinstance(v, (int, float))}


def wait_for_queue(poll: float = 30.0) -> None:
    while True:
        status = dvc("queue", "status", check=False)
        active = [line for line in status.splitlines() if " Running " in f" {line} " or " Queued " in f" {line} "]
        if not active:
            return
        print(f"seeds: {len(active)} experiment(s) queued or running ({time.strftime('%H:%M:%S')})", flush=True)
        time.sleep(poll)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds besides params.yaml's (default 1 2)")
    parser.add_argument("--jobs", type=int, default=1, help="experiments run at once (default 1: they share the CPU)")
    parser.add_argument("--collect", action="store_true", help="only write the table from existing experiments")
    args = parser.parse_args(argv)

    if not args.collect:
        done = {name for name, e in experiments().items() if e["status"] == "Success"}
        for seed in args.seeds:
            name = f"seed-{seed}"
            if name in done:
                print(f"seeds: {name} already ran; kept")
                continue
            dvc("exp", "run", "--queue", "-S", f"seed={seed}", "-n", name)
        # the workers it starts outlive it and would hold a captured stdout open until they end
        subprocess.run([*DVC, "queue", "start", "-j", str(args.jobs)], cwd=ROOT, env=ENV, check=True,
                       stdout=subprocess.DEVNULL)
        wait_for_queue()
        failed = [line for line in dvc("queue", "status", check=False).splitlines() if "Failed" in line]
        if failed:
            raise SystemExit("seeds: experiments failed (see `dvc queue logs <name>`):\n" + "\n".join(failed))

    runs = experiments()
    table = {}
    for name, e in runs.items():
        seed = e["params"].get("seed")
        if name == "workspace" or (name.startswith("seed-") and seed is not None):
            table[str(seed)] = {"experiment": name, **figures(e["metrics"])}
    keys = sorted({k for row in table.values() for k in row if k != "experiment"})
    spread = {}
    for key in keys:
        values = [row[key] for row in table.values() if key in row]
        spread[key] = {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
                       "max": round(max(values), 4), "n": len(values)}
    record = {"seeds": table, "spread": spread, "machine": {"cpus": os.cpu_count()}}
    write_json(ROOT / "metrics" / "seeds.json", record)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    seeds = sorted(table, key=int)
    writer.writerow(["figure", *[f"seed {s}" for s in seeds], "median", "min", "max"])
    for key in keys:
        writer.writerow([key, *[table[s].get(key, "") for s in seeds], spread[key]["median"], spread[key]["min"],
                         spread[key]["max"]])
    write_text(ROOT / "metrics" / "seeds.csv", buffer.getvalue())
    print(f"seeds: {len(table)} runs (seeds {', '.join(seeds)}) -> metrics/seeds.json, metrics/seeds.csv")


if __name__ == "__main__":
    main()
