"""Shared pieces of the end-to-end tests: run a command, make a micro-profile copy of the repo.

Imported as ``from e2e_helpers import ...`` (pytest puts tests/ on sys.path: no __init__.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
GIT_ID = ["-c", "user.name=t", "-c", "user.email=t@t"]


def e2e_env() -> dict:
    """The environment of the commands an end-to-end test runs: this interpreter's bin/ first on
    PATH, quiet stages, and the default MLflow store (the copy's own sqlite file) rather than the
    per-test store conftest sets for in-process tests."""
    out = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", ICMLORA_LOG="WARNING")
    out.pop("MLFLOW_TRACKING_URI", None)
    out.pop("DVC_EXP_NAME", None)
    return out


def run(cmd: list[str], cwd: Path, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    """Run a command; with ok=True (the default) a non-zero status fails the test with its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def copy_worktree(repo: Path, dest: Path) -> Path:
    """Copy the working tree's tracked and untracked, not ignored files (what `git add -A` would see)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=repo,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = repo / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def micro_copy(repo: Path, dest: Path) -> Path:
    """A git + DVC copy of the working tree with profiles/micro.yaml merged into params.yaml,
    committed, not yet reproduced: the repository's committed default run (dvc.lock, metrics/)
    belongs to other params and is left out."""
    from icmlora.profile import apply_profile

    copy_worktree(repo, dest)
    (dest / "dvc.lock").unlink(missing_ok=True)
    shutil.rmtree(dest / "metrics", ignore_errors=True)
    apply_profile(dest / "params.yaml", dest / "profiles" / "micro.yaml")
    run(["git", "init", "-q"], dest)
    commit_all(dest, "micro")
    return dest


def clone_sharing_cache(src: Path, dest: Path, env: dict) -> Path:
    """A git clone of a reproduced copy that reads the copy's DVC cache, with every output checked
    out (links into that cache: nothing is re-run, nothing is copied twice)."""
    run(["git", "clone", "-q", str(src), str(dest)], src.parent)
    run([DVC, "cache", "dir", "--local", src / ".dvc" / "cache"], dest, env)
    run([DVC, "checkout"], dest, env)
    return dest


def commit_all(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", *GIT_ID, "commit", "-qm", message, "--allow-empty"], repo)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def file_hashes(root: Path, *subdirs: str) -> dict[str, str]:
    """sha256 of every file under root/<subdir>, keyed by its path relative to root."""
    out = {}
    for sub in subdirs:
        for path in sorted((root / sub).rglob("*")):
            if path.is_file() and path.name != ".gitignore":
                out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def lock_outs(repo: Path) -> dict[str, dict[str, str]]:
    """{stage: {output path: md5}} from dvc.lock (directories: '<md5>.dir'; `metrics` and `plots`
    entries with cache: false are outputs too)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {stage: {o["path"]: o["md5"] for o in info.get("outs", [])} for stage, info in lock["stages"].items()}


def mlflow_runs(db: Path) -> list[dict[str, str]]:
    """Every run of an MLflow sqlite store as its tags, plus 'run_id' and 'artifact_uri'."""
    with sqlite3.connect(db) as conn:
        runs = {rid: {"run_id": rid, "artifact_uri": uri} for rid, uri in conn.execute("select run_uuid, artifact_uri from runs")}
        for rid, key, value in conn.execute("select run_uuid, key, value from tags"):
            runs[rid][key] = value
    return list(runs.values())
