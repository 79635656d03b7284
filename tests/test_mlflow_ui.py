"""A newcomer's first look at MLflow, in a real browser: `make mlflow`'s server (`--app-name icmlora`)
opened in a fresh headless Chromium (an empty profile: MLflow 3 keeps its GenAI/training toggle in the
browser's localStorage) lands on the pipeline's runs table; MLflow's plain server, opened the same way,
does not (the home page, then the experiment's GenAI overview)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from e2e_helpers import free_port

from icmlora import tracking

pytestmark = [pytest.mark.slow, pytest.mark.long]
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and chromium is missing (apt-get install chromium; .ci/run does)", pytrace=False)
        pytest.skip("a real browser is needed: apt-get install chromium")
    return found


def _page_text(chromium: str, url: str, profile: Path) -> str:
    """The rendered page's text, as a fresh browser shows it after 20 s of (virtual) time."""
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store holding the pipeline's experiment and two evaluated adapters' runs."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(folder)
        for source in ("generated", "ridge"):
            with tracking.start_run("evaluate", f"circle-middle-r4-{source}", task="circle-middle", rank=4,
                                    source=source) as run:
                run.log_metrics({"map50": 0.5})
        tracking.finish()
    return folder / "mlflow.db"


@pytest.mark.parametrize("app", ["icmlora", None])
def test_a_fresh_browser_opens_on_the_pipelines_runs(store, tmp_path, app):
    chromium = _chromium()
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "server", *(["--app-name", app] if app else []), "--backend-store-uri",
               f"sqlite:///{store}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                time.sleep(1)
        home = _page_text(chromium, f"http://127.0.0.1:{port}/", tmp_path / "profile")
        if app is None:  # MLflow's own server: its home page, no run of the pipeline in sight
            assert "circle-middle-r4-generated" not in home
            experiment = _page_text(chromium, f"http://127.0.0.1:{port}/#/experiments/1", tmp_path / "profile2")
            assert "Overview" in experiment and "circle-middle-r4-generated" not in experiment  # the GenAI overview
            return
        assert home.lstrip().startswith("Runs - Experiment"), home[:300]
        assert "circle-middle-r4-generated" in home and "circle-middle-r4-ridge" in home
    finally:
        server.terminate()
        server.wait(timeout=60)
