"""`icmlora score`: the detection metrics of the base model, alone or with one adapter, on a
Florence JSONL file (a command, not a stage).

    icmlora score --annotations my_task/valid.jsonl --adapter models/generated/circle-r4/sample-z0
    icmlora score --annotations data/prepared/circle/valid/annotations.jsonl     # the base model alone
    icmlora score --annotations my_task/valid.jsonl --adapter adapters/my_task/sample-z0 --out score.json --mlflow

Scores exactly as the pipeline does (``icmlora.scoring``: batched <OD> prediction with
``predict`` from params.yaml, strict labels, COCO mAPs and P/R/F1 at IoU 0.5). Prints the
metrics as JSON, writes them to ``--out``, and with ``--mlflow`` logs a run tagged
stage=score, source=adapter. The adapter is any PEFT folder over models/base: trained
(models/lora/<task>-s<seed>/r<rank>/final), generated, or your own.
"""

from __future__ import annotations

import json
from pathlib import Path

from icmlora.artifacts import BASE_MODEL_DIR
from icmlora.artifacts.adapters import CONFIG_FILE as ADAPTER_CONFIG
from icmlora.artifacts.base_model import read_base_model
from icmlora.errors import InputError
from icmlora.files import write_json
from icmlora.scoring import Scorer
from icmlora.stage_cli import run_stage, stage_parser
from icmlora.tracking import start_run


def score(cfg, annotations: Path, adapter: Path | None = None, base_dir: Path = BASE_MODEL_DIR,
          eval_images: int = 0) -> dict:
    model, processor = read_base_model(base_dir)
    if adapter is not None:
        from peft import PeftModel

        if not (adapter / ADAPTER_CONFIG).is_file():
            raise InputError(f"{adapter}: not a PEFT adapter folder ({ADAPTER_CONFIG} missing)")
        model = PeftModel.from_pretrained(model, adapter)
    scorer = Scorer(model.eval(), processor, cfg.predict, eval_images)
    return scorer.score(annotations, desc=f"score {annotations.name}")


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("score", __doc__)
    parser.add_argument("--annotations", type=Path, required=True, help="Florence JSONL (image, prefix, suffix)")
    parser.add_argument("--adapter", type=Path, help="a PEFT adapter folder (default: none, the base model alone)")
    parser.add_argument("--base", type=Path, default=BASE_MODEL_DIR, help=f"base model folder (default {BASE_MODEL_DIR})")
    parser.add_argument("--images", type=int, default=0, help="score the first N examples (default 0: all)")
    parser.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    parser.add_argument("--mlflow", action="store_true", help="log an MLflow run (stage=score) with the metrics")
    args, cfg = parser.parse(argv)
    metrics = score(cfg, args.annotations, args.adapter, args.base, args.images)
    if args.out:
        write_json(args.out, metrics)
    if args.mlflow:
        with start_run("score", f"score-{args.annotations.stem}", params={"predict": cfg.predict}, source="adapter",
                       adapter=str(args.adapter or "none"), annotations=str(args.annotations)) as mlflow:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    run_stage(main)
