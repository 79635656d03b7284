"""Tracking that never holds up training: every MLflow record of a stage goes through a local spool.

A stage process appends its runs, params, metrics, tags, ends and artifacts, in order, to a JSON-lines
file of its own under ``state/tracking/`` (the repository's: DVC_ROOT under `dvc exp run --temp`), and a
background thread sends them to the tracking store. Appending a line is all the training loop waits
for; a server that goes away costs no training step. When a send fails (MLflow's client has used up its
retries), the thread stops trying for this process and the rest stays in the spool; when the stage
ends it waits for the thread only while the thread makes progress (``ICMLORA_TRACKING_WAIT_S`` seconds
without an answer, default 30), then prints one warning (the server, how many records wait, where, and
``icmlora tracking sync``) and exits as it would have: its outputs are written and its exit status is
its own.

Catching up: the next stage that finds the server sends every waiting spool of that server first (in
the order the spools were made, each record in order), and ``icmlora tracking sync`` does the same by
hand. Each record is sent once in effect: a spool keeps how far it was acknowledged
(``<spool>.sent``), so a record is sent again only when a sync was cut between sending it and writing
that down, and a record sent twice changes nothing. A metric keeps the timestamp it was logged with,
and MLflow drops a metric already logged with the same key, step, timestamp and value; params are
logged with the same value; tags and ends are set again; artifacts are written over; a run is
created with a tag that names it (``icmlora.run_token``), looked up before it is created again.

Runs have local ids (``local-<hex>``) until their creation is sent; ``state/tracking/run_ids.json``
maps them to the store's ids, so a later process (a resumed stage, a sync) finds the run an earlier
one created. Nothing secret is written: the tracking URI is kept without user and password, and
credentials stay in the environment. ``ICMLORA_TRACKING=offline`` spools a whole stage without
trying the server at all (no check at the start either); ``icmlora tracking sync`` sends it later.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from icmlora.files import read_json, write_json

SPOOL_FOLDER = Path("state") / "tracking"
RUN_IDS = "run_ids.json"
RUN_TOKEN_TAG = "icmlora.run_token"
WAIT_VARIABLE, DEFAULT_WAIT_S = "ICMLORA_TRACKING_WAIT_S", 30.0
OFFLINE_VARIABLE = "ICMLORA_TRACKING"
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits per request
LOCAL_ID = re.compile(r"local-[0-9a-f]{32}")
RUN_REFERENCE_TAGS = ("mlflow.parentRunId",)  # tags whose value is a run's id (a local one until it is sent)


def offline() -> bool:
    """The user opted into offline tracking: spool everything, check and send nothing."""
    return os.environ.get(OFFLINE_VARIABLE, "").strip().lower() == "offline"


def public_uri(uri: str) -> str:
    """The tracking URI without user and password (a URI may carry them: they never reach a file)."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return uri


def local_id() -> str:
    return f"local-{uuid.uuid4().hex}"


class RunIds:
    """state/tracking/run_ids.json: {local id: store's run id}, shared by every process."""

    def __init__(self, folder: Path):
        self.path = folder / RUN_IDS

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield read_json(self.path) if self.path.is_file() else {}
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def get(self, key: str) -> str | None:
        if not key.startswith("local-"):
            return key  # already the store's
        with self._locked() as ids:
            return ids.get(key)

    def put(self, key: str, run_id: str) -> None:
        with self._locked() as ids:
            ids[key] = run_id
            write_json(self.path, ids)


