"""Shared pieces of the end-to-end tests: run a command, make a micro-profile copy of the repo.

Imported as ``from e2e_helpers import ...`` (pytest puts tests/ on sys.path: no __init__.py).
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
GIT_ID = ["-c", "user.name=t", "-c", "user.email=t@t"]


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
    """A git + DVC copy of the working tree with profiles/micro.yaml merged into params.yaml, committed."""
    from icmlora.profile import apply_profile

    copy_worktree(repo, dest)
    apply_profile(dest / "params.yaml", dest / "profiles" / "micro.yaml")
    run(["git", "init", "-q"], dest)
    commit_all(dest, "micro")
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
