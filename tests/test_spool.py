"""The tracking spool (``icmlora.spool``): what a stage logs is kept on disk and sent in order, once in
effect, whatever the store does meanwhile. A store that fails is stood in for by a sender that raises;
the real server, killed and restarted, is in test_team.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import mlflow
import pytest

from icmlora import spool, tracking


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def _log_a_run(steps: int = 450) -> str:
    """What a training stage logs: a run, params, a metric per step (in batches), a tag, an end."""
    with tracking.start_run("train_cvae", "cvae-r1", params={"lr": 0.002, "epochs": steps}, rank=1) as run:
        buffer = tracking.MetricBuffer(run)
        for step in range(1, steps + 1):
            buffer.add("loss", 1.0 / step, step)
        buffer.flush()
        run.set_tag("generator_dir", "models/cvae/r1")
    return run.run_id


def test_a_run_goes_through_the_spool_in_order_and_the_spool_goes_when_sent():
    local = _log_a_run()
    assert local.startswith("local-")
    track = tracking._trackers[tracking.tracking_uri()]
    ops = [r["op"] for r in _records(track.spool.path)]
    # the run, the killed run it may take over, params, 3 metric batches, the tag, its end
    assert ops == ["create_run", "close_orphans", "log", "log", "log", "log", "log", "end"]
    tracking.finish()
    assert not track.spool.path.exists() and not track.spool.sent_path.exists()  # all sent: nothing waits
    run = mlflow.get_run(tracking.store_run_id(local))
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.002"
    assert run.data.tags["generator_dir"] == "models/cvae/r1" and run.data.tags["stage"] == "train_cvae"
    assert _history(run.info.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 451)]


def test_a_store_that_fails_costs_nothing_and_a_sync_sends_every_record_once(monkeypatch, capsys):
    """The sender fails from its first record (the store is gone): the stage's code goes on, its end
    prints one warning naming the store, the count and the spool; a sync once the store is back sends
    everything; a sync cut after some records and one started over from the first send nothing twice."""
    monkeypatch.setenv(spool.WAIT_VARIABLE, "2")
    down = [True]
    real_send = spool.Sender.send

    def send(self, *args, **kwargs):
        if down[0]:
            raise ConnectionError("Max retries exceeded (the server is gone)")
        return real_send(self, *args, **kwargs)

    monkeypatch.setattr(spool.Sender, "send", send)
    local = _log_a_run()
    track = tracking._trackers[tracking.tracking_uri()]
    path = track.spool.path
    tracking.finish()
    err = capsys.readouterr().err
    assert f"{spool.public_uri(tracking.tracking_uri())}: 8 record(s) not sent (ConnectionError" in err
    assert str(path) in err and "icmlora tracking sync" in err
    assert path.exists() and tracking.store_run_id(local) is None

    down[0] = False
    cut = []

    def cut_after_three(self, *args, **kwargs):  # a sync killed after its third record
        if len(cut) == 3:
            raise KeyboardInterrupt
        cut.append(args[1]["op"])
        return real_send(self, *args, **kwargs)

    monkeypatch.setattr(spool.Sender, "send", cut_after_three)
    with pytest.raises(KeyboardInterrupt):
        spool.sync(tracking.spool_folder(), tracking.tracking_uri())
    assert spool.Spool(path).acked() == 3 and tracking.store_run_id(local) is not None
    monkeypatch.setattr(spool.Sender, "send", real_send)
    spool.Spool(path).ack(0)  # as if the cut had come before any acknowledgement was written: all sent again
    (tracking.spool_folder() / spool.RUN_IDS).unlink()  # ... even the run's id: the run is found by its token
    assert tracking.main(["sync"]) == {"sent": 8, "waiting": 0}
    assert not path.exists()
    run_id = tracking.store_run_id(local)
    runs = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], output_format="list")
    assert [r.info.run_id for r in runs] == [run_id]  # created once, found again by its token
    assert _history(run_id, "loss") == [(s, 1.0 / s) for s in range(1, 451)]  # every step, each once
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_a_failed_stage_ends_its_run_failed():
    with pytest.raises(RuntimeError):
        with tracking.start_run("train_lora", "circle-r1-s0", task="circle") as run:
            raise RuntimeError("out of memory")
    tracking.finish()
    assert mlflow.get_run(tracking.store_run_id(run.run_id)).info.status == "FAILED"


OFFLINE_STAGE = textwrap.dedent("""
    from icmlora import tracking
    with tracking.start_run("train_cvae", "cvae-r2", params={"a": 1}, rank=2) as run:
        run.log_metrics({"loss": 0.5}, step=1)
    print(run.run_id)
