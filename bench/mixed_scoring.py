"""Benchmark (not a test): scoring several adapters in one batch (PEFT's mixed-adapter batches,
``adapter_names``) against one adapter at a time, the way ``evaluate`` scores them (#36 item 4).

    .venv/bin/python bench/mixed_scoring.py                        # in a checkout reproduced up to train_lora
    .venv/bin/python bench/mixed_scoring.py --repo DIR --adapters 1 4 9 --batch-sizes 64 128 256

Reads a reproduced pipeline's outputs (``--repo``: models/base, models/lora, data/prepared, params.yaml),
with this checkout's code. For one task (``--task``, default the first of data.tasks) and one rank
(``--rank``, default 4), and for each K of ``--adapters``: the final adapters of the first K tasks (seed
``lora.seeds[0]``), scored on the task's valid images (the first ``--images``, default
``evaluate.eval_images``; 16 is what ``generate --select`` scores its N samples on) three ways:

- **one at a time**: ``Scorer.predictions`` per adapter, what ``evaluate`` does (the image features
  encoded once and kept, ``predict.batch_size`` images a ``generate`` call);
- **mixed**: the K adapters loaded under their own names into one PEFT model, their K x N rows in
  ``generate`` calls of B rows (``--batch-sizes``), each row through its own adapter (``adapter_names``).
  Rows go adapter by adapter, so a call holds one or two adapters: the order that favours mixing;
- **ceiling**: the same K x N rows in calls of B rows through one adapter: what a batch of B rows
  costs without the per-adapter split, so no mixed-adapter scheme can do better than it.

Each is timed per repeat (``--repeats``, the three interleaved), best kept. Mixed and one at a time
are compared per adapter: the mAP50 each gives, and how many images get the same boxes, scores
included. A call's float results depend on how many rows it holds, so rows batched differently may
differ in their last bits; first, one adapter through the mixed path in the Scorer's own batches
(predict.batch_size) must give every image's boxes identical, or the bench stops (the mixed path is
checked to score what the Scorer scores). Writes ``--out`` (metrics/mixed_scoring.json) under
``--label``, other labels kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import icmlora.stages  # noqa: E402,F401  (pins the CPU's kernels before torch is imported)
from icmlora.files import write_json  # noqa: E402


def mixed_predictions(model, processor, encoded, images, names: list[str], batch_size: int, predict_params,
                      *, mixed: bool = True) -> list[list]:
    """Boxes per (adapter, image), adapter by adapter: ``names[k]``'s rows through adapter ``names[k]``
    (``mixed``) or every row through the model's active adapter (the ceiling), ``batch_size`` rows a
    ``generate`` call, from ``encode_images``' batches (prompt tokens and image features)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from icmlora.florence.predict import TokenReader

    reader = TokenReader(processor.tokenizer)
    feats = torch.cat([e["image_features"] for e in encoded])
    ids = torch.cat([e["input_ids"] for e in encoded])
    mask = torch.cat([e["attention_mask"] for e in encoded])
    rows = [(k, j) for k in range(len(names)) for j in range(len(images))]
    out: list[list] = [[None] * len(images) for _ in names]
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            index = torch.tensor([j for _, j in chunk])
            extra = {"adapter_names": [names[k] for k, _ in chunk]} if mixed else {}
            gen = model.generate(input_ids=ids[index], attention_mask=mask[index],
                                 mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats[index])},
                                 max_new_tokens=predict_params.max_new_tokens, num_beams=1, do_sample=False,
                                 return_dict_in_generate=True, output_scores=True, **extra)
            logp = model.compute_transition_scores(gen.sequences, gen.scores, None, normalize_logits=True)
            for (k, j), seq, probs in zip(chunk, gen.sequences[:, 1:].tolist(), logp.float().exp().tolist()):
                out[k][j] = reader.boxes(seq, probs, images[j].width, images[j].height)
    return out


