"""MLflow set-up shared by every stage.

The store defaults to ``sqlite:///<repo>/mlflow.db`` with an absolute path: DVC sets
``DVC_ROOT`` to the parent repository even under ``dvc exp run --temp/--queue``, so runs of
a temporary workspace land in the repository's store. ``MLFLOW_TRACKING_URI`` wins when set
(a shared ``mlflow server``). Runs are tagged ``stage``, ``git_commit`` and, under
``dvc exp run``, ``dvc_exp``; params are flattened to dotted keys.

A server is checked before the first run of a process (``check_server``): one that cannot be
reached, or refuses the credentials (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``,
read by MLflow from the environment, never written anywhere), stops the stage with exit 2 before it
trains (unless ``ICMLORA_TRACKING=offline``). A run whose process died (killed, out of memory) stays
RUNNING on the store for ever: the next run of the same stage, name and workspace marks it KILLED and
carries ``resumes_run_id``.

After that check, nothing a stage logs waits for the store: runs, params, metrics, tags and
artifacts go through the process's spool (``icmlora.spool``), sent in the background; a server that
goes away mid-stage costs no training and no record (``icmlora tracking sync`` sends what waits).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from icmlora.errors import InputError
from icmlora.spool import SPOOL_FOLDER, Tracker, offline, process_tag, public_uri, spools, sync

EXPERIMENT = "icmlora"
WORKSPACE = "workspace"  # the dvc_exp tag of runs made outside `dvc exp run`
# MLflow 3's UI opens an experiment on its GenAI overview unless it is tagged as model
# development: with this tag it opens on the runs table, where generated and trained compare.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
MLFLOW_PARAM_LIMIT = 6000  # MLflow's maximum length of a param value


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Params (or a section, or a nested dict) -> {"dotted.key": value}, as MLflow params."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump()
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict) or hasattr(value, "model_dump"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def repo_root() -> Path:
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def base_tags(stage: str, **extra: Any) -> dict[str, str]:
    """``stage``, ``git_commit`` and ``dvc_exp``: the DVC experiment's name under `dvc exp run`,
    "workspace" otherwise, so a filter on it separates an experiment's runs from the baseline's."""
    tags = {"stage": stage, "git_commit": git_commit(), "dvc_exp": os.environ.get("DVC_EXP_NAME") or WORKSPACE}
    tags.update({k: str(v) for k, v in extra.items() if v is not None})
    return tags


def stage_params(cfg: Any, stage: str, dvc_file: Path = Path("dvc.yaml")) -> dict[str, Any]:
    """The params a stage reads, flattened to dotted keys: the sections its ``params`` list in
    dvc.yaml names (so a run records exactly what DVC re-runs it for); all of them when the
    stage or dvc.yaml is not there (a stage function called from elsewhere)."""
    data = cfg.model_dump()
    keys = None
    if dvc_file.is_file():
        from ruamel.yaml import YAML

        spec = (YAML(typ="safe", pure=True).load(dvc_file.read_text()) or {}).get("stages", {}).get(stage)
        if spec is not None:
            keys = [k for k in spec.get("do", spec).get("params", []) if isinstance(k, str)]
    if keys is None:
        return flatten(data)
    out: dict[str, Any] = {}
    for key in keys:
        node = data
        for part in key.split("."):
            node = node[part]
        out.update(flatten(node, f"{key}.") if isinstance(node, dict) else {key: node})
    return out


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """One process at a time sets up a SQLite store (tables, migrations, the experiment): two
    `dvc queue start -j 2` workers starting on a fresh mlflow.db would both create its tables.
    Later writes need no lock: MLflow waits up to 20 s for a busy SQLite file (busy_timeout)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = Path(uri[len("sqlite:///"):].split("?")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


SERVER_TIMEOUT_S = 10.0  # seconds to wait for a tracking server's answer before the stage gives up
_checked: set[str] = set()


def check_server(uri: str, timeout: float = SERVER_TIMEOUT_S) -> None:
    """Raise InputError (the stage exits 2, before it trains) when an http(s) tracking server does
    not answer ``/health`` or refuses this environment's credentials; a store that is not a server
    (``sqlite:``, a folder) is not checked. MLflow's own client would retry for minutes first."""
    if not uri.startswith(("http://", "https://")) or uri in _checked:
        return
    import requests

    ways = ("start the server (for a try on this machine: `make team`, or `make mlflow` for the repository's "
            "store), set MLFLOW_TRACKING_URI to one that answers, or unset it to log to "
            f"sqlite:///{repo_root() / 'mlflow.db'}; nothing was trained or written")
    base = uri.rstrip("/")
    try:
        requests.get(f"{base}/health", timeout=timeout).raise_for_status()
    except requests.RequestException as exc:
        raise InputError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) cannot be reached: "
                         f"{type(exc).__name__}: {exc}", [ways]) from None
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    try:
        answer = requests.get(f"{base}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=timeout,
                              auth=(user, password or "") if user else None,
                              headers={"Authorization": f"Bearer {token}"} if token and not user else None)
    except requests.RequestException as exc:
        raise InputError(f"MLflow tracking server {uri}: {type(exc).__name__}: {exc}", [ways]) from None
    if answer.status_code in (401, 403):
        who = f"user {user!r}" if user else "no credentials"
        raise InputError(f"MLflow tracking server {uri} refused the request ({answer.status_code}, {who})", [
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment (never in a tracked file) "
            "to an account of the server's basic-auth app, with permission on the experiment; nothing was trained "
            "or written"])
    _checked.add(uri)


