"""Sharing and reproducing: DVC remotes (local folder, real SSH server), corruption, MLflow server.

One micro-profile copy is reproduced once (`dvc repro base_model`) and committed; every test
works from it: git clones of it pull from a remote and must get every output byte for byte,
with nothing left to run.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from e2e_helpers import BIN, commit_all, file_hashes, free_port, micro_copy, run

pytestmark = [pytest.mark.slow, pytest.mark.long]
DVC = str(BIN / "dvc")
OUTS = ("data", "models")  # DVC-cached outputs of prepare and base_model
MODEL = "models/base/model.safetensors"
UP_TO_DATE = "Data and pipelines are up to date."
TARGET = "base_model"  # the stage the shared copy reproduces (later stages are not run here)
SCOPE = ("--with-deps", TARGET)  # push/pull/fetch/checkout its outputs and its dependencies


@pytest.fixture(scope="module")
def env() -> dict:
    out = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", ICMLORA_LOG="WARNING")
    out.pop("MLFLOW_TRACKING_URI", None)  # the copy's own sqlite store, unless a test says otherwise
    out.pop("SSH_AUTH_SOCK", None)  # only the throw-away key may authenticate
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, repo, env) -> Path:
    """The micro-profile copy after `dvc repro base_model`, with dvc.lock and metrics committed."""
    dest = micro_copy(repo, tmp_path_factory.mktemp("share") / "repo")
    run([DVC, "repro", TARGET], dest, env)
    commit_all(dest, "repro base_model")
    return dest


@pytest.fixture(scope="module")
def original(built) -> dict[str, str]:
    hashes = file_hashes(built, *OUTS)
    assert MODEL in hashes and any(k.startswith("data/prepared/") for k in hashes)
    return hashes


@pytest.fixture(scope="module")
def pushed(built, env) -> Path:
    """`dvc push` to the default remote `shared`: ../icmlora-dvc-remote beside the copy."""
    out = run([DVC, "push", *SCOPE], built, env).stdout
    assert "pushed" in out, out
    remote = built.parent / "icmlora-dvc-remote"
    assert any(p.is_file() for p in remote.rglob("*")), f"nothing in {remote}"
    return remote


def clone(src: Path, dest: Path) -> Path:
    run(["git", "clone", "-q", str(src), str(dest)], src.parent)
    return dest


def assert_reproduced(clone_dir: Path, original: dict, env: dict) -> None:
    """Every output byte for byte; for what was reproduced (base_model and what it depends on)
    `dvc status` is clean and `dvc repro` has nothing to run."""
    assert file_hashes(clone_dir, *OUTS) == original
    status = run([DVC, "status", TARGET], clone_dir, env).stdout
    assert UP_TO_DATE in status, status
    repro = run([DVC, "repro", TARGET], clone_dir, env).stdout
    assert UP_TO_DATE in repro and "Running stage" not in repro, repro
    assert file_hashes(clone_dir, *OUTS) == original
    changed = run(["git", "status", "--porcelain"], clone_dir).stdout
    assert changed == "", f"the clone changed:\n{changed}"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cache_object(root: Path, md5_hex: str) -> Path:
    """Where DVC 3 keeps a file with this md5: <root>/files/md5/ab/cdef..."""
    return root / "files" / "md5" / md5_hex[:2] / md5_hex[2:]


def corrupt(path: Path, offset: int = 1000, size: int = 64, keep_mode: bool = True) -> None:
    """Flip `size` bytes in place (same inode: hard links to it see the change too). With
    keep_mode the file keeps its mode (DVC's read-only 0444 for cache objects), as bit rot would."""
    mode = path.stat().st_mode
    path.chmod(mode | 0o200)
    with path.open("r+b") as f:
        f.seek(offset)
        data = f.read(size)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
    if keep_mode:
        path.chmod(mode)


def dir_hash(repo: Path, stage: str, path: str) -> str:
    """The md5 of a directory output as dvc.lock records it ('<md5>.dir')."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def corrupted_objects(root: Path) -> list[Path]:
    """Objects of a DVC cache or remote whose content no longer hashes to their name."""
    return sorted(p for p in (root / "files" / "md5").rglob("*")
                  if p.is_file() and md5(p) != p.parent.name + p.name.removesuffix(".dir"))


# --- the default local remote --------------------------------------------------------------

def test_round_trip_through_the_default_local_remote(built, original, pushed, env):
    # A sibling of the copy: `../../icmlora-dvc-remote` (relative to .dvc/config) is the same folder.
    dest = clone(built, built.parent / "clone-local")
    assert not (dest / "models/base").exists()
    out = run([DVC, "pull", *SCOPE], dest, env).stdout
    assert "fetched" in out, out
    assert_reproduced(dest, original, env)


# --- a real SSH server ---------------------------------------------------------------------

SSHD = Path("/usr/sbin/sshd")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """OpenSSH on 127.0.0.1 (free port), public-key login with a throw-away key; stopped by PID."""
    sshd_bin = SSHD if SSHD.is_file() else (Path(shutil.which("sshd")) if shutil.which("sshd") else None)
    keygen = shutil.which("ssh-keygen")
    if sshd_bin is None or keygen is None:
        why = ("OpenSSH server not found (/usr/sbin/sshd, ssh-keygen): install it with "
               "`apt-get install openssh-server` (.ci/run does)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{why}; CI must run this test", pytrace=False)  # CI installs it: missing is a failure
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", tmp / name], tmp)
    (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
    (tmp / "authorized_keys").chmod(0o600)
    if os.geteuid() == 0:
        # sshd as root insists on its privilege-separation directory (Debian's service creates it).
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    port = free_port()
    config = tmp / "sshd_config"
    config.write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
AddressFamily inet
HostKey {tmp / 'host_key'}
PidFile {tmp / 'sshd.pid'}
AuthorizedKeysFile {tmp / 'authorized_keys'}
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
LogLevel INFO
""")
    log = (tmp / "sshd.log").open("w")
    proc = subprocess.Popen([str(sshd_bin), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)

    def stop():
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()

    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited ({proc.returncode}):\n{(tmp / 'sshd.log').read_text()}", pytrace=False)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sshd not answering on 127.0.0.1:{port}:\n{(tmp / 'sshd.log').read_text()}",
                                pytrace=False)
                time.sleep(0.2)
        # A HOME of its own: no ~/.ssh/config or agent of the machine's user takes part. The
        # known_hosts there pins the temp host key; today's sshfs passes known_hosts=None to
        # asyncssh, so DVC checks no host key at all (see README), but a checking version would
        # read this file.
        home = tmp / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {(tmp / 'host_key.pub').read_text()}")
        yield {"port": port, "key": tmp / "client_key", "home": home, "log": tmp / "sshd.log",
               "user": getpass.getuser(), "root": tmp}
    finally:
        stop()


