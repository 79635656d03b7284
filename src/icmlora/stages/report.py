"""Stage `report`: the summary metrics, the plots, and one MLflow summary run.

    python -m icmlora.stages.report      # or: icmlora report

Reads metrics/comparison.csv, metrics/cross_task.csv, metrics/evaluate.json,
metrics/generate.json, metrics/cvae/r*.csv and metrics/lora/*.json. Writes
metrics/summary.json (per rank under ``ranks.<r>``, plus storage and timing) and PNG plots
under metrics/plots/report/: generated vs trained per task and rank, the task x task heatmap of
generated adapters, CVAE loss curves, and mAP50 vs novelty.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from icmlora.artifacts import (
    COMPARISON_TABLE,
    CROSS_TASK_TABLE,
    CVAE_METRICS_DIR,
    EVALUATE_METRICS,
    GENERATE_METRICS,
    LORA_METRICS_DIR,
    REPORT_PLOTS,
    SUMMARY_METRICS,
    cvae_loss_file,
)
from icmlora.config import Params
from icmlora.files import atomic_path, read_json, write_json
from icmlora.stage_cli import run_stage, stage_parser
from icmlora.tracking import start_run


def _median(series) -> float | None:
    series = pd.Series(series).dropna()
    return None if series.empty else round(float(series.median()), 4)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else (1.0 if num == 0 else math.inf)


def summarize(frame: pd.DataFrame, cfg: Params, evaluate_json: dict, generate_json: dict, lora_metrics: list[dict]) -> dict:
    ranks: dict = {}
    for rank, part in frame.groupby("rank"):
        def per_task(source: str, sample: str | None = None) -> pd.Series:
            sel = part[part.source == source]
            if sample is not None:
                sel = sel[sel["sample"].astype(str) == sample]
            return sel.groupby("task")["map50"].mean()

        trained = per_task("trained")
        generated = part[part.source == "generated"].groupby("task")["map50"].mean()  # mean over samples
        z0 = per_task("generated", "z0")
        wrong = part[part.source == "wrong_task"].set_index("task")["map50"]
        train_tasks = [t for t in trained.index if t not in cfg.heldout_tasks]
        heldout = [t for t in trained.index if t in cfg.heldout_tasks]
        ranks[str(rank)] = {
            "trained_map50_median": _median(trained[train_tasks]),
            "generated_map50_median": _median(generated[train_tasks]),
            "generated_z0_map50_median": _median(z0[train_tasks]),
            "generated_best_map50_median": _median(part[part.source == "generated"].groupby("task")["map50"].max()[train_tasks]),
            "generated_over_trained_median": _median([_ratio(generated[t], trained[t]) for t in train_tasks]),
            "wrong_task_over_right_task_median": _median([_ratio(wrong[t], z0[t]) for t in trained.index]),
            "random_condition_map50_median": _median(per_task("random_condition")[train_tasks]),
            "avg_checkpoint_map50_median": _median(per_task("avg_checkpoint")[train_tasks]),
            "noise_map50_median": _median(per_task("noise")[train_tasks]),
            "base_map50_median": _median(per_task("base")[train_tasks]),
            "novelty_ratio_median": _median(part[part.source == "generated"]["novelty_ratio"]),
            "nn_cosine_median": _median(part[part.source == "generated"]["nn_cosine"]),
            "heldout_generated_map50_median": _median(generated[heldout]) if heldout else None,
            "heldout_trained_map50_median": _median(trained[heldout]) if heldout else None,
            "heldout_nearest_task_map50_median": _median(per_task("nearest_task")[heldout]) if heldout else None,
        }
    storage = evaluate_json["storage"]
    gen_bytes = sum(s["generator_bytes"] for s in storage.values())
    ckpt_bytes = sum(s["checkpoint_bytes"] for s in storage.values())
    final_bytes = sum(s["final_adapter_bytes"] for s in storage.values())
    lora_seconds = [m["train_seconds"] for m in lora_metrics]
    return {
        "ranks": ranks,
        "storage": {"generator_bytes": gen_bytes, "checkpoint_bytes": ckpt_bytes, "final_adapter_bytes": final_bytes,
                    "ratio": round(gen_bytes / ckpt_bytes, 4) if ckpt_bytes else None,
                    "ratio_to_final_adapters": round(gen_bytes / final_bytes, 4) if final_bytes else None},
        "timing": {"generate_adapter_seconds": generate_json["generate_adapter_seconds"],
                   "train_lora_seconds_median": _median(lora_seconds),
                   "speedup_median": round(_median(lora_seconds) / generate_json["generate_adapter_seconds"], 1)
                   if lora_seconds and generate_json["generate_adapter_seconds"] else None},
    }


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def plots(frame: pd.DataFrame, cross: pd.DataFrame, cvae_dir: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sources = ["base", "trained", "generated", "avg_checkpoint", "noise", "wrong_task", "random_condition"]
    ranks = sorted(frame["rank"].unique())
    fig, axes = plt.subplots(1, len(ranks), figsize=(4 * len(ranks), 3.6), sharey=True, squeeze=False)
    for ax, rank in zip(axes[0], ranks):
        table = frame[frame["rank"] == rank].groupby(["task", "source"])["map50"].mean().unstack()
        table[[s for s in sources if s in table]].plot.bar(ax=ax, width=0.85, legend=rank == ranks[-1])
        ax.set_title(f"rank {rank}: mAP50 by source")
        ax.set_xlabel("")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    written.append(_save(fig, out / "generated_vs_trained.png"))
    plt.close(fig)
    if not cross.empty:
        for rank, part in cross.groupby("rank"):
            diag = frame[(frame["rank"] == rank) & (frame.source == "generated") & (frame["sample"].astype(str) == "z0")]
            full = pd.concat([part, diag.rename(columns={"task": "adapter_task"}).assign(eval_task=diag["task"].values)])
            grid = full.pivot_table(index="adapter_task", columns="eval_task", values="map50")
            fig, ax = plt.subplots(figsize=(4.6, 4))
            im = ax.imshow(grid.values, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=45, fontsize=7)
            ax.set_yticks(range(len(grid.index)), grid.index, fontsize=7)
            ax.set_xlabel("evaluated on")
            ax.set_ylabel("generated for")
            ax.set_title(f"generated adapters (z=0), rank {rank}: mAP50")
            fig.colorbar(im)
            fig.tight_layout()
            written.append(_save(fig, out / f"task_heatmap_r{rank}.png"))
            plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for rank in ranks:
        curve = pd.read_csv(cvae_loss_file(rank, cvae_dir))
        ax.plot(curve["epoch"], curve["loss"], label=f"r{rank}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("CVAE loss")
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, out / "cvae_loss.png"))
    plt.close(fig)
    gen = frame[frame.source == "generated"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for rank, part in gen.groupby("rank"):
        ax.scatter(part["novelty_ratio"], part["map50"], s=14, label=f"r{rank}")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("novelty: NN distance / median NN distance among the task's checkpoints")
    ax.set_ylabel("mAP50")
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, out / "map_vs_novelty.png"))
    plt.close(fig)
    return written


def report(cfg: Params, comparison: Path = COMPARISON_TABLE, cross_file: Path = CROSS_TASK_TABLE,
           evaluate_file: Path = EVALUATE_METRICS, generate_file: Path = GENERATE_METRICS,
           lora_metrics_dir: Path = LORA_METRICS_DIR, cvae_metrics_dir: Path = CVAE_METRICS_DIR,
           summary_file: Path = SUMMARY_METRICS, plots_dir: Path = REPORT_PLOTS) -> dict:
    frame = pd.read_csv(comparison)
    cross = pd.read_csv(cross_file)
    lora_metrics = [read_json(p) for p in sorted(Path(lora_metrics_dir).glob("*.json"))]
    summary = summarize(frame, cfg, read_json(evaluate_file), read_json(generate_file), lora_metrics)
    written = plots(frame, cross, cvae_metrics_dir, plots_dir)
    write_json(summary_file, summary)
    with start_run("report", "summary", params={"ranks": cfg.lora.ranks, "heldout_tasks": cfg.heldout_tasks,
                                                 "task_vector_method": cfg.task_vectors.method}, source="summary") as mlflow:
        flat = {f"r{r}.{k}": v for r, vals in summary["ranks"].items() for k, v in vals.items() if v is not None}
        flat.update({f"storage.{k}": v for k, v in summary["storage"].items() if v is not None})
        flat.update({f"timing.{k}": v for k, v in summary["timing"].items() if v is not None})
        mlflow.log_metrics({k: float(v) for k, v in flat.items() if math.isfinite(float(v))})
        mlflow.log_table(frame, artifact_file="comparison.json")
        for path in written:
            mlflow.log_artifact(str(path), artifact_path="plots")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("report", __doc__)
    args, cfg = parser.parse(argv)
    summary = report(cfg)
    parts = [f"r{r}: generated/trained {v['generated_over_trained_median']}" for r, v in summary["ranks"].items()]
    print(f"report: wrote {SUMMARY_METRICS} ({'; '.join(parts)}; generator/checkpoints storage "
          f"{summary['storage']['ratio']}) and plots under {REPORT_PLOTS}")
    return summary


if __name__ == "__main__":
    run_stage(main)
