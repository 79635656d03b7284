"""Stage `few_shot`: the held-out baseline ``few_shot_lora``, a LoRA trained on a held-out task's k
support examples only (``icmlora.few_shot``): what a user with those examples would try instead of
generating an adapter from them.

    python -m icmlora.stages.few_shot       # or: icmlora few_shot

For every held-out task and every rank of ``lora.ranks``: the same k examples the task vector
reads (the first ``task_vectors.examples`` of the task's train split), a LoRA of the pipeline's
kind, its lr and step count chosen by k-fold over those examples (``few_shot``), never looking at
the valid split that ``evaluate`` scores every baseline on. One process (on a GPU when there is
one): the runs are seconds each.

Writes models/few_shot/<task>-r<rank>/ (PEFT folders), metrics/few_shot.json (per task and rank:
the support examples, the chosen lr and steps, every candidate's cross-validated mAP50) and
metrics/timing/few_shot.json (the stage's seconds; per adapter the seconds of choosing, its share of
its task's, whose ranks are chosen together, and of training the chosen one alone). One MLflow run per
adapter, tagged task, rank and source ``few_shot_lora``.
"""

from __future__ import annotations

import time
from pathlib import Path

from icmlora.artifacts import (
    BASE_MODEL_DIR,
    FEW_SHOT_DIR,
    FEW_SHOT_METRICS,
    PREPARED_DIR,
    few_shot_dir,
    timing_file,
)
from icmlora.artifacts.adapters import save_adapter
from icmlora.artifacts.base_model import read_base_model
from icmlora.config import Params
from icmlora.few_shot import candidate, select_and_fit
from icmlora.files import atomic_dir, write_json
from icmlora.lora import peft_config
from icmlora.runtime import make_accelerator
from icmlora.stage_cli import run_stage, stage_parser
from icmlora.tracking import stage_params, start_run


def few_shot(cfg: Params, prepared: Path = PREPARED_DIR, base_dir: Path = BASE_MODEL_DIR, out_root: Path = FEW_SHOT_DIR,
             out_json: Path = FEW_SHOT_METRICS, timing: Path = timing_file("few_shot")) -> dict:
    from peft import get_peft_model, set_peft_model_state_dict

    start = time.perf_counter()
    base, processor = read_base_model(base_dir)
    accelerator = make_accelerator(cfg.runtime)
    # The pipeline's LoRAs all start from one Gaussian A (train_lora: seed + 7919 * lora seed): so do these.
    seed = cfg.seed + 7919 * cfg.few_shot.seed
    records: dict = {}
    seconds: dict = {}
    with atomic_dir(out_root) as tmp:  # replaced whole: no adapter of a task no longer held out
        for task in cfg.heldout_tasks:
            chosen, base = select_and_fit(base, processor, task, list(cfg.lora.ranks), cfg.lora, cfg.few_shot,
                                          cfg.runtime, cfg.predict, cfg.task_vectors.examples, seed, accelerator,
                                          prepared)
            for rank in cfg.lora.ranks:
                weights, record, secs = chosen[rank]
                with start_run("few_shot", f"{task}-r{rank}-few_shot", params=stage_params(cfg, "few_shot"),
                               task=task, rank=rank, source="few_shot_lora") as run:
                    model = get_peft_model(base, peft_config(cfg.lora, rank))
                    set_peft_model_state_dict(model, weights)
                    save_adapter(model, few_shot_dir(task, rank, tmp))
                    base = model.unload()
                    run.log_params({"chosen_lr": record["lr"], "chosen_steps": record["steps"]})
                    cv = record["cv_map50"][candidate(record["lr"], record["steps"])]
                    run.log_metrics({**secs, "cv_map50": cv})
                records.setdefault(task, {})[f"r{rank}"] = record
                seconds.setdefault(task, {})[f"r{rank}"] = secs
                print(f"few_shot: {task} r{rank}: lr {record['lr']:g}, {record['steps']} steps (cross-validated mAP50 "
                      f"{cv:.3f}; chosen in "
                      f"{secs['select_seconds']:.0f} s, its share of the task's, trained in {secs['train_seconds']:.1f} s)")
    write_json(out_json, {"support_examples": cfg.task_vectors.examples, "folds": cfg.few_shot.folds, "tasks": records})
    write_json(timing, {"seconds": round(time.perf_counter() - start, 2), "adapters": seconds})
    return records


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("few_shot", __doc__)
    args, cfg = parser.parse(argv)
    records = few_shot(cfg)
    print(f"few_shot: wrote {FEW_SHOT_DIR} ({sum(len(r) for r in records.values())} adapters) and {FEW_SHOT_METRICS}")
    return records


if __name__ == "__main__":
    run_stage(main)