def test_round_trip_through_an_ssh_remote(built, original, sshd, env):
    env = dict(env, HOME=str(sshd["home"]))
    remote_dir = sshd["root"] / "remote"
    url = f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}{remote_dir}"

    # The publisher: a clone of the reproduced copy that reads its DVC cache (nothing to re-run),
    # with the remote's URL committed and the key in .dvc/config.local (never committed).
    pub = clone(built, built.parent / "publish-ssh")
    run([DVC, "cache", "dir", "--local", built / ".dvc" / "cache"], pub, env)
    run([DVC, "remote", "add", "-d", "ssh-test", url], pub, env)
    run([DVC, "remote", "modify", "--local", "ssh-test", "keyfile", sshd["key"]], pub, env)
    commit_all(pub, "share over ssh")
    assert "keyfile" not in run(["git", "show", "HEAD:.dvc/config"], pub).stdout
    out = run([DVC, "push", *SCOPE], pub, env).stdout
    assert "pushed" in out, out
    pushed_objects = [p for p in remote_dir.rglob("*") if p.is_file()]
    assert pushed_objects and not corrupted_objects(remote_dir)
    assert "Accepted publickey for" in sshd["log"].read_text()  # it really went through sshd

    dest = clone(pub, built.parent / "clone-ssh")
    assert run([DVC, "remote", "default"], dest, env).stdout.strip() == "ssh-test"
    run([DVC, "remote", "modify", "--local", "ssh-test", "keyfile", sshd["key"]], dest, env)
    out = run([DVC, "pull", *SCOPE], dest, env).stdout
    assert "fetched" in out, out
    assert_reproduced(dest, original, env)


