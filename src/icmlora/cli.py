"""One command line: ``icmlora <stage> [options]`` (or ``python -m icmlora <stage>``).

Each stage is a module with a plain ``main(argv)``; this file only maps names to modules,
imported lazily so ``icmlora --help`` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

from icmlora.errors import InputError

STAGES = {
    "prepare": ("icmlora.data.prepare", "build per-task detection datasets (Florence JSONL)"),
    "base_model": ("icmlora.base_model", "build + pre-train the tiny Florence-2, or materialize a real one"),
    "train_lora": ("icmlora.lora.train", "train one LoRA (task, rank, seed) and keep its checkpoint trajectory"),
    "collect_params": ("icmlora.params", "flatten + normalize every checkpoint of one rank into one tensor file"),
    "task_vectors": ("icmlora.task_vectors", "one vector per task from the model's hidden states"),
    "train_cvae": ("icmlora.cvae.train", "train one generator (CVAE) per rank over the training tasks' adapters"),
    "generate": ("icmlora.cvae.generate", "sample PEFT adapters for every task, or for a new task vector/examples"),
    "evaluate": ("icmlora.evaluation.evaluate", "detection metrics of base, trained, generated and baseline adapters"),
    "report": ("icmlora.evaluation.report", "summary metrics, plots and the MLflow summary run"),
    "profile": ("icmlora.profile", "merge a params profile (profiles/*.yaml) into params.yaml"),
}

EXIT_BAD_INPUT = 2


def _usage() -> str:
    width = max(len(n) for n in STAGES)
    lines = ["usage: icmlora <stage> [options]    (icmlora <stage> --help for a stage's options)", "", "stages:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"icmlora: unknown stage {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # peft calls a transformers API that transformers marks deprecated: noise for our users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.basicConfig(level=os.environ.get("ICMLORA_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(STAGES[name][0])
    try:
        module.main(rest)
    except InputError as exc:
        print(f"icmlora {name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
