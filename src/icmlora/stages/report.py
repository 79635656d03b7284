"""Stage `report`: the summary metrics, the plots, and one MLflow summary run.

    python -m icmlora.stages.report      # or: icmlora report

Reads metrics/comparison.csv, metrics/cross_task.csv, metrics/bootstrap.csv,
metrics/evaluate.json, metrics/timing/generate.json, metrics/cvae/r*.csv and metrics/lora/*.json.
Writes metrics/summary.json (per rank under ``ranks.<r>``: medians, and under ``comparisons``
the paired-bootstrap difference of generated against each baseline, pooled over the training
tasks, with its interval and verdict; storage), metrics/verdicts.txt (those verdicts in words),
metrics/timing/report.json (one adapter generated against one trained) and PNG plots under
metrics/plots/report/: generated vs trained per task and rank, the pooled differences with their
intervals, the task x task heatmap of generated adapters, CVAE loss curves, mAP50 vs novelty, and
the held-out tasks x methods (base, mean of the training adapters, nearest task, retrieval mix,
generated, the task's own trained adapter) with the paired intervals.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from icmlora.artifacts import (
    BOOTSTRAP_TABLE,
    COMPARISON_TABLE,
    CROSS_TASK_TABLE,
    CVAE_METRICS_DIR,
    EVALUATE_METRICS,
    LORA_METRICS_DIR,
    REPORT_PLOTS,
    SUMMARY_METRICS,
    VERDICTS,
    cvae_loss_file,
    lora_metrics_file,
    timing_file,
)
from icmlora.artifacts.tables import POOLED_HELDOUT, POOLED_TRAINING
from icmlora.config import Params
from icmlora.files import atomic_dir, atomic_path, read_json, write_json, write_text
from icmlora.stage_cli import run_stage, stage_parser
from icmlora.tracking import stage_params, start_run


def _median(series) -> float | None:
    series = pd.Series(series).dropna()
    return None if series.empty else round(float(series.median()), 4)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else (1.0 if num == 0 else math.inf)


def _intervals(paired: pd.DataFrame, rank, pooled: str) -> dict:
    rows = paired[(paired["rank"] == rank) & (paired["task"] == pooled)]
    return {r["comparison"]: {"difference": round(float(r["difference"]), 4), "ci_low": round(float(r["ci_low"]), 4),
                              "ci_high": round(float(r["ci_high"]), 4), "verdict": r["verdict"]}
            for r in rows.to_dict("records")}


def _verdict(c: dict, confidence: float) -> str:
    return (f"{c['verdict']} (mAP50 difference {c['difference']:+.3f}, {confidence:.0%} interval "
            f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}])")


def verdict_sentences(ranks: dict, confidence: float) -> list[str]:
    """One sentence per rank and comparison, read from the bootstrap interval (never by eye); each
    held-out task also gets what it scored, by name, and its own verdicts."""
    out = []
    for rank, values in ranks.items():
        for key, group in (("comparisons", "training tasks"), ("heldout_comparisons", "held-out tasks")):
            for comparison, c in (values.get(key) or {}).items():
                pair = (f"generated vs {comparison.removeprefix('generated - ')}" if comparison.startswith("generated - ")
                        else comparison.replace(" - ", " vs "))  # best_of_n - z0
                out.append(f"rank {rank}, {group}: {pair}: {_verdict(c, confidence)}")
        for task, held in (values.get("heldout_tasks") or {}).items():
            m = held["map50"]
            out.append(f"rank {rank}, held-out task {task} (no adapter of it in the generator's data): generated mAP50 "
                       f"{m['generated']:.3f}, {_ratio(m['generated'], m['trained']):.2f} of its own trained LoRA "
                       f"({m['trained']:.3f}); " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()
                                                              if k not in ("generated", "trained")))
            for comparison, c in held["comparisons"].items():
                if comparison.removeprefix("generated - ") not in HELDOUT_COMPARED:
                    continue  # the training tasks' comparisons (avg_checkpoint, noise, ...) stay in summary.json
                out.append(f"rank {rank}, held-out task {task}: generated vs {comparison.removeprefix('generated - ')}: "
                           f"{_verdict(c, confidence)}")
    return out


def timings(generate_timing: dict, lora_metrics: list[dict], evaluate_timing: dict | None = None,
            few_shot_timing: dict | None = None) -> dict:
    """Generating one adapter against training one (wall clock: kept apart from the metrics). With held-out
    tasks, what a user with a new task's k examples pays for its adapter: the task vector plus sampling,
    against few_shot_lora's training (and choosing its lr and steps), medians over held-out tasks and ranks."""
    lora_seconds = [m["train_seconds"] for m in lora_metrics]
    generate = generate_timing["generate_adapter_seconds"]
    out = {"generate_adapter_seconds": generate, "train_lora_seconds_median": _median(lora_seconds),
           "speedup_median": round(_median(lora_seconds) / generate, 1) if lora_seconds and generate else None}
    heldout = (evaluate_timing or {}).get("heldout_adapter_seconds") or {}
    few = (few_shot_timing or {}).get("adapters") or {}
    if heldout and few:
        generator = [v["task_vector"] + g for v in heldout.values() for g in v["generate"].values()]
        trained = [r["train_seconds"] for t in few.values() for r in t.values()]
        chosen = [r["select_seconds"] + r["train_seconds"] for t in few.values() for r in t.values()]
        out.update(heldout_generator_seconds_median=_median(generator), few_shot_train_seconds_median=_median(trained),
                   few_shot_select_and_train_seconds_median=_median(chosen),
                   generator_speedup_over_few_shot_train=round(_median(trained) / _median(generator), 1) if _median(generator) else None)
    return out


