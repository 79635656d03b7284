"""`icmlora register`: adapters as MLflow registered models that predict the boxes `icmlora score` predicts.

The boxer (conftest) is the base: it writes known boxes, so the boxes compared are not empty. Its
generated and trained adapters are small, different perturbations of a LoRA over it (each changes
the scores, neither removes the boxes), so a model that served the base alone, or the other
alias's adapter, would predict other boxes.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from e2e_helpers import BIN, free_port
from params_helpers import micro_params

from icmlora.cli import main as cli

TASK, RANK = "circle", 2
NAME = f"icmlora-{TASK}-r{RANK}"


def write_adapters(boxer, cfg) -> dict[str, Path]:
    """models/base (the boxer) and, under the working directory's data-contract paths, the task and
    rank's generated (z = 0) and trained adapters; returns {alias: adapter folder}."""
    from peft import get_peft_model

    from icmlora.artifacts import Z0_SAMPLE, final_adapter_dir, generated_dir, sample_dir
    from icmlora.artifacts.base_model import write_base_model
    from icmlora.lora import peft_config

    write_base_model(boxer.model, boxer.processor, Path("models/base"))
    folders = {"generated": sample_dir(generated_dir(TASK, RANK), Z0_SAMPLE),
               "trained": final_adapter_dir(TASK, RANK, cfg.lora.seeds[0])}
    for i, folder in enumerate(folders.values()):
        lora = get_peft_model(copy.deepcopy(boxer.model), peft_config(cfg.lora, RANK))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.002, generator=torch.Generator().manual_seed(len(name) + 100 * i))
        lora.save_pretrained(folder)
    return folders


def score_path_boxes(annotations: Path, adapter: Path | None, monkeypatch) -> list[list[tuple]]:
    """The boxes `icmlora score` predicts on ``annotations`` with ``adapter`` (None: the base alone),
    caught where it scores them (Scorer.predictions), as (label, score, x0, y0, x1, y1) per image."""
    from icmlora.scoring import Scorer

    caught = []
    real = Scorer.predictions

    def spy(self, *args, **kwargs):
        caught.append(real(self, *args, **kwargs))
        return caught[-1]

    with monkeypatch.context() as m:
        m.setattr(Scorer, "predictions", spy)
        argv = ["score", "--annotations", str(annotations), "--base", "models/base"]
        assert cli(argv + (["--adapter", str(adapter)] if adapter else [])) == 0
    assert len(caught) == 1
    return [[(b.label, b.score, b.x1, b.y1, b.x2, b.y2) for b in boxes] for boxes in caught[0]]


@pytest.fixture
def registered(boxer, tmp_path, monkeypatch) -> dict:
    """The boxer's adapters on disk, the boxes the score path predicts with each, and the images."""
    cfg = micro_params(**{"predict.max_new_tokens": 14})
    monkeypatch.setattr("icmlora.stage_cli.load_params", lambda _: cfg)
    folders = write_adapters(boxer, cfg)
    annotations = boxer.dataset(tmp_path / "task")
    expected = {alias: score_path_boxes(annotations, folder, monkeypatch) for alias, folder in folders.items()}
    base = score_path_boxes(annotations, None, monkeypatch)
    # Non-empty, and each adapter's boxes are its own: neither the base's nor the other adapter's.
    assert all(sum(map(len, boxes)) >= 3 for boxes in expected.values()), expected
    assert expected["generated"] != base and expected["trained"] != base
    assert expected["generated"] != expected["trained"]
    images = sorted(annotations.parent.glob("*.png"), key=lambda p: int(p.stem))
    return {"cfg": cfg, "folders": folders, "expected": expected, "images": images}


@pytest.mark.slow
def test_registered_models_predict_the_boxes_of_the_score_path(registered, tmp_path, capsys):
    """Both aliases of icmlora-<task>-r<rank> in a throw-away SQLite store load with
    mlflow.pyfunc.load_model and predict, for the same images, the boxes `icmlora score` predicts
    with the same adapter; the versions carry their tags."""
    import mlflow

    from icmlora.serving import frame_boxes, images_frame

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    assert cli(["register", "--task", TASK, "--rank", str(RANK), "--tracking-uri", uri]) == 0
    assert f"{NAME}@generated" in capsys.readouterr().out
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    frame = images_frame(registered["images"])
    for alias, expected in registered["expected"].items():
        version = client.get_model_version_by_alias(NAME, alias)
        assert {k: version.tags[k] for k in ("source", "task", "rank")} == {"source": alias, "task": TASK,
                                                                              "rank": str(RANK)}
        assert version.tags["adapter"] == registered["folders"][alias].as_posix() and "git_commit" in version.tags
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@{alias}")
        got = frame_boxes(model.predict(frame), len(registered["images"]))
        assert got == expected, alias
    assert sorted(client.get_registered_model(NAME).aliases) == ["generated", "trained"]
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'register'", output_format="list")
    assert sorted(r.data.tags["source"] for r in runs) == ["generated", "trained"]