# --- corruption ----------------------------------------------------------------------------

def test_corrupted_cache_is_detected_and_recovered_from_the_remote(built, original, pushed, env):
    dest = clone(built, built.parent / "clone-corrupt-cache")
    # Hard links, as DVC picks on ext4 (no reflinks): the workspace file *is* the cache object.
    run([DVC, "config", "--local", "cache.type", "hardlink"], dest, env)
    run([DVC, "pull", *SCOPE], dest, env)
    good = md5(built / MODEL)
    obj = cache_object(dest / ".dvc" / "cache", good)
    assert (dest / MODEL).stat().st_ino == obj.stat().st_ino
    corrupt(obj)  # stays read-only: DVC trusts read-only cache objects and never rehashes them
    assert md5(obj) != good and md5(dest / MODEL) != good

    # `dvc status` rehashes the changed workspace file: detected.
    status = run([DVC, "status", TARGET], dest, env).stdout
    assert "modified:" in status and "models/base" in status, status
    # `status -c` and `fetch` compare object *names* with the remote, not content: blind.
    assert "in sync" in run([DVC, "status", "-c", *SCOPE], dest, env).stdout
    assert "Everything is up to date" in run([DVC, "fetch", *SCOPE], dest, env).stdout
    assert md5(obj) != good
    # `dvc pull` refuses to overwrite what looks like a user's edit...
    refused = run([DVC, "pull", *SCOPE], dest, env, ok=False)
    assert refused.returncode != 0 and "unsaved files" in refused.stderr and MODEL in refused.stderr, refused.stderr
    # ...and `dvc pull --force` re-links the workspace to the corrupted object and records it as
    # good: afterwards `dvc status` is clean although the bytes are wrong.
    run([DVC, "pull", "--force", *SCOPE], dest, env)
    assert md5(dest / MODEL) != good
    assert UP_TO_DATE in run([DVC, "status", TARGET], dest, env).stdout

    # Recovery: drop the objects whose content no longer hashes to their name, fetch them again,
    # and re-link the workspace from the cache (`pull --force` alone trusts the recorded hash).
    assert corrupted_objects(dest / ".dvc" / "cache") == [obj]
    obj.unlink()
    assert "1 file fetched" in run([DVC, "fetch", *SCOPE], dest, env).stdout
    run([DVC, "checkout", "--relink", *SCOPE], dest, env)
    assert md5(obj) == good and corrupted_objects(dest / ".dvc" / "cache") == []
    assert_reproduced(dest, original, env)

    # A corrupted object left *writable* is not trusted: `dvc status` rehashes it, deletes it and
    # reports it missing; fetch and `pull --force` then restore the workspace.
    corrupt(obj, keep_mode=False)
    status = run([DVC, "status", TARGET], dest, env).stdout
    assert "not in cache:" in status and "models/base" in status, status
    assert not obj.exists()
    assert "1 file fetched" in run([DVC, "fetch", *SCOPE], dest, env).stdout
    run([DVC, "pull", "--force", *SCOPE], dest, env)
    assert_reproduced(dest, original, env)
    assert corrupted_objects(pushed) == []  # the remote was never touched