def summarize(frame: pd.DataFrame, cfg: Params, evaluate_json: dict, paired: pd.DataFrame | None = None) -> dict:
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
        if heldout:  # what a task never trained gets, from the generator and without it
            ranks[str(rank)].update({
                "heldout_generated_over_trained_median": _median([_ratio(generated[t], trained[t]) for t in heldout]),
                "heldout_generated_z0_map50_median": _median(z0[heldout]),
                **{f"heldout_{source}_map50_median": _median(per_task(source).reindex(heldout))
                   for source in ("ridge", "few_shot_lora", "oracle_single", "retrieval_mix", "mean_training", "base")}})
            held_gen = part[(part.source == "generated") & part.task.isin(heldout)]
            if "best_of_n" in held_gen and held_gen["best_of_n"].notna().any():  # chosen on the support examples
                best = held_gen[held_gen["best_of_n"].astype(str) == "True"].set_index("task")["map50"]
                ranks[str(rank)].update({
                    "heldout_best_of_n_map50_median": _median(best.reindex(heldout)),
                    # how much the samples differ: best minus worst sample's query mAP50, per held-out task
                    "heldout_sample_map50_spread_median": _median(held_gen.groupby("task")["map50"].agg(lambda v: v.max() - v.min()))})
            # Each held-out task by name: every method's mAP50 and generated's paired verdicts.
            methods = [m for m in HELDOUT_METHODS if m in set(part[part.task.isin(heldout)].source)]
            ranks[str(rank)]["heldout_tasks"] = {t: {"map50": {m: round(float(generated[t] if m == "generated" else
                                                                            per_task(m)[t]), 4) for m in methods}}
                                                 for t in heldout}
            if paired is not None:
                for t in heldout:
                    ranks[str(rank)]["heldout_tasks"][t]["comparisons"] = _intervals(paired, rank, t)
        if "error_iou" in part:  # function-space novelty beside the parameter-space one
            gen_rows = part[part.source == "generated"]
            ranks[str(rank)].update(error_iou_median=_median(gen_rows["error_iou"]),
                                    error_iou_checkpoints_median=_median(gen_rows["error_iou_checkpoints"]))
        if paired is not None:
            ranks[str(rank)]["comparisons"] = _intervals(paired, rank, POOLED_TRAINING)
            if heldout:
                ranks[str(rank)]["heldout_comparisons"] = _intervals(paired, rank, POOLED_HELDOUT)
    storage = evaluate_json["storage"]
    gen_bytes = sum(s["generator_bytes"] for s in storage.values())
    ckpt_bytes = sum(s["checkpoint_bytes"] for s in storage.values())
    final_bytes = sum(s["final_adapter_bytes"] for s in storage.values())
    return {
        "ranks": ranks,
        "storage": {"generator_bytes": gen_bytes, "checkpoint_bytes": ckpt_bytes, "final_adapter_bytes": final_bytes,
                    "ratio": round(gen_bytes / ckpt_bytes, 4) if ckpt_bytes else None,
                    "ratio_to_final_adapters": round(gen_bytes / final_bytes, 4) if final_bytes else None},
    }


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def comparison_plot(paired: pd.DataFrame, out: Path) -> Path:
    """Per rank, the pooled paired differences (generated minus each baseline) with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"better": "tab:green", "worse": "tab:red", "indistinguishable": "tab:grey"}
    ranks = sorted(paired["rank"].unique())
    fig, axes = plt.subplots(1, len(ranks), figsize=(4 * len(ranks), 3.2), sharex=True, squeeze=False)
    for ax, rank in zip(axes[0], ranks):
        rows = paired[(paired["rank"] == rank) & paired["task"].isin([POOLED_TRAINING, POOLED_HELDOUT])]
        labels = [f"{c.removeprefix('generated - ')}{' (held out)' if t == POOLED_HELDOUT else ''}"
                  for t, c in zip(rows["task"], rows["comparison"])]
        y = range(len(rows))
        # Clipped at 0: a percentile interval need not contain the full-set difference.
        errors = [(rows["difference"] - rows["ci_low"]).clip(lower=0), (rows["ci_high"] - rows["difference"]).clip(lower=0)]
        ax.barh(y, rows["difference"], xerr=errors, color=[colours[v] for v in rows["verdict"]], capsize=3)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_title(f"rank {rank}: generated minus ...", fontsize=9)
        ax.set_xlabel("mAP50 difference (interval: paired bootstrap)", fontsize=7)
    fig.tight_layout()
    path = _save(fig, out / "comparisons.png")
    plt.close(fig)
    return path


HELDOUT_METHODS = ("base", "mean_training", "nearest_task", "retrieval_mix", "oracle_single", "ridge", "few_shot_lora",
                   "generated", "trained")
HELDOUT_COMPARED = ("trained", "ridge", "few_shot_lora", "oracle_single", "retrieval_mix", "nearest_task", "mean_training",
                    "base")


def heldout_plot(frame: pd.DataFrame, paired: pd.DataFrame, heldout: list[str], path: Path) -> Path:
    """One row per rank (or any grouping in the ``rank`` column): for every held-out task, each
    method's mAP50 (left), and generated minus each baseline with its paired-bootstrap interval, per
    task and pooled over the held-out tasks (right; a filled marker: the interval excludes 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(frame["rank"].unique(), key=str)
    names = [*heldout, POOLED_HELDOUT]
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, (1.0 + 0.45 * len(names)) * len(groups) + 0.6),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 1.1]})
    colours = dict(zip(HELDOUT_COMPARED, ("tab:brown", "tab:purple", "tab:pink", "tab:olive", "tab:red", "tab:green",
                                          "tab:orange", "tab:blue")))
    for (left, right), group in zip(axes, groups):
        label = group if isinstance(group, str) else f"rank {group}"
        part = frame[(frame["rank"] == group) & frame["task"].isin(heldout)]
        table = part.groupby(["task", "source"])["map50"].mean().unstack().reindex(heldout)
        table[[m for m in HELDOUT_METHODS if m in table]].plot.bar(ax=left, width=0.85, rot=20)
        left.set_title(f"{label}: held-out mAP50 by method (generated: mean of samples)", fontsize=9)
        left.set_xlabel("")
        left.set_ylim(0, 1)
        left.legend(fontsize=7, ncol=3, loc="upper left")
        rows = paired[paired["rank"] == group]
        for j, other in enumerate(HELDOUT_COMPARED):
            for i, task in enumerate(names):
                hit = rows[(rows["task"] == task) & (rows["comparison"] == f"generated - {other}")]
                if hit.empty:
                    continue
                r = hit.iloc[0]
                y = i + (j - (len(HELDOUT_COMPARED) - 1) / 2) * 0.15
                right.plot([r["ci_low"], r["ci_high"]], [y, y], color=colours[other], lw=1.5)
                filled = r["verdict"] != "indistinguishable"
                right.plot(r["difference"], y, "o", color=colours[other], mfc=colours[other] if filled else "white",
                           label=other if i == 0 else None)
        right.set_yticks(range(len(names)), names, fontsize=8)
        right.invert_yaxis()
        right.axvline(0.0, color="black", lw=0.8)
        right.legend(fontsize=7, title="generated minus", title_fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        right.set_title(f"{label}: generated minus each baseline, 95 % bootstrap interval", fontsize=9)
        right.set_xlabel("mAP50 difference", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
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
           bootstrap_file: Path = BOOTSTRAP_TABLE, evaluate_file: Path = EVALUATE_METRICS,
           generate_timing: Path = timing_file("generate"), evaluate_timing: Path = timing_file("evaluate"),
           few_shot_timing: Path = timing_file("few_shot"), lora_metrics_dir: Path = LORA_METRICS_DIR,
           cvae_metrics_dir: Path = CVAE_METRICS_DIR, summary_file: Path = SUMMARY_METRICS,
           plots_dir: Path = REPORT_PLOTS, verdicts_file: Path = VERDICTS,
           timing: Path = timing_file("report")) -> dict:
    frame = pd.read_csv(comparison)
    cross = pd.read_csv(cross_file)
    paired = pd.read_csv(bootstrap_file)
    # The adapters params.yaml names: a file left by a task or rank no longer in it does not count.
    lora_metrics = [read_json(lora_metrics_file(t, r, s, lora_metrics_dir))
                    for t in cfg.data.tasks for r in cfg.lora.ranks for s in cfg.lora.seeds]
    summary = summarize(frame, cfg, read_json(evaluate_file), paired)
    speed = timings(read_json(generate_timing), lora_metrics, *(
        (read_json(evaluate_timing), read_json(few_shot_timing)) if cfg.heldout_tasks else ()))
    with atomic_dir(plots_dir) as tmp:  # the folder is replaced whole: no plot of a rank no longer in params
        drawn = plots(frame, cross, cvae_metrics_dir, tmp) + [comparison_plot(paired, tmp)]
        if cfg.heldout_tasks:
            drawn.append(heldout_plot(frame, paired, list(cfg.heldout_tasks), tmp / "heldout.png"))
    written = [Path(plots_dir) / p.name for p in drawn]
    write_json(summary_file, summary)
    write_json(timing, speed)
    verdicts = verdict_sentences(summary["ranks"], cfg.evaluate.confidence)
    write_text(verdicts_file, "\n".join(verdicts) + "\n")
    with start_run("report", "summary", params=stage_params(cfg, "report"), source="summary") as run:
        flat = {f"r{r}.{k}": v for r, vals in summary["ranks"].items() for k, v in vals.items()
                if v is not None and not isinstance(v, dict)}
        for r, vals in summary["ranks"].items():
            for group in ("comparisons", "heldout_comparisons"):
                for comparison, c in (vals.get(group) or {}).items():
                    key = f"r{r}.{group}.{comparison.replace(' - ', '_minus_')}"
                    flat.update({f"{key}.{k}": c[k] for k in ("difference", "ci_low", "ci_high")})
                    run.set_tag(f"{key}.verdict", c["verdict"])
        flat.update({f"storage.{k}": v for k, v in summary["storage"].items() if v is not None})
        flat.update({f"timing.{k}": v for k, v in speed.items() if v is not None})
        run.log_metrics({k: float(v) for k, v in flat.items() if math.isfinite(float(v))})
        run.log_table(frame, artifact_file="comparison.json")
        run.log_table(paired, artifact_file="bootstrap.json")
        run.log_artifact(str(verdicts_file))
        for path in written:
            run.log_artifact(str(path), artifact_path="plots")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("report", __doc__)
    args, cfg = parser.parse(argv)
    summary = report(cfg)
    parts = [f"r{r}: generated/trained {v['generated_over_trained_median']}" for r, v in summary["ranks"].items()]
    print(f"report: wrote {SUMMARY_METRICS} ({'; '.join(parts)}; generator/checkpoints storage "
          f"{summary['storage']['ratio']}), {VERDICTS} and plots under {REPORT_PLOTS}")
    return summary


if __name__ == "__main__":
    run_stage(main)