def ensure_experiment(client, name: str) -> str:
    """The id of experiment ``name`` in the client's store, created (tagged to open on its runs
    table) if it is not there; a colleague's stage creating it at the same moment is no error."""
    import mlflow

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # Without a server, artifacts would land under the current folder, which is a throw-away copy
        # under `dvc exp run --temp`: pin them beside the store.
        uri = client.tracking_uri
        location = (repo_root() / "mlflow-artifacts").as_uri() if uri.startswith("sqlite:") else None
        with _store_lock(uri):
            try:
                client.create_experiment(name, artifact_location=location)
            except mlflow.exceptions.MlflowException as exc:
                # (mlflow.set_experiment would take that in its stride but return without making the
                # experiment active, so a run would go to the Default experiment.)
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        experiment = client.get_experiment_by_name(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        # Two stages can find the tag missing at once (queue workers on one SQLite file, two clones on
        # one server): the store refuses the second insert of the same key. A SQLite store is tagged
        # under its set-up lock; a server's refusal is no error once the tag reads as wanted.
        with _store_lock(client.tracking_uri):
            try:
                client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            except mlflow.exceptions.MlflowException:
                if client.get_experiment(experiment.experiment_id).tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                    raise
    return experiment.experiment_id


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)


def spool_folder() -> Path:
    """state/tracking/ of the repository (DVC_ROOT under `dvc exp run --temp`: one place to sync)."""
    return repo_root() / SPOOL_FOLDER


READY = "ICMLORA_TRACKING_READY"  # the store a stage process checked: its workers inherit the check