class Spool:
    """One process's records: ``<name>.jsonl`` (a header line, then one record per line), the
    number acknowledged in ``<name>.sent``, spooled artifact copies in ``<name>.files/``."""

    def __init__(self, path: Path):
        self.path = path
        self.sent_path = path.with_suffix(".sent")
        self.files = path.with_suffix(".files")

    @classmethod
    def create(cls, folder: Path, uri: str, experiment: str, stage: str) -> tuple[Spool, contextlib.AbstractContextManager]:
        """A new spool, named so that names sort as the spools were made (nanoseconds since the epoch,
        whatever the time zone), and its lock, taken before its first line is written: a sync never
        sees it half made. The caller holds the lock while its process lives."""
        folder.mkdir(parents=True, exist_ok=True)
        spool = cls(folder / f"{time.time_ns():020d}-{os.getpid()}-{stage}.jsonl")
        lock = spool.lock(blocking=True)
        lock.__enter__()
        spool._append({"op": "open", "uri": public_uri(uri), "experiment": experiment, "stage": stage,
                       "pid": os.getpid(), "created": time.time()})
        return spool, lock

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")

    def add(self, record: dict) -> None:
        self._append(record)

    def header(self) -> dict:
        with open(self.path, encoding="utf-8") as fh:
            return json.loads(fh.readline())

    def readable_header(self) -> dict | None:
        """The header, or None for a spool removed meanwhile (sent by another process) or not yet
        written (its process has just made it)."""
        try:
            return self.header()
        except (OSError, json.JSONDecodeError):
            return None

    def records(self) -> list[dict]:
        """Every record after the header; a last line cut short by a killed process is left out."""
        out = []
        with open(self.path, encoding="utf-8") as fh:
            fh.readline()
            for line in fh:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        return out

    def acked(self) -> int:
        try:
            return json.loads(self.sent_path.read_text())["acked"]
        except (OSError, json.JSONDecodeError, KeyError):
            return 0  # none acknowledged yet (or the spool was sent and removed meanwhile)

    def ack(self, count: int) -> None:
        write_json(self.sent_path, {"acked": count})

    def pending(self) -> int:
        try:
            return len(self.records()) - self.acked()
        except OSError:
            return 0  # sent and removed meanwhile

    def remove(self) -> None:
        for path in (self.path, self.sent_path, Path(f"{self.path}.lock")):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.files, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, blocking: bool) -> Iterator[bool]:
        """This spool's lock (held by its process while it lives, then by whoever syncs it):
        yields whether it was taken."""
        with open(f"{self.path}.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class Sender:
    """Sends a spool's records in order to one tracking URI with MLflow's client, acknowledging each."""

    def __init__(self, uri: str, folder: Path):
        import mlflow

        self.uri, self.folder = uri, folder
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.ids = RunIds(folder)
        self._experiments: dict[str, str] = {}

    def experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            from icmlora.tracking import ensure_experiment

            self._experiments[name] = ensure_experiment(self.client, name)
        return self._experiments[name]

    def _run(self, key: str) -> str:
        run_id = self.ids.get(key)
        if run_id is None:
            raise LookupError(f"run {key} was never created in {public_uri(self.uri)} (its creation is in an older spool)")
        return run_id

    def _tags(self, tags: dict[str, str]) -> dict[str, str]:
        """Tags as sent: a run named by its local id (``mlflow.parentRunId``) by the store's id."""
        return {k: self._run(v) if k in RUN_REFERENCE_TAGS and LOCAL_ID.fullmatch(str(v)) else v for k, v in tags.items()}

    def send(self, spool: Spool, record: dict, experiment: str) -> None:
        from mlflow.entities import Metric, Param, RunTag

        op = record["op"]
        if op == "create_run":
            if self.ids.get(record["run"]) is not None:
                return
            tags = {**self._tags(record["tags"]), RUN_TOKEN_TAG: record["run"]}
            exp_id = self.experiment_id(experiment)
            # Created already by a send cut short, or (a parent run) by another process: found, not made again.
            token_key, token = record.get("dedupe") or (RUN_TOKEN_TAG, record["run"])
            found = self.client.search_runs([exp_id], filter_string=f"tags.`{token_key}` = '{token}'", max_results=1)
            run_id = found[0].info.run_id if found else self.client.create_run(
                exp_id, start_time=record["time"], tags=tags, run_name=record["run_name"]).info.run_id
            self.ids.put(record["run"], run_id)
        elif op == "log":
            run_id = self._run(record["run"])
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in record.get("metrics", [])]
            params = [Param(k, v) for k, v in record.get("params", {}).items()]
            tags = [RunTag(k, v) for k, v in self._tags(record.get("tags", {})).items()]
            parts = max(-(-len(metrics) // MAX_METRICS), -(-len(params) // MAX_PARAMS), -(-len(tags) // MAX_TAGS))
            for i in range(parts):  # within MLflow's limits per request
                self.client.log_batch(run_id, metrics=metrics[i * MAX_METRICS:(i + 1) * MAX_METRICS],
                                      params=params[i * MAX_PARAMS:(i + 1) * MAX_PARAMS],
                                      tags=tags[i * MAX_TAGS:(i + 1) * MAX_TAGS])
        elif op == "end":
            self.client.set_terminated(self._run(record["run"]), status=record["status"], end_time=record["time"])
        elif op == "artifacts":
            source = spool.files / record["copy"]  # <n>/<the artifact's own name>
            if source.is_dir():
                self.client.log_artifacts(self._run(record["run"]), str(source), record.get("artifact_path"))
            else:
                self.client.log_artifact(self._run(record["run"]), str(source), record.get("artifact_path"))
        elif op == "close_orphans":
            self.close_orphans(record["run_key"], self._run(record["run"]), experiment)
        else:
            raise ValueError(f"{spool.path}: unknown record {op!r}")

    def close_orphans(self, run_key: str, run_id: str, experiment: str) -> str | None:
        """Mark KILLED the RUNNING runs of ``run_key`` (one stage, run name, tags, DVC experiment and
        workspace on this host) whose process is gone, and tie the newest to ``run_id``, the run that
        takes over (tags ``resumes_run_id`` / ``resumed_by_run_id``); returns its id. Sent as a
        record, so a store that is down when a run starts holds up nothing."""
        found = self.client.search_runs([self.experiment_id(experiment)],
                                        filter_string=f"tags.run_key = '{run_key}' and attributes.status = 'RUNNING'",
                                        order_by=["attributes.start_time DESC"], max_results=50)
        orphans = [r for r in found if r.info.run_id != run_id and not process_alive(r.data.tags.get("process", ""))]
        for orphan in orphans:
            self.client.set_terminated(orphan.info.run_id, status="KILLED")
        if not orphans:
            return None
        newest = orphans[0]
        self.client.set_tag(run_id, "resumes_run_id", newest.info.run_id)
        self.client.set_tag(newest.info.run_id, "resumed_by_run_id", run_id)
        print(f"icmlora: MLflow run {newest.info.run_id} ({newest.info.run_name}) was left RUNNING by a process that is "
              "gone: marked KILLED, resumed by the run now logged", flush=True)
        return newest.info.run_id

    def drain(self, spool: Spool, progress=None) -> int:
        """Send what ``spool`` holds past its acknowledged count, acknowledging each record as it
        goes (``progress()`` after each); returns how many were sent."""
        experiment = spool.header()["experiment"]
        start = done = spool.acked()
        for record in spool.records()[start:]:
            self.send(spool, record, experiment)
            done += 1
            spool.ack(done)
            if progress is not None:
                progress()
        return done - start


class Tracker:
    """A process's tracking: records appended to its spool and sent by a background thread (or only
    spooled, offline). One per process and tracking URI (``tracker``)."""

    def __init__(self, uri: str, experiment: str, stage: str, folder: Path, send: bool = True):
        self.uri, self.experiment, self.stage, self.folder = uri, experiment, stage, folder
        # The lock is held for the process's life: no sync takes a live spool.
        self.spool, self._lock_cm = Spool.create(folder, uri, experiment, stage)
        self.count = 0
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._write = threading.Lock()
        self.sending = send
        self._thread = None
        if send:
            self._thread = threading.Thread(target=self._loop, name="icmlora-tracking", daemon=True)
            self._thread.start()

    # -- what stages call ---------------------------------------------------------------------------
    def add(self, record: dict) -> None:
        with self._write:
            self.spool.add(record)
            self.count += 1
        self._wake.set()

    def create_run(self, run_name: str, tags: dict[str, str], dedupe: tuple[str, str] | None = None) -> str:
        run = local_id()
        self.add({"op": "create_run", "run": run, "run_name": run_name, "tags": tags, "time": _now(),
                  **({"dedupe": list(dedupe)} if dedupe else {})})
        return run

    def log(self, run: str, metrics: list[tuple[str, float, int, int]] = (), params: dict[str, str] | None = None,
            tags: dict[str, str] | None = None) -> None:
        record: dict[str, Any] = {"op": "log", "run": run}
        if metrics:
            record["metrics"] = [[k, float(v), int(ts), int(step)] for k, v, ts, step in metrics]
        if params:
            record["params"] = {k: str(v) for k, v in params.items()}
        if tags:
            record["tags"] = {k: str(v) for k, v in tags.items()}
        if len(record) > 2:
            self.add(record)

    def end(self, run: str, status: str = "FINISHED") -> None:
        self.add({"op": "end", "run": run, "status": status, "time": _now()})

    def artifacts(self, run: str, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or folder, copied into the spool now (the original may change before it is sent)."""
        path = Path(path)
        copy = f"{self.count:06d}/{path.name}"  # the artifact keeps its own name in the store
        target = self.spool.files / copy
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, target)
        self.add({"op": "artifacts", "run": run, "copy": copy, "artifact_path": artifact_path})

    # -- the sending thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        waiting_since = None  # a record names a run another process creates (a worker's parent run)
        try:
            sender = Sender(self.uri, self.folder)
            while True:
                self._wake.wait(0.5)
                self._wake.clear()
                try:
                    sender.drain(self.spool, progress=self._progress)
                    waiting_since = None
                except LookupError:
                    waiting_since = waiting_since or time.monotonic()
                    if time.monotonic() - waiting_since > _wait_seconds():
                        raise
                    continue
                if self._stop.is_set() and self.pending() == 0:
                    return
        except BaseException as exc:  # noqa: BLE001 - whatever stops the sending, the records stay spooled
            self.error = exc

    def _progress(self) -> None:
        self.last_progress = time.monotonic()

    def pending(self) -> int:
        return self.count - self.spool.acked()

    def close(self) -> None:
        """Wait for the records to go while they go; then say what is left, once."""
        self._stop.set()
        self._wake.set()
        wait = _wait_seconds()
        if self._thread is not None:
            self.last_progress = time.monotonic()
            while self._thread.is_alive() and time.monotonic() - self.last_progress < wait:
                self._thread.join(0.2)
        left = self.pending()
        self._lock_cm.__exit__(None, None, None)
        if left == 0:
            self.spool.remove()
            return
        why = ("offline tracking (ICMLORA_TRACKING=offline)" if not self.sending else
               f"{type(self.error).__name__}: {first_line(self.error, 200)}" if self.error else
               f"no answer for {wait:.0f} s")
        print(f"icmlora {self.stage}: warning: MLflow tracking {public_uri(self.uri)}: {left} record(s) not sent "
              f"({why}); they wait in {self.spool.path} and are sent by the next stage that reaches the server, or "
              f"now with `icmlora tracking sync`. This stage's outputs are written.", file=sys.stderr, flush=True)


def process_tag() -> str:
    """``host:pid:start``: the start time tells a live process from a later one given the same pid."""
    pid = os.getpid()
    try:
        import psutil

        start = int(psutil.Process(pid).create_time())
    except Exception:  # no psutil: the pid alone
        start = 0
    return f"{socket.gethostname()}:{pid}:{start}"


def process_alive(tag: str) -> bool:
    """Whether the process a run's ``process`` tag names still runs (True when it cannot tell:
    another host, or an unreadable tag: such a run is never marked KILLED)."""
    try:
        host, pid, start = tag.rsplit(":", 2)
        pid, start = int(pid), int(start)
    except ValueError:
        return True
    if host != socket.gethostname():
        return True
    try:
        import psutil

        process = psutil.Process(pid)
        return not start or int(process.create_time()) == start
    except ImportError:
        return pid_alive(pid)
    except Exception:  # psutil.NoSuchProcess, AccessDenied on a zombie
        return False


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> int:
    return int(time.time() * 1000)


def spools(folder: Path, uri: str | None = None) -> list[Spool]:
    """The spools under ``folder``, oldest first (those of ``uri`` only, when given); a spool removed
    meanwhile, or whose first line its process has not written yet, is left out."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.jsonl")):
        header = Spool(path).readable_header()
        if header is not None and (uri is None or header.get("uri") == public_uri(uri)):
            found.append(Spool(path))
    return found


