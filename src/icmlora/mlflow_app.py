"""``mlflow server --app-name icmlora`` (what ``make mlflow`` runs): MLflow's own server, opening on the
pipeline's runs table.

MLflow 3's UI opens an experiment on its GenAI overview (usage, traces, tool calls: all empty for a
training pipeline), whatever the experiment's kind tag, and keeps that choice in the browser's
localStorage: a newcomer who opens the server's home page and clicks `icmlora` sees no run. This app
answers a request for ``/`` with a redirect to the runs table of the pipeline's experiment
(``#/experiments/<id>/runs``, a route of MLflow's UI), once: the page it redirects to carries
``?runs_table=1`` so it is served as usual. Everything else is MLflow's server unchanged
(registered as the ``icmlora`` entry of the ``mlflow.app`` group in pyproject.toml).
"""

from __future__ import annotations

import os

LANDED = "runs_table"


def _experiment_id() -> str | None:
    from mlflow.server.handlers import _get_tracking_store

    from icmlora.tracking import EXPERIMENT

    experiment = _get_tracking_store().get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
    return experiment.experiment_id if experiment is not None else None


def create_app(app=None):
    """MLflow's Flask app with the landing redirect (under uvicorn, MLflow's FastAPI app around it)."""
    from flask import redirect, request
    from mlflow.server import app as mlflow_app

    app = app or mlflow_app

    prefix = os.environ.get("_MLFLOW_STATIC_PREFIX", "").rstrip("/")  # mlflow server --static-prefix

    @app.before_request
    def _land_on_the_runs_table():
        if request.path in ("/", f"{prefix}/") and LANDED not in request.args:
            try:
                found = _experiment_id()
            except Exception:  # noqa: BLE001 - the store's trouble is MLflow's own page to show, not a 500 here
                found = None
            if found is not None:  # a store the pipeline never logged to: MLflow's own home page
                return redirect(f"{prefix}/?{LANDED}=1#/experiments/{found}/runs")
        return None

    if os.environ.get("_MLFLOW_SGI_NAME") == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app