def _mlflow():
    """The client side of the store, checked and ready (``check_server``; the experiment exists; the
    spools earlier stages left for this store sent, oldest first): once per process, at a stage's start
    (after that nothing waits for the store). Workers a stage spawns inherit the check (``READY``)."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri in _ready:
        return mlflow
    check_server(uri)
    with _store_lock(uri):  # the client creates a fresh SQLite store's tables: one process at a time
        client = mlflow.MlflowClient()
    ensure_experiment(client, experiment_name())
    sent, waiting, problems, _ = sync(spool_folder(), uri)
    if sent or problems:
        print(f"icmlora: sent {sent} tracking record(s) that earlier stages left waiting for {public_uri(uri)}"
              + (f"; {waiting} still wait ({'; '.join(problems)})" if problems else ""), flush=True)
    _ready.add(uri)
    os.environ[READY] = public_uri(uri)
    return mlflow


_ready: set[str] = set()
_trackers: dict[str, Tracker] = {}


def tracker(stage: str) -> Tracker:
    """This process's tracker for the current store (made on first use: the server checked then,
    unless offline or checked by the stage process that spawned this one); its records are sent or
    left waiting when the process ends (``finish``)."""
    uri = tracking_uri()
    if uri not in _trackers:
        if not offline() and os.environ.get(READY) != public_uri(uri):
            _mlflow()
        _trackers[uri] = Tracker(uri, experiment_name(), stage, spool_folder(), send=not offline())
        if len(_trackers) == 1:
            atexit.register(finish)
    return _trackers[uri]


def finish() -> None:
    """Send or spool what this process logged (waiting while the store answers); say what is left.
    At exit by itself; a worker process (which exits without atexit) calls it."""
    while _trackers:
        _trackers.popitem()[1].close()


def experiment_id() -> str:
    """The id of the experiment runs go to (created on first use)."""
    mlflow = _mlflow()
    return ensure_experiment(mlflow.MlflowClient(), experiment_name())


@contextlib.contextmanager
def parent_run(stage: str, params: Any = None) -> Iterator[str]:
    """The id of the parent run of one execution of a matrix stage (one process per item).

    Items find their parent by a key of (stage, commit, DVC experiment, params), and the
    first one creates it; children point at it with the ``mlflow.parentRunId`` tag, which is
    what the UI nests by (``start_run(parent_run_id=...)`` would need the parent active).
    """
    if not is_main_process():
        yield None
        return
    track = tracker(stage)
    tags = base_tags(stage, role="parent")
    key = hashlib.sha256(json.dumps([tags, flatten(params) if params is not None else {}], sort_keys=True, default=str)
                         .encode()).hexdigest()[:16]
    if not offline():
        client = _mlflow().MlflowClient()
        found = client.search_runs([ensure_experiment(client, experiment_name())],
                                   filter_string=f"tags.parent_key = '{key}'", max_results=1)
        if found:
            yield found[0].info.run_id
            return
    # Created through the spool; one an item of another process made meanwhile is found, not made twice.
    run = track.create_run(stage, {**tags, "parent_key": key}, dedupe=("parent_key", key))
    if params is not None:
        track.log(run, params={k: str(v)[:MLFLOW_PARAM_LIMIT] for k, v in flatten(params).items()})
    track.end(run)
    yield run


def is_main_process() -> bool:
    """False in the non-zero ranks of an `accelerate launch` run: only rank 0 logs."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class Run:
    """A run being logged through the process's tracker: what stages log into (the methods are
    MLflow's names); nothing here waits for the store."""

    def __init__(self, track: Tracker, run_id: str):
        self.track, self.run_id = track, run_id
        self._tables: list[dict] = []

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.track.log(self.run_id, metrics=[(k, float(v), now, step) for k, v in metrics.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        self.track.log(self.run_id, params={k: str(v)[:MLFLOW_PARAM_LIMIT] for k, v in params.items()})

    def set_tag(self, key: str, value: Any) -> None:
        self.track.log(self.run_id, tags={key: str(value)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.track.artifacts(self.run_id, path, artifact_path)

    log_artifacts = log_artifact  # a folder: its files under artifact_path

    def log_table(self, frame, artifact_file: str) -> None:
        """A table artifact as ``mlflow.log_table`` writes one (pandas' split orient, the run's
        ``mlflow.loggedArtifacts`` tag), replaced rather than appended to when sent again."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            frame.to_json(path, orient="split", index=False, date_format="iso")
            self.track.artifacts(self.run_id, path, str(Path(artifact_file).parent) if "/" in artifact_file else None)
        self._tables.append({"path": artifact_file, "type": "table"})
        self.set_tag("mlflow.loggedArtifacts", json.dumps(self._tables))


class _Silent:
    """Stands in for a run on non-main processes: every call does nothing."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def start_run(stage: str, run_name: str, params: Any = None, parent_run_id: str | None = None,
              **tags: Any) -> Iterator[Run]:
    """A run with the standard tags and flattened params, logged through the process's tracker;
    yields it (a do-nothing stand-in on non-main processes). It ends FINISHED, or FAILED when the
    body raises."""
    if not is_main_process():
        yield _Silent()
        return
    track = tracker(stage)
    all_tags = base_tags(stage, **tags)
    # One key per (stage, run name, tags, DVC experiment, workspace on this host): a run of it that is
    # still RUNNING although its process is gone was killed; this run takes over from it.
    run_key = hashlib.sha256(json.dumps([run_name, {k: v for k, v in all_tags.items() if k != "git_commit"},
                                         socket.gethostname(), str(repo_root())], sort_keys=True).encode()
                             ).hexdigest()[:16]
    all_tags.update(run_key=run_key, process=process_tag())
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = Run(track, track.create_run(run_name, all_tags))
    track.add({"op": "close_orphans", "run": run.run_id, "run_key": run_key})  # a killed run this one takes over
    if params is not None:
        run.log_params(flatten(params))
    try:
        yield run
    except BaseException:
        track.end(run.run_id, "FAILED")
        raise
    track.end(run.run_id)


@contextlib.contextmanager
def store_run(stage: str, run_name: str, params: Any = None, **tags: Any) -> Iterator[Any]:
    """A run made in the store at once, through MLflow's own API (yields the mlflow module, the run
    active): for commands that need it there before they go on (``icmlora register``: a model
    version is logged into a run). Stages log through ``start_run``, which never waits."""
    mlflow = _mlflow()
    mlflow.set_experiment(experiment_name())
    with mlflow.start_run(run_name=run_name, tags=base_tags(stage, **tags)):
        if params is not None:
            mlflow.log_params({k: str(v)[:MLFLOW_PARAM_LIMIT] for k, v in flatten(params).items()})
        yield mlflow


def store_run_id(run_id: str) -> str | None:
    """The store's id of a run this package logged (a ``local-...`` id until its creation was sent;
    None while it waits in a spool)."""
    from icmlora.spool import RunIds

    return RunIds(spool_folder()).get(run_id)


def log_to_run(stage: str, run_id: str | None, metrics: dict[str, float]) -> None:
    """Metrics into a run by id (a local id an earlier process of the stage made, too), through the tracker."""
    if run_id is None or not is_main_process():
        return
    now = int(time.time() * 1000)
    tracker(stage).log(run_id, metrics=[(k, float(v), now, 0) for k, v in metrics.items()])


class MetricBuffer:
    """Collects per-step metrics of a run and hands them to the tracker in batches (one spool record
    per batch, not per step)."""

    def __init__(self, run: Run, flush_every: int = 200):
        self.run, self.flush_every = run, flush_every
        self.pending: list[tuple[str, float, int, int]] = []

    def add(self, key: str, value: float, step: int) -> None:
        self.pending.append((key, float(value), int(time.time() * 1000), int(step)))
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending and isinstance(self.run, Run):
            self.run.track.log(self.run.run_id, metrics=self.pending)
        self.pending = []


def main(argv: list[str] | None = None) -> dict:
    """``icmlora tracking sync``: send the records stages left waiting for the tracking store
    (MLFLOW_TRACKING_URI, else the repository's mlflow.db), oldest first; ``icmlora tracking status``:
    list them."""
    import argparse

    parser = argparse.ArgumentParser(prog="icmlora tracking", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("sync", help="send every waiting record to the tracking store, in order, each once")
    commands.add_parser("status", help="list the spools that wait, and how many records each holds")
    args = parser.parse_args(argv)
    uri, folder = tracking_uri(), spool_folder()
    if args.command == "status":
        waiting = {str(s.path): {"uri": h.get("uri"), "stage": h.get("stage"), "waiting": s.pending()}
                   for s in spools(folder) if (h := s.readable_header()) is not None}
        for path, info in waiting.items():
            print(f"{info['waiting']:6d}  {info['stage']:<14} {info['uri']}  {path}")
        print(f"icmlora tracking: {sum(i['waiting'] for i in waiting.values())} record(s) wait in {len(waiting)} spool(s)")
        return waiting
    check_server(uri)
    import mlflow

    ensure_experiment(mlflow.MlflowClient(tracking_uri=uri), experiment_name())
    sent, waiting, problems, held = sync(folder, uri)
    if problems:
        raise InputError(f"icmlora tracking sync: sent {sent} record(s) to {public_uri(uri)}, {waiting} still wait",
                         problems + ["run `icmlora tracking sync` again once the store answers"])
    print(f"icmlora tracking: sent {sent} record(s) to {public_uri(uri)}; "
          + (f"{waiting} wait in {held} spool(s) of running stages, which send them themselves" if waiting
             else "none wait"))
    return {"sent": sent, "waiting": waiting}
