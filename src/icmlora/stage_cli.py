"""The command line of one stage: the argparse pattern every stage's ``main`` uses, and how a
stage runs as a program (``python -m icmlora.stages.<stage>`` or ``icmlora <stage>``).

    parser = stage_parser("train_lora", __doc__)
    parser.add_argument("--task", required=True)
    args, cfg = parser.parse(argv)        # params.yaml validated here, before any work

Bad input a user can fix (``InputError``) prints every problem and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from icmlora.config import PARAMS_FILE, Params, load_params
from icmlora.errors import InputError

EXIT_BAD_INPUT = 2


class StageParser(argparse.ArgumentParser):
    def parse(self, argv: list[str] | None = None) -> tuple[argparse.Namespace, Params]:
        """(arguments, validated params.yaml)."""
        args = self.parse_args(argv)
        return args, load_params(args.params)


def require(value, allowed, flag: str, key: str) -> None:
    """Refuse a command-line value the pipeline never builds (a rank outside lora.ranks, ...)."""
    if value not in allowed:
        raise InputError(f"{flag} {value!r} is not in {key} ({', '.join(map(str, allowed))}): the pipeline never builds "
                         f"it, so nothing downstream would use it; add it to {key} in params.yaml, then `dvc repro`")


def stage_parser(stage: str, doc: str | None) -> StageParser:
    parser = StageParser(prog=f"icmlora {stage}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help=f"parameters file (default: {PARAMS_FILE})")
    return parser


def configure_process() -> None:
    """Warnings and logging as a stage shows them; worker processes a stage spawns call it too."""
    # peft calls a transformers API that transformers marks deprecated: noise for our users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.basicConfig(level=os.environ.get("ICMLORA_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")


def run_stage(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a stage's ``main`` as a program; exits unless called with ``argv`` (then returns the status)."""
    as_program = argv is None
    configure_process()
    from icmlora.kernels import apply_threads

    apply_threads()  # the pinned thread count (workers: icmlora.workers.worker_threads)
    # Run with -m, the module is __main__; its spec still has the real name.
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
    stage = (spec.name if spec else main.__module__).rsplit(".", 1)[-1]
    try:
        main(sys.argv[1:] if as_program else argv)
        status = 0
    except InputError as exc:
        print(f"icmlora {stage}: error: {exc}", file=sys.stderr)
        status = EXIT_BAD_INPUT
    finally:
        if "icmlora.tracking" in sys.modules:  # what the stage logged: sent, or spooled with one warning
            sys.modules["icmlora.tracking"].finish()
    if as_program:
        raise SystemExit(status)
    return status
