"""A team's stack on this machine, to try it (and for the tests): PostgreSQL, an S3 endpoint and an
MLflow tracking server with basic auth, all bound to 127.0.0.1.

    python -m icmlora.team up      # or `make team`: starts what is not running, prints the exports
    python -m icmlora.team env     # the exports again (a user: --user bob)
    python -m icmlora.team down    # or `make team-down`: stops the three, keeps their data

What runs (each the real server a team would run, only smaller):
- PostgreSQL (Debian's ``postgresql``; ``initdb`` / ``pg_ctl``, run as the ``postgres`` user when
  started by root): a cluster of its own, databases ``mlflow`` (runs) and ``mlflow_auth`` (users),
  password authentication on 127.0.0.1.
- An S3 endpoint: moto's standalone server, buckets ``icmlora-dvc`` (the DVC remote) and
  ``icmlora-mlflow`` (MLflow's artifacts). moto keeps objects in memory: every request is also
  recorded to ``s3-recording.jsonl`` and replayed when the endpoint starts again, so objects
  outlive a restart as they would on a real S3.
- ``mlflow server --app-name basic-auth``, backend store on PostgreSQL, artifacts proxied
  (``--serve-artifacts``) to ``s3://icmlora-mlflow/artifacts``: clients need only the server's
  URL and their MLflow user, never the bucket's keys. Two users (``alice``, ``bob``) besides the
  admin; ``default_permission = EDIT`` so that both log to the shared experiment.

Passwords are generated on the first ``up`` into ``<dir>/credentials.json`` (mode 0600; ``<dir>``
is ``.team/``, git-ignored) and given to the servers through the environment, never on a command
line; ``<dir>/env`` holds a user's exports. Nothing here reaches the network.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from icmlora.errors import InputError
from icmlora.spool import pid_alive

DVC_BUCKET, MLFLOW_BUCKET = "icmlora-dvc", "icmlora-mlflow"
USERS = ("alice", "bob")
DEFAULT_PORTS = {"postgres": 5433, "s3": 5055, "mlflow": 5050}
BIN = Path(sys.executable).parent


@dataclass
class Ports:
    postgres: int = DEFAULT_PORTS["postgres"]
    s3: int = DEFAULT_PORTS["s3"]
    mlflow: int = DEFAULT_PORTS["mlflow"]


@dataclass
class State:
    ports: Ports
    pg_dir: str = ""
    pids: dict[str, int] = field(default_factory=dict)


def _postgres_bin(name: str) -> str:
    """initdb / pg_ctl: on PATH, else the newest of Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    if not candidates:
        raise InputError(f"PostgreSQL's {name} was not found (on PATH or under /usr/lib/postgresql/*/bin)", [
            "install PostgreSQL: `apt-get install postgresql` (Debian/Ubuntu) or your system's package, then run "
            "this again; a team's real server needs only its URI (see README, \"For a team\")"])
    return candidates[-1]


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: then its commands run as the ``postgres`` user."""
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise InputError("running as root and there is no `postgres` user to run PostgreSQL as", [
            "install Debian's `postgresql` package (it creates the user), or run as an ordinary user"]) from None
    return ["runuser", "-u", "postgres", "--"]


def _wait_http(url: str, proc: subprocess.Popen | None, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}); its log {log}:\n"
                               f"{log.read_text()[-3000:] if log.exists() else ''}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: no answer within {seconds:.0f} s; log {log}")
        time.sleep(0.3)


def _stop_group(pid: int, timeout: float = 20) -> None:
    """SIGTERM the process group a server was started in (mlflow server spawns workers), then SIGKILL."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # our own child (tests): reap it
            if done:
                return
        except ChildProcessError:
            if not pid_alive(pid):
                return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _repair_recording(path: Path) -> bool:
    """Make a recording replayable: one whole request per line. moto's threads append requests
    concurrently, so two may share a line (their newlines written after both), and the endpoint may
    die while writing one (its tail is cut, as a log's last record is lost in a crash). Requests are
    read one JSON object after another, whatever the whitespace between them, up to the first that
    is not whole; the file is rewritten (temporary name, then rename). Whether any is left to replay."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder, records, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except ValueError:  # cut short by the crash: the rest is dropped
            break
        if isinstance(record, dict):
            records.append(record)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)
    return bool(records)


class Stack:
    """The three servers of one folder (``.team`` for `make team`; a temporary one in tests)."""

    def __init__(self, root: Path, ports: Ports | None = None):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        saved = self._read_state()
        self.state = saved or State(ports or Ports())
        if ports is not None and saved is not None and asdict(ports) != asdict(saved.ports) and saved.pids:
            raise InputError(f"{self.root}: its stack runs on ports {asdict(saved.ports)}, not {asdict(ports)}",
                             ["stop it first (`make team-down`), or use the ports it runs on"])
        if ports is not None:
            self.state.ports = ports
            self._write_state()
        self.credentials = self._credentials()

    # --- state and secrets ------------------------------------------------------------------
    def _read_state(self) -> State | None:
        path = self.root / "state.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return State(Ports(**data["ports"]), data.get("pg_dir", ""), data.get("pids", {}))

    def _write_state(self) -> None:
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self.state), indent=2))
        os.replace(tmp, self.root / "state.json")

    def _credentials(self) -> dict:
        path = self.root / "credentials.json"
        if path.is_file():
            return json.loads(path.read_text())
        creds = {"postgres": secrets.token_urlsafe(18), "admin": secrets.token_urlsafe(18),
                 "flask_secret": secrets.token_hex(32), "aws_access_key_id": "icmlora" + secrets.token_hex(6),
                 "aws_secret_access_key": secrets.token_urlsafe(30),
                 "users": {user: secrets.token_urlsafe(18) for user in USERS}}
        fd = os.open(self.root / "credentials.json.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(creds, handle, indent=2)
        os.replace(self.root / "credentials.json.tmp", path)
        return creds

    # --- URIs ---------------------------------------------------------------------------------
    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.state.ports.mlflow}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.state.ports.s3}"

    def _pg_uri(self, database: str) -> str:
        return f"postgresql://mlflow@127.0.0.1:{self.state.ports.postgres}/{database}"  # password: PGPASSWORD

    def aws_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.credentials["aws_access_key_id"],
                "AWS_SECRET_ACCESS_KEY": self.credentials["aws_secret_access_key"], "AWS_DEFAULT_REGION": "us-east-1"}

    def client_env(self, user: str = USERS[0]) -> dict[str, str]:
        """What a colleague exports: the server and their MLflow user; the S3 keys for `dvc push`."""
        if user not in self.credentials["users"]:
            raise InputError(f"no MLflow user {user!r} in {self.root / 'credentials.json'}",
                             [f"use one of {', '.join(self.credentials['users'])}"])
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": self.credentials["users"][user], **self.aws_env()}

    def admin_auth(self) -> tuple[str, str]:
        return "admin", self.credentials["admin"]

    # --- PostgreSQL -----------------------------------------------------------------------------
    def _pg_dir(self) -> Path:
        """The cluster's folder. As root, PostgreSQL runs as `postgres`, who must reach it: a private
        folder under the system's temporary folder, owned by postgres; otherwise <root>/postgres."""
        if self.state.pg_dir and Path(self.state.pg_dir).is_dir():
            return Path(self.state.pg_dir)
        if os.geteuid() == 0:
            import pwd

            folder = Path(tempfile.mkdtemp(prefix="icmlora-team-pg-"))
            entry = pwd.getpwnam("postgres")
            os.chown(folder, entry.pw_uid, entry.pw_gid)
        else:
            folder = self.root / "postgres"
            folder.mkdir(mode=0o700, exist_ok=True)
        self.state.pg_dir = str(folder)
        self._write_state()
        return folder

    def _pg_running(self) -> bool:
        folder = Path(self.state.pg_dir) if self.state.pg_dir else None
        if folder is None or not (folder / "data").is_dir():
            return False
        status = subprocess.run([*_as_postgres(), _postgres_bin("pg_ctl"), "-D", str(folder / "data"), "status"],
                                capture_output=True, text=True)
        return status.returncode == 0

    def start_postgres(self) -> None:
        if self._pg_running():
            return
        folder, runner = self._pg_dir(), _as_postgres()
        data = folder / "data"
        if not data.is_dir():
            pwfile = folder / "pwfile"
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(self.credentials["postgres"] + "\n")
            if runner:
                shutil.chown(pwfile, "postgres")
            try:
                subprocess.run([*runner, _postgres_bin("initdb"), "-D", str(data), "-U", "mlflow", "--pwfile",
                                str(pwfile), "--auth-host", "scram-sha-256", "--auth-local", "trust", "-E", "UTF8",
                                "--locale", "C"], check=True, capture_output=True, text=True)
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(f"initdb failed:\n{exc.stdout}\n{exc.stderr}") from None
            finally:
                pwfile.unlink(missing_ok=True)
        options = f"-c listen_addresses=127.0.0.1 -p {self.state.ports.postgres} -k {folder}"
        try:
            subprocess.run([*runner, _postgres_bin("pg_ctl"), "-D", str(data), "-l", str(folder / "postgres.log"),
                            "-w", "-t", "60", "-o", options, "start"], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            log = folder / "postgres.log"
            raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1:{self.state.ports.postgres}:\n{exc.stdout}"
                               f"{exc.stderr}\n{log.read_text()[-2000:] if log.exists() else ''}") from None
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.state.ports.postgres, user="mlflow",
                             password=self.credentials["postgres"], dbname="postgres", autocommit=True) as conn:
            with conn.cursor() as cur:
                for name in ("mlflow", "mlflow_auth"):
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cur.fetchone() is None:
                        cur.execute(f'CREATE DATABASE "{name}"')

    def stop_postgres(self) -> None:
        if self._pg_running():
            subprocess.run([*_as_postgres(), _postgres_bin("pg_ctl"), "-D", str(Path(self.state.pg_dir) / "data"),
                            "-m", "fast", "-w", "stop"], capture_output=True, text=True)

    # --- S3 -----------------------------------------------------------------------------------------
    def _running(self, name: str) -> bool:
        pid = self.state.pids.get(name)
        return bool(pid) and pid_alive(pid)

    def start_s3(self) -> None:
        if self._running("s3"):
            return
        recording = self.root / "s3-recording.jsonl"
        replay = _repair_recording(recording)
        log = self.root / "s3.log"
        env = dict(os.environ, MOTO_ENABLE_RECORDING="True", MOTO_RECORDER_FILEPATH=str(recording))
        with log.open("a") as out:
            proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.state.ports.s3)],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.state.pids["s3"] = proc.pid
        self._write_state()
        _wait_http(f"{self.s3_endpoint}/moto-api/", proc, log)
        if replay:  # the objects of earlier runs: moto keeps them in memory only
            req = urllib.request.Request(f"{self.s3_endpoint}/moto-api/recorder/replay-recording", method="POST")
            with urllib.request.urlopen(req, timeout=3600) as resp:
                resp.read()
        client = self.s3_client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in (DVC_BUCKET, MLFLOW_BUCKET):
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)

    def s3_client(self):
        import boto3

        env = self.aws_env()
        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def kill_s3(self) -> None:
        """Kill the endpoint at once (SIGKILL), as a crash would: what it recorded stays."""
        pid = self.state.pids.pop("s3", None)
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self._write_state()

    # --- MLflow ---------------------------------------------------------------------------------------
    def start_mlflow(self, workers: int = 2) -> None:
        if self._running("mlflow"):
            return
        ini = self.root / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = EDIT\n"
                       f"database_uri = {self._pg_uri('mlflow_auth')}\nadmin_username = admin\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       # A checked password is trusted for 60 s per worker: without it every request pays a
                       # PBKDF2 hash (a stage logs hundreds); a changed password reaches other workers late.
                       "auth_cache_ttl_seconds = 60\n")
        env = dict(os.environ, **self.aws_env(), PGPASSWORD=self.credentials["postgres"],
                   MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=self.credentials["admin"],
                   MLFLOW_FLASK_SERVER_SECRET_KEY=self.credentials["flask_secret"],
                   MLFLOW_S3_ENDPOINT_URL=self.s3_endpoint,
                   # No GenAI job runners (about ten huey consumers, ~250 MB each): the pipeline logs runs only.
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(key, None)
        log = self.root / "mlflow.log"
        # The tables first, by one process: two workers creating them at once would collide.
        subprocess.run([str(BIN / "mlflow"), "db", "upgrade", self._pg_uri("mlflow")], env=env, check=True,
                       capture_output=True, text=True)
        with log.open("a") as out:
            proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                 "--port", str(self.state.ports.mlflow), "--workers", str(workers),
                 "--backend-store-uri", self._pg_uri("mlflow"), "--serve-artifacts",
                 "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.state.pids["mlflow"] = proc.pid
        self._write_state()
        _wait_http(f"{self.tracking_uri}/health", proc, log, seconds=180)
        for user, password in self.credentials["users"].items():
            self._create_user(user, password)

    def _create_user(self, user: str, password: str) -> None:
        import requests

        answer = requests.post(f"{self.tracking_uri}/api/2.0/mlflow/users/create", auth=self.admin_auth(),
                               json={"username": user, "password": password}, timeout=30)
        if answer.status_code == 200 or "already exists" in answer.text:
            return
        raise RuntimeError(f"creating MLflow user {user}: {answer.status_code} {answer.text[:300]}")

    def stop(self, name: str) -> None:
        pid = self.state.pids.pop(name, None)
        if pid:
            _stop_group(pid)
        self._write_state()

    # --- the whole stack -------------------------------------------------------------------------------
    def up(self) -> None:
        self.start_postgres()
        self.start_s3()
        self.start_mlflow()
        self.write_env()

    def down(self) -> None:
        self.stop("mlflow")
        self.stop("s3")
        self.stop_postgres()

    def write_env(self, user: str = USERS[0]) -> Path:
        path = self.root / "env"
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.exports(user))
        os.replace(path.with_suffix(".tmp"), path)
        return path

    def exports(self, user: str = USERS[0]) -> str:
        return "".join(f"export {k}={v}\n" for k, v in self.client_env(user).items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m icmlora.team", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "env"])
    parser.add_argument("--dir", type=Path, default=Path(".team"), help="the stack's folder (default .team)")
    parser.add_argument("--user", default=USERS[0], help=f"whose exports to print ({', '.join(USERS)})")
    for name, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=port, help=f"default {port}")
    args = parser.parse_args(argv)
    ports = Ports(args.postgres_port, args.s3_port, args.mlflow_port)
    try:
        stack = Stack(args.dir, ports if args.action == "up" else None)
        if args.action == "down":
            stack.down()
            print(f"team: stopped the MLflow server, the S3 endpoint and PostgreSQL of {stack.root} (data kept)")
            return 0
        if args.action == "up":
            stack.up()
        print(f"# the team stack of {stack.root}: MLflow {stack.tracking_uri} (basic auth; PostgreSQL on "
              f"127.0.0.1:{stack.state.ports.postgres}, artifacts in s3://{MLFLOW_BUCKET}), S3 {stack.s3_endpoint}")
        print(f"# paste into your shell (or: source {stack.write_env(args.user)}); never commit them:")
        print(stack.exports(args.user), end="")
        print(f"# the DVC remote (endpoint and bucket in .dvc/config, keys from the environment above):\n"
              f"# dvc remote add team s3://{DVC_BUCKET}/icmlora && dvc remote modify team endpointurl "
              f"{stack.s3_endpoint}\n# dvc push -r team")
        return 0
    except InputError as exc:
        print(f"icmlora team: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
