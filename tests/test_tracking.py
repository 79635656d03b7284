"""A stage fails fast on a tracking server it cannot use, and a run left RUNNING by a killed
process is closed (KILLED) by the next run of the same stage, which names it."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from params_helpers import params_dict

from icmlora import spool, tracking
from icmlora.errors import InputError


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the with block ends: nothing listens there


def test_an_unreachable_server_stops_a_training_stage_before_it_trains(setting, tmp_path, monkeypatch):
    from icmlora.stages.train_lora import train_lora

    cfg, root, _ = setting
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    trained = []
    monkeypatch.setattr("icmlora.stages.train_lora.train", lambda *a, **k: trained.append(1))
    out, state, metrics = tmp_path / "lora", tmp_path / "state", tmp_path / "metrics"
    with pytest.raises(InputError) as caught:
        train_lora(cfg, "circle", 0, prepared=root / "prepared", base_dir=root / "base", out_root=out,
                   state_root=state, metrics_dir=metrics)
    message = str(caught.value)
    assert uri in message and "cannot be reached" in message and "MLFLOW_TRACKING_URI" in message
    assert "make team" in message and "nothing was trained or written" in message
    assert trained == [] and not out.exists() and not state.exists() and not metrics.exists()


def test_the_stage_command_exits_2_naming_the_server(tmp_path, monkeypatch, capsys):
    from icmlora.stage_cli import run_stage
    from icmlora.stages import train_lora as stage

    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(stage, "train_lora", lambda cfg, task, seed: tracking.experiment_id())
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(params_dict()))
    assert run_stage(stage.main, ["--task", "circle", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icmlora train_lora: error: MLflow tracking server") and uri in err


def test_a_server_that_refuses_the_credentials_is_named_with_the_fix(monkeypatch):
    """A local HTTP server that answers /health and refuses everything else with 401, as MLflow's
    basic-auth app does without credentials."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 401)
            self.end_headers()
            self.wfile.write(b"OK" if self.path == "/health" else b"You are not authenticated.")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-her-password")
        with pytest.raises(InputError) as caught:
            tracking.check_server(uri)
        message = str(caught.value)
        assert "refused the request (401, user 'alice')" in message and "MLFLOW_TRACKING_PASSWORD" in message
        assert "not-her-password" not in message
    finally:
        server.shutdown()
        server.server_close()


def test_a_local_store_is_not_probed():
    tracking.check_server("sqlite:////nonexistent/folder/mlflow.db")  # nothing to reach: no error
    tracking.check_server("/nonexistent/mlruns")


KILLED_CHILD = textwrap.dedent("""
    import os, signal
    from icmlora import tracking
    with tracking.start_run("train_lora", "circle-r2-s0", params={"a": 1}, task="circle", rank=2) as run:
        run.log_metrics({"train_loss": 1.5}, step=3)
        print(run.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def runs_of(name: str) -> list:
    return mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time ASC"], output_format="list")


def test_a_killed_runs_orphan_is_marked_killed_and_named_by_the_run_that_takes_over(tmp_path, monkeypatch):
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD], capture_output=True, text=True, cwd=tmp_path,
                           env=os.environ)
    assert child.returncode == -signal.SIGKILL, child.stderr
    # What the killed process logged reaches the store (its background thread, or the next stage's
    # start, or `icmlora tracking sync`: here the last, as a user would after a crash).
    assert tracking.main(["sync"])["waiting"] == 0
    orphan_id = tracking.store_run_id(child.stdout.split()[0])
    mlflow.set_tracking_uri(tracking.tracking_uri())
    assert mlflow.get_run(orphan_id).info.status == "RUNNING"  # what a killed process leaves
    # The run that takes over may come from another commit (a fix after the crash): still its successor.
    assert mlflow.get_run(orphan_id).data.tags["git_commit"] == "unknown"  # the child ran outside a git repo
    monkeypatch.setattr(tracking, "git_commit", lambda: "0123abc")

    # Another run of the stage (another task) is not the killed one's successor: the orphan stays.
    with tracking.start_run("train_lora", "circle-r4-s0", task="circle", rank=4):
        pass
    tracking.finish()  # (sent in the background: the process's end waits for it)
    assert mlflow.get_run(orphan_id).info.status == "RUNNING"
    assert "resumes_run_id" not in runs_of("circle-r4-s0")[0].data.tags

    with tracking.start_run("train_lora", "circle-r2-s0", params={"a": 1}, task="circle", rank=2) as active:
        new_id = active.run_id
    tracking.finish()
    new_id = tracking.store_run_id(new_id)
    orphan, new = (mlflow.get_run(i) for i in (orphan_id, new_id))
    assert orphan.info.status == "KILLED" and new.info.status == "FINISHED"
    assert new.data.tags["resumes_run_id"] == orphan_id and orphan.data.tags["resumed_by_run_id"] == new_id
    assert orphan.data.metrics == {"train_loss": 1.5}  # what it logged stays

    # A run of this key whose process still runs is not an orphan (another process at work).
    with tracking.start_run("train_lora", "circle-r2-s0", params={"a": 1}, task="circle", rank=2) as outer:
        deadline = time.monotonic() + 60
        while tracking.store_run_id(outer.run_id) is None:  # sent in the background: wait for it
            assert time.monotonic() < deadline, "the run was not sent within 60 s"
            time.sleep(0.05)
        outer_id = tracking.store_run_id(outer.run_id)
        sender = spool.Sender(tracking.tracking_uri(), tracking.spool_folder())
        run_key = mlflow.get_run(outer_id).data.tags["run_key"]
        assert sender.close_orphans(run_key, "another-run", tracking.EXPERIMENT) is None
        assert mlflow.get_run(outer_id).info.status == "RUNNING"


def test_the_process_tag_tells_a_live_process_from_a_gone_one():
    mine = spool.process_tag()
    host, pid, start = mine.rsplit(":", 2)
    assert host == socket.gethostname() and int(pid) == os.getpid() and int(start) > 0
    assert spool.process_alive(mine)
    assert not spool.process_alive(f"{host}:{pid}:{int(start) - 100}")  # the pid, given to a later process
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not spool.process_alive(f"{host}:{int(gone.stdout)}:{start}")
    assert spool.process_alive(f"another-host-{host}:{pid}:1")  # cannot tell: never closed


KILLED_STAGE = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from icmlora.config import Params
    from icmlora.resume import TrainingState
    import icmlora.stages.train_lora as stage
    cfg = Params.model_validate(json.loads(Path(sys.argv[1]).read_text()))
    real, folder = TrainingState.save, sys.argv[4]
    def save_then_die(self, *args, **extra):  # a kill -9 right after the pass training rank 2 saved its step 4
        real(self, *args, **extra)
        if extra.get("step") == 4 and folder in str(self.folder):
            os.kill(os.getpid(), signal.SIGKILL)
    TrainingState.save = save_then_die
    root, tmp = Path(sys.argv[2]), Path(sys.argv[3])
    stage.train_lora(cfg, "circle", 0, prepared=root / "prepared", base_dir=root / "base", out_root=tmp / "lora",
                     state_root=tmp / "state", metrics_dir=tmp / "metrics")
""")


