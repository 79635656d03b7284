"""Benchmark (not a test): what a team's stack costs against one person's, on this machine.

    .venv/bin/python bench/team.py                       # this checkout's outputs (after `dvc repro`)
    .venv/bin/python bench/team.py --repo DIR            # another reproduced checkout of the default

Starts the stack `make team` starts (icmlora.team: PostgreSQL, moto's S3 endpoint, the basic-auth
MLflow server with artifacts proxied to S3) in a temporary folder, on free ports of 127.0.0.1, and
measures, in the same run:
- **DVC**: `dvc push` of every output of the checkout (its DVC cache) to a local-folder remote and
  to an S3 remote on the endpoint, then `dvc pull` of each into a fresh git clone (own cache, the
  remote's `verify` as the repository sets it). Seconds each and the S3 / folder ratios.
- **MLflow**: stages run as the pipeline runs them (`report`; `train_cvae --rank <first rank>`) in a
  clone of the checkout (outputs copied, so the checkout's cache is never touched), once logging to a
  fresh SQLite store and once to the server as a user of it. Each stage's wall time and the time spent
  inside MLflow's client (every MlflowClient call, timed at the outermost call; the server check
  included), and the server / SQLite ratio of the latter.
Writes metrics/team.json (--out), with the machine it ran on.
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

from icmlora import team  # noqa: E402
from icmlora.files import write_json  # noqa: E402

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")

# Runs one stage in this process with every MlflowClient method (the fluent API goes through it)
# timed at its outermost call; prints {"status", "seconds", "mlflow_seconds", "calls"}.
DRIVER = r"""
import functools, importlib, json, sys, time
from mlflow.tracking.client import MlflowClient
import icmlora.tracking as tracking
spent, depth, calls = [0.0], [0], [0]
def timed(f):
    @functools.wraps(f)
    def inner(*args, **kwargs):
        depth[0] += 1
        start = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                spent[0] += time.perf_counter() - start
                calls[0] += 1
    return inner
for name in dir(MlflowClient):
    if not name.startswith("_") and callable(getattr(MlflowClient, name)):
        setattr(MlflowClient, name, timed(getattr(MlflowClient, name)))
tracking.check_server = timed(tracking.check_server)
from icmlora.stage_cli import run_stage
stage = importlib.import_module("icmlora.stages." + sys.argv[1])
start = time.perf_counter()
status = run_stage(stage.main, sys.argv[2:])
print("BENCH " + json.dumps({"status": status, "seconds": time.perf_counter() - start,
                             "mlflow_seconds": spent[0], "calls": calls[0]}))