def measure(repo: Path, task: str | None, rank: int, counts: list[int], batch_sizes: list[int], repeats: int,
            images_scored: int | None = None) -> dict:
    from peft import get_peft_model, set_peft_model_state_dict

    from icmlora.artifacts import final_adapter_dir
    from icmlora.artifacts.adapters import read_adapter
    from icmlora.artifacts.base_model import read_base_model
    from icmlora.config import load_params
    from icmlora.lora import peft_config
    from icmlora.runtime import set_threads
    from icmlora.scoring import Scorer

    os.chdir(repo)  # the stages' paths are relative to the checkout
    cfg = load_params("params.yaml")
    set_threads(cfg.runtime)
    if cfg.predict.num_beams != 1:
        raise SystemExit(f"predict.num_beams is {cfg.predict.num_beams}: this bench scores greedy decoding only")
    task = task or cfg.data.tasks[0]
    if max(counts) > len(cfg.data.tasks):
        raise SystemExit(f"--adapters {max(counts)}: only {len(cfg.data.tasks)} tasks have trained adapters")
    seed = cfg.lora.seeds[0]
    base, processor = read_base_model(Path("models/base"))
    model = get_peft_model(base, peft_config(cfg.lora, rank)).eval()
    weights = [read_adapter(final_adapter_dir(t, rank, seed))[0] for t in cfg.data.tasks[: max(counts)]]
    names = ["default"] + [f"adapter{k}" for k in range(1, len(weights))]
    for k, w in enumerate(weights):
        if k:
            model.add_adapter(names[k], peft_config(cfg.lora, rank))
        set_peft_model_state_dict(model, w, adapter_name=names[k])
    scorer = Scorer(model, processor, cfg.predict, cfg.evaluate.eval_images if images_scored is None else images_scored)
    examples, images = scorer.valid_split(task)
    encoded = scorer.encoded(task)
    if encoded is None:
        raise SystemExit("the Scorer keeps no image features here (an adapter in the image path, or "
                         "predict.image_cache_mb too small): mixed batches would not be compared with what "
                         "evaluate does")
    # The mixed path must score what the Scorer scores: one adapter in the Scorer's batches, the same boxes.
    scorer.predictions(task, weights[0])
    set_peft_model_state_dict(model, weights[0], adapter_name="default")
    mixed_one = mixed_predictions(model, processor, encoded, images, names[:1], cfg.predict.batch_size, cfg.predict)
    alone = scorer.predictions(task, weights[0])
    differ = sum(m != a for m, a in zip(mixed_one[0], alone))
    if differ:
        raise SystemExit(f"one adapter in batches of predict.batch_size ({cfg.predict.batch_size}): the mixed path "
                         f"gave other boxes than the Scorer on {differ} of {len(images)} images; it does not score "
                         f"what evaluate scores, so its times mean nothing")
    results = []
    for count in counts:
        chosen = names[:count]
        one: dict = {}
        timings: dict = {"one_at_a_time": [], **{f"mixed_{b}": [] for b in batch_sizes},
                         **{f"ceiling_{b}": [] for b in batch_sizes}}
        mixed: dict = {}
        for _ in range(repeats):
            began = time.perf_counter()
            for k in range(count):  # what evaluate does: load this adapter's weights into the model, score
                one[k] = scorer.predictions(task, weights[k])
            timings["one_at_a_time"].append(time.perf_counter() - began)
            set_peft_model_state_dict(model, weights[0], adapter_name="default")  # the Scorer loaded over it
            for b in batch_sizes:
                began = time.perf_counter()
                mixed[b] = mixed_predictions(model, processor, encoded, images, chosen, b, cfg.predict)
                timings[f"mixed_{b}"].append(time.perf_counter() - began)
                began = time.perf_counter()
                mixed_predictions(model, processor, encoded, images, chosen, b, cfg.predict, mixed=False)
                timings[f"ceiling_{b}"].append(time.perf_counter() - began)
        best = {key: min(values) for key, values in timings.items()}
        row = {"adapters": count, "images": len(images), "seconds": {k: round(v, 4) for k, v in best.items()},
               "speedup_over_one_at_a_time": {k: round(best["one_at_a_time"] / v, 3) for k, v in best.items()
                                              if k != "one_at_a_time"}, "agreement": {}}
        for b in batch_sizes:
            same = sum(mixed[b][k][j] == one[k][j] for k in range(count) for j in range(len(images)))
            diffs = [abs(scorer.metrics(task, mixed[b][k])["map50"] - scorer.metrics(task, one[k])["map50"])
                     for k in range(count)]
            row["agreement"][f"mixed_{b}"] = {"identical_images": same, "rows": count * len(images),
                                              "map50_max_abs_diff": round(max(diffs), 6)}
        speedup = row["speedup_over_one_at_a_time"]
        print(f"K={count}: one at a time {best['one_at_a_time']:.2f} s; "
              + "; ".join(f"B={b}: mixed {best[f'mixed_{b}']:.2f} s ({speedup[f'mixed_{b}']:.2f}x), "
                          f"ceiling {best[f'ceiling_{b}']:.2f} s ({speedup[f'ceiling_{b}']:.2f}x)"
                          for b in batch_sizes), flush=True)
        results.append(row)
    import torch
    return {"task": task, "rank": rank, "predict_batch_size": cfg.predict.batch_size, "repeats": repeats,
            "max_new_tokens": cfg.predict.max_new_tokens, "results": results,
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "python": platform.python_version()}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT,
                        help="a checkout reproduced up to train_lora (default: this one)")
    parser.add_argument("--task", help="the task whose valid images are scored (default: the first of data.tasks)")
    parser.add_argument("--rank", type=int, default=4, help="the adapters' rank (default 4)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 9], help="values of K (default 1 4 9)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256],
                        help="rows a generate call for mixed and ceiling (default 64 128 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, best kept (default 5)")
    parser.add_argument("--images", type=int, help="score the first N valid images (default evaluate.eval_images; "
                                                   "16 = what generate --select scores, the task's k examples)")
    parser.add_argument("--label", default="default", help="name of this run in the output file")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "mixed_scoring.json")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    for needed in ("models/base", "models/lora", "data/prepared", "params.yaml"):
        if not (repo / needed).exists():
            raise SystemExit(f"{repo / needed}: missing; run `dvc repro train_lora` there first (or pass --repo)")
    out = args.out.resolve()
    record = measure(repo, args.task, args.rank, args.adapters, args.batch_sizes, args.repeats, args.images)
    record["rev"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                   text=True).stdout.strip()
    existing = json.loads(out.read_text()) if out.is_file() else {}
    write_json(out, {**existing, args.label: record})
    print(f"wrote {out} ({args.label})")
    return record


if __name__ == "__main__":
    main()