@pytest.mark.slow
@pytest.mark.long  # a stage killed and run again (about 40 s each way): `make test-long`
@pytest.mark.parametrize("lora_batch", [1, 0], ids=["one-rank-a-pass", "ranks-in-one-pass"])
def test_a_train_lora_killed_mid_run_is_closed_and_named_by_the_run_that_resumes_it(setting, tmp_path, lora_batch):
    """The stage itself, killed with SIGKILL (no handler runs) while training rank 2, then run again.
    One rank a pass: rank 1 was done and is kept. Ranks 1 and 2 in one pass: both runs were cut
    at step 4, and both are closed and resumed."""
    from icmlora.stages.train_lora import train_lora

    cfg, root, _ = setting
    assert cfg.lora.ranks == [1, 2], cfg.lora.ranks  # the test's names below
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"lora_batch": lora_batch})})
    killed = ["circle-r2-s0"] if lora_batch == 1 else ["circle-r1-s0", "circle-r2-s0"]
    folder = "circle-r2-s0" if lora_batch == 1 else "circle-r1+2-s0"  # the pass's state folder
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    child = subprocess.run([sys.executable, "-c", KILLED_STAGE, tmp_path / "cfg.json", root, tmp_path, folder],
                           capture_output=True, text=True, cwd=tmp_path, env=os.environ)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    tracking.main(["sync"])  # what the killed process had not sent yet
    mlflow.set_tracking_uri(tracking.tracking_uri())
    orphans = {}
    for name in killed:
        (orphans[name],) = [r for r in runs_of(name) if r.info.status == "RUNNING"]
    if lora_batch == 1:
        assert [r.info.status for r in runs_of("circle-r1-s0")] == ["FINISHED"]

    train_lora(cfg, "circle", 0, prepared=root / "prepared", base_dir=root / "base", out_root=tmp_path / "lora",
               state_root=tmp_path / "state", metrics_dir=tmp_path / "metrics")
    tracking.finish()
    for name, orphan in orphans.items():
        old, new = runs_of(name)
        assert old.info.run_id == orphan.info.run_id and mlflow.get_run(old.info.run_id).info.status == "KILLED"
        assert new.info.status == "FINISHED" and new.data.tags["resumes_run_id"] == orphan.info.run_id
        assert mlflow.get_run(old.info.run_id).data.tags["resumed_by_run_id"] == new.info.run_id
        steps = mlflow.MlflowClient().get_metric_history(new.info.run_id, "train_loss")
        assert [m.step for m in steps] == list(range(5, cfg.lora.train.steps + 1)), name  # resumed after step 4
    if lora_batch == 1:
        assert [r.info.status for r in runs_of("circle-r1-s0")] == ["FINISHED"]  # rank 1 was kept, not run again


def test_an_experiment_created_by_another_process_at_the_same_moment_still_gets_the_run(monkeypatch):
    """Two stages starting at once on a fresh server both find no experiment and both create it; the
    second's create fails with RESOURCE_ALREADY_EXISTS. Its run must still go to the experiment
    (MLflow's set_experiment, left to create it, returns without activating it: the run went to Default)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.tracking.client.MlflowClient
    real_get, real_create = client.get_experiment_by_name, client.create_experiment
    raced = []

    def get_before_the_other_created_it(self, name):  # the first look: not there yet
        return None if not raced else real_get(self, name)

    def create_after_the_other(self, name, *args, **kwargs):
        real_create(self, name)  # the other process wins the race ...
        raced.append(name)
        raise MlflowException(f"Experiment(name={name}) already exists.", error_code=RESOURCE_ALREADY_EXISTS)

    monkeypatch.setattr(client, "get_experiment_by_name", get_before_the_other_created_it)
    monkeypatch.setattr(client, "create_experiment", create_after_the_other)
    with tracking.start_run("base_model", "base_model-tiny", source="base") as active:
        run_id = active.run_id
    tracking.finish()
    run_id = tracking.store_run_id(run_id)
    monkeypatch.undo()  # (the test's patches, and conftest's working folder and store: read them first)
    assert raced == [tracking.EXPERIMENT]
    mlflow.set_tracking_uri(uri)
    assert mlflow.get_run(run_id).info.experiment_id == mlflow.get_experiment_by_name(tracking.EXPERIMENT).experiment_id != "0"