""")


def test_offline_tracking_spools_a_whole_stage_without_asking_the_server(tmp_path):
    """ICMLORA_TRACKING=offline: a server nobody answers at is not checked (the stage would exit 2);
    everything waits in the spool, with no secret in it, for `icmlora tracking sync`."""
    uri = "http://alice:s3cret-pw@127.0.0.1:9/"  # nothing listens on port 9
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, ICMLORA_TRACKING="offline")
    done = subprocess.run([sys.executable, "-c", OFFLINE_STAGE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "5 record(s) not sent (offline tracking" in done.stderr
    (path,) = (tmp_path / "state" / "tracking").glob("*.jsonl")
    text = path.read_text()
    assert "s3cret-pw" not in text and "alice" not in text
    assert json.loads(text.splitlines()[0])["uri"] == "http://127.0.0.1:9/"
    assert [r["op"] for r in _records(path)] == ["create_run", "close_orphans", "log", "log", "end"]
    status = subprocess.run([sys.executable, "-m", "icmlora", "tracking", "status"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert "5 record(s) wait in 1 spool(s)" in status.stdout, status.stdout + status.stderr


def test_a_uri_keeps_no_credentials():
    assert spool.public_uri("https://bob:pw@mlflow.example.com:8443/x") == "https://mlflow.example.com:8443/x"
    assert spool.public_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_a_sync_leaves_a_live_process_spool_and_another_store_spool_alone(tmp_path):
    """A spool whose process still runs is its own to send (its lock is held); a spool of another
    store waits for that store."""
    folder = tmp_path / "spools"
    here = tracking.tracking_uri()
    live = spool.Tracker(here, tracking.EXPERIMENT, "train_lora", folder, send=False)
    run = live.create_run("circle-top-r1-s0", {"stage": "train_lora"})
    live.end(run)
    other = spool.Tracker("sqlite:////nonexistent/other.db", tracking.EXPERIMENT, "evaluate", folder, send=False)
    other.create_run("x", {})
    other._lock_cm.__exit__(None, None, None)  # its process has ended
    assert spool.sync(folder, here) == (0, 2, [], 1)  # neither sent: one is live, the other is another store's
    live._lock_cm.__exit__(None, None, None)
    assert spool.sync(folder, here) == (2, 0, [], 0)
    assert [s.header()["uri"] for s in spool.spools(folder)] == ["sqlite:////nonexistent/other.db"]


def test_artifacts_keep_their_names_in_the_store(tmp_path):
    """A file and a folder logged through the spool arrive under their own names (the spool keeps its
    copies apart by number, in folders); a table is an artifact named as given, listed as a table."""
    import pandas as pd

    (tmp_path / "verdicts.txt").write_text("rank 4: better\n")
    (tmp_path / "generator").mkdir()
    (tmp_path / "generator" / "config.json").write_text("{}")
    with tracking.start_run("report", "summary") as run:
        run.log_artifact(tmp_path / "verdicts.txt")
        run.log_artifact(tmp_path / "verdicts.txt", artifact_path="plots")
        run.log_artifacts(tmp_path / "generator", artifact_path="generator")
        run.log_table(pd.DataFrame({"a": [1]}), artifact_file="comparison.json")
    tracking.finish()
    run_id = tracking.store_run_id(run.run_id)
    client = mlflow.MlflowClient()
    names = sorted(f.path for f in client.list_artifacts(run_id)) + sorted(
        f.path for d in ("plots", "generator") for f in client.list_artifacts(run_id, d))
    assert names == ["comparison.json", "generator", "plots", "verdicts.txt", "generator/config.json", "plots/verdicts.txt"]
    assert json.loads(mlflow.get_run(run_id).data.tags["mlflow.loggedArtifacts"]) == [{"path": "comparison.json", "type": "table"}]
