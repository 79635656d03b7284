"""A screenshot of the MLflow view the README describes: a held-out task's adapters, side by side.

    .venv/bin/python bench/mlflow_screenshot.py            # after `make repro`; needs Debian's chromium

Starts `mlflow server` on the repository's store (as `make mlflow` does, on a free port), picks
the evaluation runs of one rank (`--rank`, default 4) for the held-out tasks (`--tasks` of them),
each with its generated adapter (z = 0), the ridge map's, the nearest training task's and its own
trained LoRA (`--sources`), opens MLflow's compare view of exactly those runs in headless Chromium
and writes docs/mlflow-compare.png. The URL it opened is printed: paste it into a browser pointed
at `make mlflow` to get the same view.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def evaluation_runs(store: Path, rank: int, tasks: int, sources: list[str], heldout: bool = True) -> tuple[str, list[str]]:
    """(experiment id, run ids) of `evaluate` runs of one rank (held-out tasks only, or every task), tasks
    in order, each task's sources in order."""
    with sqlite3.connect(store) as db:
        rows = db.execute(
            "select r.experiment_id, r.run_uuid, t.value, s.value, m.value from runs r "
            "join tags st on st.run_uuid = r.run_uuid and st.key = 'stage' and st.value = 'evaluate' "
            "join tags rk on rk.run_uuid = r.run_uuid and rk.key = 'rank' and rk.value = ? "
            "join tags t on t.run_uuid = r.run_uuid and t.key = 'task' "
            "join tags s on s.run_uuid = r.run_uuid and s.key = 'source' "
            "join tags m on m.run_uuid = r.run_uuid and m.key = 'sample' "
            "left join tags e on e.run_uuid = r.run_uuid and e.key = 'dvc_exp' "
            "left join tags h on h.run_uuid = r.run_uuid and h.key = 'heldout' "
            "where (e.value is null or e.value = 'workspace') and r.lifecycle_stage = 'active' "
            "and (? = 0 or h.value = 'true') order by r.start_time", (str(rank), int(heldout))).fetchall()
    wanted = {"generated": "z0"}
    runs, order = {}, []
    for experiment, run, task, source, sample in rows:
        if source in sources and wanted.get(source, sample) == sample:
            runs[(task, source)] = (experiment, run)  # the latest run of each pair
            if task not in order:
                order.append(task)
    picked = [runs[(t, s)] for t in order[:tasks] for s in sources if (t, s) in runs]
    if not picked:
        raise SystemExit(f"{store}: no evaluate runs of rank {rank}; run `make repro` first")
    return str(picked[0][0]), [run for _, run in picked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=ROOT / "mlflow.db")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=2, help="tasks shown (default 2: the default's held-out tasks)")
    parser.add_argument("--sources", nargs="+", default=["generated", "ridge", "nearest_task", "trained"])
    parser.add_argument("--all-tasks", action="store_true", help="training tasks too (default: held-out tasks only)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mlflow-compare.png")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    experiment, runs = evaluation_runs(args.store, args.rank, args.tasks, args.sources, heldout=not args.all_tasks)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{args.store.resolve()}",
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(1)
        url = (f"http://127.0.0.1:{port}/#/compare-runs?runs={urllib.parse.quote(json.dumps(runs))}"
               f"&experiments={urllib.parse.quote(json.dumps([experiment]))}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=2000,1900",
                            "--virtual-time-budget=25000", f"--screenshot={args.out}", url],
                           check=True, capture_output=True, timeout=180)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"mlflow_screenshot: wrote {args.out} ({len(runs)} runs of rank {args.rank}: {url.replace(str(port), 'PORT')})")


if __name__ == "__main__":
    main()