def test_corrupted_remote_object_fails_the_pull_and_loses_nothing(built, original, pushed, env):
    root = built.parent
    remote = shutil.copytree(pushed, root / "remote-corrupt")  # the shared remote stays intact
    good = md5(built / MODEL)
    bad_obj = cache_object(remote, good)
    corrupt(bad_obj)

    def pull_into_fresh_clone(name: str, verify: bool) -> tuple[Path, subprocess.CompletedProcess]:
        dest = clone(built, root / name)
        run([DVC, "remote", "modify", "--local", "shared", "url", remote], dest, env)
        # This repository's .dvc/config sets verify = true; DVC's own default is false.
        run([DVC, "remote", "modify", "--local", "shared", "verify", "true" if verify else "false"], dest, env)
        return dest, run([DVC, "pull", *SCOPE], dest, env, ok=False)

    # With DVC's default (verify = false) DVC trusts the remote: the bad bytes land in the workspace and
    # `dvc status` calls them up to date.
    dest, proc = pull_into_fresh_clone("clone-remote-trusting", verify=False)
    assert proc.returncode == 0, proc.stderr
    assert md5(dest / MODEL) != good
    assert UP_TO_DATE in run([DVC, "status", TARGET], dest, env).stdout, "DVC verifies downloads now: update README"

    # With `verify = true` DVC rehashes what it downloads, drops the corrupted object and fails.
    dest, proc = pull_into_fresh_clone("clone-remote-verifying", verify=True)
    assert proc.returncode != 0
    assert "Checkout failed for following targets" in proc.stderr and "models/base" in proc.stderr, proc.stderr
    assert not (dest / MODEL).exists() and not cache_object(dest / ".dvc" / "cache", good).exists()
    restored = file_hashes(dest, *OUTS)
    assert restored and restored == {k: v for k, v in original.items() if k.startswith("data/")}

    # Nothing else pushed is lost: only that object is bad. Repair from a good cache: `dvc push`
    # checks names, not content, and takes a directory as complete while its .dir manifest is on
    # the remote, so delete the bad object *and* that manifest, then push again.
    assert corrupted_objects(remote) == [bad_obj]
    run([DVC, "remote", "add", "--local", "corrupt", remote], built, env)
    assert "Everything is up to date" in run([DVC, "push", "-r", "corrupt", *SCOPE], built, env).stdout
    bad_obj.unlink()
    assert "Everything is up to date" in run([DVC, "push", "-r", "corrupt", *SCOPE], built, env).stdout
    manifest = cache_object(remote, dir_hash(built, "base_model", "models/base"))
    assert manifest.name.endswith(".dir")
    manifest.unlink()
    assert "2 files pushed" in run([DVC, "push", "-r", "corrupt", *SCOPE], built, env).stdout
    assert corrupted_objects(remote) == []
    dest, proc = pull_into_fresh_clone("clone-remote-repaired", verify=True)
    assert proc.returncode == 0, proc.stderr
    assert_reproduced(dest, original, env)


# --- MLflow server -------------------------------------------------------------------------

def http_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture
def mlflow_server(tmp_path, env):
    """`mlflow server` on 127.0.0.1 (free port) over a temp sqlite store; its process group is
    killed at the end (it spawns uvicorn workers)."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n"
                            f"{(tmp_path / 'mlflow-server.log').read_text()[-3000:]}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:  # URLError, connection refused, reset
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server: no /health on {url}", pytrace=False)
                time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_stage_logs_to_an_mlflow_server(built, mlflow_server, env):
    # A git clone of the reproduced copy with the prepared data (copied: base_model rewrites
    # models/base, which must not touch any DVC cache), then the stage itself.
    dest = clone(built, built.parent / "clone-mlflow")
    shutil.copytree(built / "data" / "prepared", dest / "data" / "prepared")
    head = run(["git", "rev-parse", "HEAD"], dest).stdout.strip()
    run([str(BIN / "python"), "-m", "icmlora", "base_model"], dest, dict(env, MLFLOW_TRACKING_URI=mlflow_server))
    assert not (dest / "mlflow.db").exists()  # it went to the server, not the default store

    exp = http_json(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=icmlora")
    exp_id = exp["experiment"]["experiment_id"]
    runs = http_json(f"{mlflow_server}/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [exp_id], "filter": "tags.stage = 'base_model'"}).get("runs", [])
    assert len(runs) == 1, runs
    tags = {t["key"]: t["value"] for t in runs[0]["data"].get("tags", [])}
    metrics = {m["key"]: m["value"] for m in runs[0]["data"].get("metrics", [])}
    assert tags["stage"] == "base_model" and tags["git_commit"] == head
    # The server holds the run's own scores: every number of metrics/base_model.json, as written.
    written = json.loads((dest / "metrics" / "base_model.json").read_text())
    numbers = {k: float(v) for k, v in written.items() if isinstance(v, (int, float))}
    assert "map50" in numbers and {k: metrics.get(k) for k in numbers} == pytest.approx(numbers)
    assert runs[0]["info"]["status"] == "FINISHED"