def sync(folder: Path, uri: str) -> tuple[int, int, list[str], int]:
    """Send every spool of ``uri`` under ``folder`` that no live process holds, oldest first: (records
    sent, records still waiting, problems, spools held by running processes, which send their own).
    A spool whose record names a run a later spool creates is tried again after the others; a store
    that fails stops the sync (the rest waits for the next)."""
    sent, problems, held, later = 0, [], 0, []
    sender = None
    for attempt in (0, 1):
        for spool in (spools(folder, uri) if attempt == 0 else later):
            with spool.lock(blocking=False) as taken:
                if not taken:
                    held += attempt == 0
                    continue
                before = spool.acked()
                try:
                    sender = sender or Sender(uri, folder)
                    sent += sender.drain(spool)
                    spool.remove()
                except LookupError as exc:  # a run another spool creates: after the others
                    sent += spool.acked() - before
                    if attempt == 0:
                        later.append(spool)
                    else:
                        problems.append(f"{spool.path}: {first_line(exc, 300)}")
                except Exception as exc:  # noqa: BLE001 - reported, the records stay for the next try
                    sent += spool.acked() - before
                    problems.append(f"{spool.path}: {type(exc).__name__}: {first_line(exc, 300)}")
                    return sent, sum(s.pending() for s in spools(folder, uri)), problems, held
    return sent, sum(s.pending() for s in spools(folder, uri)), problems, held


def first_line(exc: BaseException, limit: int) -> str:
    return (str(exc).splitlines() or [""])[0][:limit]


def _wait_seconds() -> float:
    return float(os.environ.get(WAIT_VARIABLE, DEFAULT_WAIT_S))
