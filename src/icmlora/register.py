"""`icmlora register`: the generated and the trained adapter of each task and rank as MLflow
registered models a colleague loads or serves without this repository (a command, not a stage).

    icmlora register                                  # every task and rank of params.yaml
    icmlora register --task circle --rank 4
    icmlora register --tracking-uri http://127.0.0.1:5000

Per task and rank, one registered model ``icmlora-<task>-r<rank>`` gets two new versions: the
generated adapter decoded from z = 0 (models/generated/<task>-r<rank>/sample-z0, alias
``generated``) and the trained one (models/lora/<task>-s<seed>/r<rank>/final, alias ``trained``).
Each version is a pyfunc model (``icmlora.serving``: base64 images in, scored boxes out, exactly
as `icmlora score` predicts them) carrying models/base and the adapter folder as artifacts, logged
from an MLflow run tagged stage=register. Versions are tagged with the source, task, rank, git
commit and, from dvc.lock, the md5 of the DVC outputs they were copied from. Registering again adds
versions and moves the aliases to them. The registry is the tracking URI's: the repository's
mlflow.db, ``MLFLOW_TRACKING_URI`` or ``--tracking-uri``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

from icmlora.artifacts import (
    BASE_MODEL_DIR,
    GENERATED_DIR,
    LORA_DIR,
    Z0_SAMPLE,
    final_adapter_dir,
    generated_dir,
    sample_dir,
)
from icmlora.artifacts.adapters import CONFIG_FILE as ADAPTER_CONFIG
from icmlora.config import Params
from icmlora.errors import InputError
from icmlora.stage_cli import require, run_stage, stage_parser
from icmlora.tracking import git_commit, store_run, tracking_uri

SOURCES = ("generated", "trained")  # the aliases, one per source
# What the served code imports (icmlora itself travels as the model's code): pinned as installed.
SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors",
                        "pillow", "pandas", "numpy", "pydantic", "tqdm")
SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")
DVC_LOCK = Path("dvc.lock")


def registered_model_name(task: str, rank: int) -> str:
    return f"icmlora-{task}-r{rank}"


def adapter_folders(task: str, rank: int, seed: int, generated_root: Path = GENERATED_DIR,
                    lora_root: Path = LORA_DIR) -> dict[str, tuple[Path, str]]:
    """{source: (adapter folder, the `dvc repro` target that writes it)}."""
    return {"generated": (sample_dir(generated_dir(task, rank, generated_root), Z0_SAMPLE), "generate"),
            "trained": (final_adapter_dir(task, rank, seed, lora_root),
                        f"train_lora@{task}-{seed}")}  # DVC names a matrix item by its values


def check_inputs(base_dir: Path, folders: dict) -> None:
    """Every folder a registration copies is there, or one error naming each missing one and its stage."""
    problems = []
    if not (Path(base_dir) / "config.json").is_file():
        problems.append(f"{base_dir}: no base model here (config.json missing); `dvc repro base_model` writes it "
                        "(or `dvc pull` fetches it)")
    for (task, rank, source), (folder, stage) in folders.items():
        if not (folder / ADAPTER_CONFIG).is_file():
            problems.append(f"{folder}: no {source} adapter of {task!r} at rank {rank} ({ADAPTER_CONFIG} missing); "
                            f"`dvc repro {stage}` writes it (or `dvc pull` fetches it)")
    if problems:
        raise InputError("nothing registered: adapters missing", problems)


def dvc_output_md5(path: Path, lock: Path = DVC_LOCK) -> tuple[str, str] | None:
    """(output path, md5) of the DVC output holding ``path``, as dvc.lock records it; None without one."""
    from ruamel.yaml import YAML

    if not lock.is_file() or Path(path).is_absolute():
        return None
    wanted = Path(path).as_posix()
    for stage in (YAML(typ="safe", pure=True).load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if wanted == out["path"] or wanted.startswith(out["path"].rstrip("/") + "/"):
                return out["path"], out.get("md5", "")
    return None


def _requirements() -> list[str]:
    out = []
    for dist in SERVING_REQUIREMENTS:
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            out.append(dist)
    return out


@contextlib.contextmanager
def _tracking_uri(uri: str | None) -> Iterator[str]:
    """``uri`` as MLFLOW_TRACKING_URI for the duration (tracking.py reads it there), else the default."""
    if uri is None:
        yield tracking_uri()
        return
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def register_adapter(cfg: Params, task: str, rank: int, source: str, adapter: Path, base_dir: Path,
                     extra_tags: dict[str, str]) -> str:
    """Log one adapter as a pyfunc model, register it as a new version of the task and rank's model
    and point the source's alias at it; returns the version."""
    import icmlora

    name = registered_model_name(task, rank)
    tags = {"source": source, "task": task, "rank": str(rank), "adapter": adapter.as_posix(),
            "base_model": Path(base_dir).as_posix(), "git_commit": git_commit(), **extra_tags}
    for key, path in (("base_model", base_dir), ("adapter", adapter)):
        found = dvc_output_md5(path)
        if found:
            tags[f"dvc.{key}.out"], tags[f"dvc.{key}.md5"] = found
    with store_run("register", f"register-{name}-{source}", params={"predict": cfg.predict}, source=source,
                   task=task, rank=rank, registered_model=name) as mlflow:
        from icmlora.serving import signature

        with warnings.catch_warnings():
            # The signature is given; an input example would load and run the model at logging
            # time (minutes for a real base model, per version), and type hints add nothing to it.
            warnings.filterwarnings("ignore", message=".*(input_example|type hints).*", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="adapter-detector", python_model=str(SERVED_MODEL_CODE),
                artifacts={"base_model": str(base_dir), "adapter": str(adapter)},
                model_config={"predict": cfg.predict.model_dump()},
                code_paths=[str(Path(icmlora.__file__).parent)],
                pip_requirements=_requirements(), signature=signature(), registered_model_name=name)
        client = mlflow.MlflowClient()
        model_version = str(info.registered_model_version)
        for key, value in tags.items():
            client.set_model_version_tag(name, model_version, key, value)
        client.set_registered_model_alias(name, source, model_version)
        client.set_registered_model_tag(name, "task", task)
        client.set_registered_model_tag(name, "rank", str(rank))
        client.update_registered_model(
            name, description=f"ICM-LoRA Florence-2 detection for task {task!r} at LoRA rank {rank} over "
                              f"{Path(base_dir).as_posix()}: alias `generated` = the CVAE's adapter from z = 0, "
                              "`trained` = the trained LoRA. Input: DataFrame column `image` of base64 image files; "
                              "output: one row per box (image, label, score, x0, y0, x1, y1).")
    return model_version