@pytest.mark.parametrize("argv, message", [
    (["--task", "dog"], "--task 'dog' is not in data.tasks"),
    (["--rank", "3"], "--rank 3 is not in lora.ranks (1, 2)"),
    (["--seed", "5"], "--seed 5 is not in lora.seeds"),
])
def test_register_refuses_what_the_pipeline_never_builds(monkeypatch, capsys, argv, message):
    monkeypatch.setattr("icmlora.stage_cli.load_params", lambda _: micro_params())
    assert cli(["register", *argv]) == 2
    assert message in capsys.readouterr().err


def test_register_names_each_missing_folder_and_the_stage_that_writes_it(tmp_path, monkeypatch, capsys):
    """Nothing is registered when a folder is missing: one error lists every missing one."""
    import mlflow

    monkeypatch.setattr("icmlora.stage_cli.load_params", lambda _: micro_params())
    (tmp_path / "models" / "generated" / "square-r1" / "sample-z0").mkdir(parents=True)  # a folder without an adapter
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    assert cli(["register", "--task", "square", "--rank", "1", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "models/base: no base model here" in err and "`dvc repro base_model`" in err
    assert "models/generated/square-r1/sample-z0: no generated adapter" in err and "`dvc repro generate`" in err
    assert "models/lora/square-s0/r1/final: no trained adapter" in err and "`dvc repro train_lora@square-0`" in err
    mlflow.set_tracking_uri(uri)
    assert mlflow.MlflowClient().search_registered_models() == []


def test_versions_name_the_dvc_outputs_they_come_from(tmp_path):
    """The md5 dvc.lock records for the output holding a folder (the folder itself or a parent)."""
    from icmlora.register import dvc_output_md5

    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  base_model:\n    outs:\n    - path: models/base\n      md5: aa.dir\n"
                    "  generate:\n    outs:\n    - path: models/generated\n      md5: bb.dir\n")
    assert dvc_output_md5(Path("models/base"), lock) == ("models/base", "aa.dir")
    assert dvc_output_md5(Path("models/generated/circle-r2/sample-z0"), lock) == ("models/generated", "bb.dir")
    assert dvc_output_md5(Path("models/generated-old/x"), lock) is None
    assert dvc_output_md5(tmp_path / "models" / "base", lock) is None  # a path outside the repository's layout
    assert dvc_output_md5(Path("models/base"), tmp_path / "missing.lock") is None


def test_the_input_must_be_base64_image_files():
    import pandas as pd

    from icmlora.serving import decode_images

    with pytest.raises(ValueError, match="a column 'image'"):
        decode_images(pd.DataFrame({"path": ["a.png"]}))
    with pytest.raises(ValueError, match="input row 0: column 'image' is not a base64-encoded image"):
        decode_images(pd.DataFrame({"image": ["bm90IGFuIGltYWdl"]}))  # base64 of "not an image"


# --- served over REST (make test-long) ----------------------------------------------------------

def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited ({proc.returncode}):\n{log.read_text()[-4000:]}", pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"no answer from {url} in {timeout:.0f} s:\n{log.read_text()[-4000:]}", pytrace=False)
            time.sleep(0.5)


@pytest.fixture
def background(request, tmp_path):
    """Starts a server command in its own process group; every one is stopped at the end, whatever happens."""
    started: list[tuple[subprocess.Popen, object]] = []

    def start(cmd: list[str], health: str, name: str, env: dict) -> None:
        log_path = tmp_path / f"{name}.log"
        log = log_path.open("w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append((proc, log))
        _wait_http(health, proc, log_path)

    def stop() -> None:
        for proc, log in reversed(started):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()

    request.addfinalizer(stop)
    return start


@pytest.mark.slow
@pytest.mark.long
def test_a_registered_adapter_served_over_rest_answers_the_score_paths_boxes(registered, background, tmp_path, capsys):
    """Registered through an `mlflow server` (the registry behind a tracking URI), then
    `mlflow models serve -m models:/<name>@generated --env-manager local` on 127.0.0.1: a POST to
    /invocations with the images as base64 answers the boxes the score path predicts."""
    from icmlora.serving import frame_boxes, images_frame

    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    tracking_port, serve_port = free_port(), free_port()
    server = f"http://127.0.0.1:{tracking_port}"
    background([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(tracking_port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                "--artifacts-destination", str(tmp_path / "server-artifacts")], f"{server}/health", "mlflow-server", env)
    assert cli(["register", "--task", TASK, "--rank", str(RANK), "--tracking-uri", server]) == 0
    capsys.readouterr()
    assert not Path("mlflow-artifacts").exists()  # the artifacts went to the server

    serve_env = dict(env, MLFLOW_TRACKING_URI=server)
    background([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@generated", "--env-manager", "local",
                "--host", "127.0.0.1", "--port", str(serve_port)], f"http://127.0.0.1:{serve_port}/ping", "serve",
               serve_env)
    frame = images_frame(registered["images"])
    body = {"dataframe_split": frame.to_dict(orient="split", index=False)}
    request = urllib.request.Request(f"http://127.0.0.1:{serve_port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        answer = json.loads(resp.read())
    got = frame_boxes(answer["predictions"], len(registered["images"]))
    assert got == registered["expected"]["generated"]
