"""One command line: ``icmlora <stage> [options]`` (or ``python -m icmlora <stage>``).

Each stage is the module ``icmlora.stages.<stage>``, named exactly as its dvc.yaml stage, with
a plain ``main(argv)``; this file only lists them, imported lazily so ``icmlora --help`` stays
fast. dvc.yaml runs the modules directly (``python -m icmlora.stages.<stage>``), so a change
here re-runs no stage.
"""

from __future__ import annotations

import importlib
import sys

from icmlora.kernels import pin
from icmlora.stage_cli import EXIT_BAD_INPUT, run_stage

COMMANDS = {
    "prepare": "build per-task detection datasets (Florence JSONL)",
    "base_model": "build + pre-train the tiny Florence-2, or materialize a real one",
    "train_lora": "train one LoRA (task, rank, seed) and keep its checkpoint trajectory",
    "collect_params": "flatten + normalize every checkpoint of one rank into one matrix",
    "task_vectors": "one vector per task from the model's hidden states",
    "train_cvae": "train one generator (CVAE) per rank over the training tasks' adapters",
    "generate": "sample PEFT adapters for every task, or for a new task vector/examples",
    "few_shot": "held-out baseline: a LoRA trained on a held-out task's k support examples only",
    "evaluate": "detection metrics of base, trained, generated and baseline adapters",
    "report": "summary metrics, plots and the MLflow summary run",
    "score": "detection metrics of the base model, alone or with an adapter, on a Florence JSONL (not a stage)",
    "register": "register the generated and trained adapters as servable MLflow models (not a stage)",
    "profile": "merge a params profile (profiles/*.yaml) into params.yaml (not a stage)",
    "tracking": "send the tracking records stages left waiting: `icmlora tracking sync` (not a stage)",
    "synth-voc": "write synthetic shapes as a PASCAL VOC2012 folder (not a stage)",
}
COMMANDS_OUTSIDE_STAGES = {"score": "icmlora.score", "register": "icmlora.register", "profile": "icmlora.profile",
                           "synth-voc": "icmlora.data.voc_writer", "tracking": "icmlora.tracking"}


def _module(name: str) -> str:
    return COMMANDS_OUTSIDE_STAGES.get(name, f"icmlora.stages.{name}")


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: icmlora <stage> [options]    (icmlora <stage> --help for a stage's options)", "", "stages:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, desc in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"icmlora: unknown stage {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    pin(rest)  # before the command's module imports torch (icmlora.kernels)
    return run_stage(importlib.import_module(_module(name)).main, rest)