def register(cfg: Params, tasks: list[str], ranks: list[int], seed: int, base_dir: Path = BASE_MODEL_DIR,
             generated_root: Path = GENERATED_DIR, lora_root: Path = LORA_DIR) -> dict[str, dict[str, str]]:
    """Register both sources of every (task, rank); returns {model name: {alias: version}}."""
    folders = {(task, rank, source): found for task in tasks for rank in ranks
               for source, found in adapter_folders(task, rank, seed, generated_root, lora_root).items()}
    check_inputs(base_dir, folders)
    out: dict[str, dict[str, str]] = {}
    for (task, rank, source), (folder, _) in folders.items():
        extra = {"sample": Z0_SAMPLE} if source == "generated" else {"seed": str(seed)}
        out.setdefault(registered_model_name(task, rank), {})[source] = register_adapter(
            cfg, task, rank, source, folder, base_dir, extra)
        print(f"registered {registered_model_name(task, rank)}@{source}: version "
              f"{out[registered_model_name(task, rank)][source]} ({folder})")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("register", __doc__)
    parser.add_argument("--task", action="append", help="a task of data.tasks (repeatable; default: every task)")
    parser.add_argument("--rank", type=int, action="append", help="a rank of lora.ranks (repeatable; default: every rank)")
    parser.add_argument("--seed", type=int, help="the trained adapter's seed, one of lora.seeds (default: the first)")
    parser.add_argument("--tracking-uri", help="MLflow tracking (and registry) URI (default: MLFLOW_TRACKING_URI, "
                                               "else sqlite:///<repo>/mlflow.db)")
    args, cfg = parser.parse(argv)
    for task in args.task or []:
        require(task, cfg.data.tasks, "--task", "data.tasks")
    for rank in args.rank or []:
        require(rank, cfg.lora.ranks, "--rank", "lora.ranks")
    seed = cfg.lora.seeds[0] if args.seed is None else args.seed
    require(seed, cfg.lora.seeds, "--seed", "lora.seeds")
    with _tracking_uri(args.tracking_uri) as uri:
        done = register(cfg, args.task or list(cfg.data.tasks), args.rank or list(cfg.lora.ranks), seed)
    print(f"registered {len(done)} model(s) in {uri}: " + ", ".join(f"models:/{n}@{{generated,trained}}" for n in done))
    return done


if __name__ == "__main__":
    run_stage(main)