"""


def run(cmd, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return proc


def timed(cmd, cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    run(cmd, cwd, env)
    return round(time.perf_counter() - start, 2)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cache_bytes(repo: Path, env: dict) -> int:
    cache = Path(run([DVC, "cache", "dir"], repo, env).stdout.strip())
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


def dvc_transfer(repo: Path, stack: team.Stack, work: Path, env: dict) -> dict:
    remotes = {"folder": str(work / "folder-remote"), "s3": f"s3://{team.DVC_BUCKET}/bench"}
    out: dict = {"cache_bytes": cache_bytes(repo, env)}
    for name, url in remotes.items():
        remote = f"bench-{name}"
        run([DVC, "remote", "add", "--local", "-f", remote, url], repo, env)
        if name == "s3":
            run([DVC, "remote", "modify", "--local", remote, "endpointurl", stack.s3_endpoint], repo, env)
        push = timed([DVC, "push", "-r", remote], repo, env)
        clone = work / f"pull-{name}"
        run(["git", "clone", "-q", str(repo), str(clone)], work, env)
        if name == "s3":
            run([DVC, "remote", "add", "--local", remote, url], clone, env)
            run([DVC, "remote", "modify", "--local", remote, "endpointurl", stack.s3_endpoint], clone, env)
        else:
            run([DVC, "remote", "add", "--local", remote, url], clone, env)
        pull = timed([DVC, "pull", "-r", remote], clone, env)
        status = run([DVC, "status"], clone, env).stdout
        out[name] = {"push_seconds": push, "pull_seconds": pull, "pulled_up_to_date": "up to date" in status}
        run([DVC, "remote", "remove", "--local", remote], repo, env)
        shutil.rmtree(clone)
        print(f"bench/team: dvc {name}: push {push:.1f} s, pull {pull:.1f} s", flush=True)
    out["s3_over_folder"] = {k: round(out["s3"][f"{k}_seconds"] / out["folder"][f"{k}_seconds"], 2)
                             for k in ("push", "pull")}
    return out


def stage_logging(repo: Path, stack: team.Stack, work: Path, env: dict, stages: list[list[str]]) -> dict:
    clone = work / "stages"
    cache = run([DVC, "cache", "dir"], repo, env).stdout.strip()
    run(["git", "clone", "-q", str(repo), str(clone)], work, env)
    run([DVC, "cache", "dir", "--local", cache], clone, env)
    run([DVC, "config", "--local", "cache.type", "copy"], clone, env)  # stages replace copies, never the cache
    run([DVC, "checkout"], clone, env)
    stores = {"sqlite": {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'bench-mlflow.db'}"},
              "server": stack.client_env("alice")}
    out: dict = {}
    for args in stages:
        name = " ".join(args)
        out[name] = {}
        for store, extra in stores.items():
            stage_env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
            stage_env.update(extra)
            proc = run([sys.executable, "-c", DRIVER, *args], clone, stage_env)
            line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH "))
            result = json.loads(line[len("BENCH "):])
            if result["status"] != 0:
                raise SystemExit(f"{name} against {store} exited {result['status']}:\n{proc.stderr[-3000:]}")
            out[name][store] = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()
                                if k != "status"}
            print(f"bench/team: {name} against {store}: {result['seconds']:.1f} s, "
                  f"{result['mlflow_seconds']:.2f} s in MLflow ({result['calls']} calls)", flush=True)
        out[name]["server_over_sqlite_mlflow_seconds"] = round(
            out[name]["server"]["mlflow_seconds"] / out[name]["sqlite"]["mlflow_seconds"], 2)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT, help="a reproduced checkout (default: this one)")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "team.json")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", ICMLORA_LOG="WARNING")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "DVC_EXP_NAME"):
        env.pop(key, None)
    missing = run([DVC, "status", "--json"], repo, env).stdout
    if json.loads(missing or "{}"):
        raise SystemExit(f"{repo}: `dvc status` is not clean: run `dvc repro` (or `dvc pull`) there first")
    from icmlora.config import load_params

    cfg = load_params(repo / "params.yaml")
    work = Path(tempfile.mkdtemp(prefix="bench-team-"))
    stack = team.Stack(work / "stack", team.Ports(free_port(), free_port(), free_port()))
    started = time.perf_counter()
    try:
        stack.up()
        env_s3 = {**env, **stack.aws_env()}
        result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "python": platform.python_version()},
                  "repo_commit": run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip(),
                  "dvc": dvc_transfer(repo, stack, work, env_s3),
                  "mlflow": stage_logging(repo, stack, work, env, [["report"],
                                                                   ["train_cvae", "--rank", str(cfg.lora.ranks[0])]])}
    finally:
        stack.down()
        if stack.state.pg_dir:
            shutil.rmtree(stack.state.pg_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, result)
    print(f"bench/team: wrote {args.out} (dvc push/pull S3 / folder: {result['dvc']['s3_over_folder']}; MLflow "
          f"server / SQLite: " + ", ".join(f"{k} {v['server_over_sqlite_mlflow_seconds']}x"
                                             for k, v in result["mlflow"].items()) + ")")


if __name__ == "__main__":
    main()
