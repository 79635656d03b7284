"""Every task of the family held out once (not a test): the generator kinds against a linear map
(``ridge``), a LoRA fine-tuned on the task's few examples (``few_shot_lora``) and each task's own
trained LoRA, on 30 held-out tasks pooled in one paired bootstrap.

    make family-folds                                         # = .venv/bin/python bench/family_folds.py
    .venv/bin/python bench/family_folds.py --profile family-sharp --out metrics/family/folds-sharp
                                                              # the harder family: 6 hue bands, 18 tasks
    .venv/bin/python bench/family_folds.py --repo PATH        # a family workspace that already holds
                                                              # its base, LoRAs and task vectors

Without ``--repo``: clones this repository (HEAD) into a temporary folder, merges
profiles/family.yaml (30 (hue, row) tasks, rank 4) and runs ``dvc repro collect_params
task_vectors``: the base model, the 30 LoRAs and the task vectors, trained once and shared by every
fold (DVC's cache keeps them; a second run restores them).

Folds: hue i holds out its row (i + fold) mod 3, so a fold holds out 10 tasks, one per hue (each hue
keeps 2 training tasks and each row 6 or 7, as the family's validation asks), and 3 folds hold every
task out once. Per fold, in this process, with the stages' own functions:
- ``collect_params`` re-fits the normalization on the fold's training tasks;
- ``train_cvae`` trains every kind of ``--kinds`` on the fold's training tasks (the condition is
  standardized on them): at every ``--generator-seeds`` seed on the first fold, at the first seed on
  the others;
- ``few_shot`` trains each held-out task's few-shot LoRA on its k support examples alone;
- each held-out task is scored on its valid split (the query): base, its own trained LoRA,
  few_shot_lora, every kind's z = 0 sample (``<kind>``) and, for kinds whose samples differ,
  ``--samples`` - 1 draws, and best-of-N (``<kind>_best``): the sample (z = 0 included) with the best
  mAP50 on the task's k support examples (the ones its task vector reads), never on the query;
- retrieval, as ``evaluate`` builds it, from the fold's training tasks' trained adapters:
  ``nearest_task`` (nearest task vector), ``retrieval_mix`` (similarity-weighted mix of the k
  nearest), ``mean_training`` and ``oracle_single`` (the one with the best query mAP50, picked with
  hindsight: the upper bound of any retrieval; a kind above it composes, one level with it retrieves);
- the shuffled-condition control ``<kind>_wrong``: each kind given a training task's vector (a fixed
  permutation of the fold's training tasks) in place of the held-out task's, z = 0.

Writes metrics/family/folds/ (``--out``):
- summary.json: per kind its held-out median, the pooled verdicts (paired bootstrap over the valid
  images, per-task differences averaged resample by resample) against ridge, few_shot_lora, own
  trained and the retrievals at every seed, best-of-N against z = 0, against its own ``_wrong``
  control, its margin over oracle_single per task, seconds to fit and to generate, size on disk,
  final KL, sample spread; which training task the retrievals picked (same row or hue as the
  held-out task); the issue's target checked; the folds and their time;
- heldout.csv: mAP50 per held-out task x source x generator seed (query; support mAP50 for samples);
- bootstrap.csv: every pooled comparison; kinds.png: the held-out mAP50 per source, and each kind's
  margin over ridge, few_shot_lora and oracle_single with its interval.
MLflow: every train_cvae and few_shot run goes to the workspace's store, tagged with its kind.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from icmlora.files import atomic_path, write_json  # noqa: E402

OUT = ROOT / "metrics" / "family" / "folds"
BASELINES = ("ridge", "few_shot_lora", "trained")
# What a task never trained gets without a generator: retrieval of training tasks' adapters, by task-vector
# similarity or (oracle_single) with hindsight on the query split; every kind is compared with each.
RETRIEVAL = ("oracle_single", "nearest_task", "retrieval_mix", "mean_training")


def fold_tasks(cfg, fold: int) -> list[str]:
    """Hue i's task in row (i + fold) mod (rows): one held-out task per hue."""
    tasks = cfg.data.tasks
    hues = list(dict.fromkeys(cfg.task_attributes(t)["hue"] for t in tasks))
    rows = list(dict.fromkeys(cfg.task_attributes(t)["row"] for t in tasks))
    return [t for t in tasks if rows.index(cfg.task_attributes(t)["row"])
            == (hues.index(cfg.task_attributes(t)["hue"]) + fold) % len(rows)]


def workspace(args) -> Path:
    """A family workspace with its base, LoRAs and task vectors (made when ``--repo`` is not given)."""
    if args.repo:
        return args.repo.resolve()
    repo = Path(tempfile.mkdtemp(prefix="family-folds-")) / "repo"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True)
    env = dict(os.environ, PYTHONPATH=str(repo / "src"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run([sys.executable, "-m", "icmlora", "profile", args.profile], cwd=repo, env=env, check=True)
    subprocess.run(["git", "commit", "--quiet", "-am", f"profile {args.profile}"], cwd=repo, env=env, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "collect_params", "task_vectors"], cwd=repo, env=env, check=True)
    return repo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="a family workspace holding its base, LoRAs and task vectors")
    parser.add_argument("--profile", default="family",
                        help="the family profile a new workspace merges (family; family-sharp: 6 hue bands)")
    parser.add_argument("--kinds", nargs="+", default=["cvae", "ridge", "hypernet", "flow"])
    parser.add_argument("--generator-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2], help="which folds (0 1 2: every task once)")
    parser.add_argument("--samples", type=int, default=4, help="N of best-of-N: z = 0 and N - 1 draws")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if "ridge" not in args.kinds:
        parser.error("--kinds must include ridge: it is the baseline every kind is measured against")
    args.out = args.out.resolve()  # this checkout's, not the workspace's: the folds run in the workspace
    begin = time.perf_counter()
    repo = workspace(args)
    os.chdir(repo)  # the stages' default paths (data/, models/) are the workspace's
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    records, results, fits = run_folds(repo, args)
    write(args, records, results, fits, time.perf_counter() - begin)


def run_folds(repo: Path, args):
    from peft import get_peft_model

    from icmlora.artifacts import TASK_VECTORS_FILE, few_shot_dir, final_adapter_dir
    from icmlora.artifacts.adapters import read_adapter
    from icmlora.artifacts.base_model import read_base_model
    from icmlora.artifacts.generators import generator_bytes, read_generator
    from icmlora.artifacts.lora_matrix import flatten, read_lora_matrix, unflatten
    from icmlora.artifacts.task_vectors import read_task_vectors
    from icmlora.comparison import ap50, ap50_table, bootstrap_counts
    from icmlora.config import load_params, params_from_dict, read_yaml
    from icmlora.few_shot import map50, support_examples
    from icmlora.images import load_images
    from icmlora.lora import peft_config
    from icmlora.scoring import Scorer
    from icmlora.stages.collect_params import collect_params
    from icmlora.stages.few_shot import few_shot
    from icmlora.stages.evaluate import retrieval_weights
    from icmlora.stages.generate import latents
    from icmlora.stages.train_cvae import train_cvae

    raw = dict(read_yaml(Path("params.yaml").read_text()))
    cfg0 = load_params()
    rank, seed0 = cfg0.lora.ranks[0], cfg0.lora.seeds[0]
    vectors = read_task_vectors(TASK_VECTORS_FILE)
    base, processor = read_base_model()
    scorer = Scorer(get_peft_model(base, peft_config(cfg0.lora, rank)).eval(), processor, cfg0.predict,
                    cfg0.evaluate.eval_images)
    work = repo / "folds"
    manifest = read_lora_matrix(rank).manifest  # the adapters' layout (every fold's matrix shares it)
    names, shapes = manifest.names, manifest.shapes
    records: list[dict] = []  # one per (task, source, sample, seed)
    results: dict[tuple[str, str, int], tuple[float, np.ndarray]] = {}  # (task, source, seed) -> (observed, resampled)
    fits: list[dict] = []

    def score(task, source, sample, seed, weights=None, support=None, disable=False, preds=None, **extra):
        truth = [e.boxes for e in scorer.valid_split(task)[0]]
        if preds is None:
            preds = scorer.predictions(task, weights, disable_adapter=disable)
        table = ap50_table(truth, preds, cfg0.task_label(task))
        observed, resampled = ap50(table)[0], ap50(table, counts[task])
        row = {"task": task, "source": source, "sample": sample, "generator_seed": seed, "map50": observed, **extra}
        if support is not None:  # the model holds these weights now: score them on the support examples
            row["support_map50"] = map50(scorer.model, processor, *support, cfg0.predict)
        records.append(row)
        return row, (observed, resampled)

    finals: dict[str, torch.Tensor] = {}  # a task's own trained adapter, flattened (fold-independent)

    def final_row(task: str) -> torch.Tensor:
        if task not in finals:
            finals[task] = flatten(read_adapter(final_adapter_dir(task, rank, seed0))[0], names)
        return finals[task]

    def retrieval(task: str, train: list[str], fold: int) -> None:
        """What a task never trained gets without a generator (as ``evaluate`` builds them): the trained
        adapter of the training task with the nearest task vector, the similarity-weighted mix of the
        k nearest, every training adapter averaged, and ``oracle_single``: the training adapter with
        the best mAP50 on this very query split, picked with hindsight (the upper bound of retrieval)."""
        rows = torch.stack([final_row(t) for t in train])
        sims = torch.stack([torch.nn.functional.cosine_similarity(vectors[task], vectors[t], dim=0) for t in train])
        truth = [e.boxes for e in scorer.valid_split(task)[0]]
        single = [scorer.predictions(task, unflatten(r, names, shapes)) for r in rows]
        single_map50 = [ap50(ap50_table(truth, p, cfg0.task_label(task)))[0] for p in single]
        best, near = int(np.argmax(single_map50)), int(sims.argmax())
        attrs = cfg0.task_attributes(task)
        for source, i in (("nearest_task", near), ("oracle_single", best)):
            other = cfg0.task_attributes(train[i])
            _, results[(task, source, -1)] = score(task, source, train[i], -1, preds=single[i], fold=fold,
                                                   same_row=other["row"] == attrs["row"], same_hue=other["hue"] == attrs["hue"])
        mix = retrieval_weights(sims, cfg0.evaluate.retrieval_k, cfg0.evaluate.retrieval_temperature)
        _, results[(task, "retrieval_mix", -1)] = score(
            task, "retrieval_mix", "+".join(f"{train[i]}:{w:.2f}" for i, w in mix.items()), -1,
            unflatten(sum(w * rows[i] for i, w in mix.items()), names, shapes), fold=fold)
        _, results[(task, "mean_training", -1)] = score(task, "mean_training", "-", -1,
                                                        unflatten(rows.mean(0), names, shapes), fold=fold)

    counts = {t: bootstrap_counts(len(scorer.valid_split(t)[0]), cfg0.evaluate.bootstrap_resamples,
                                  np.random.default_rng([cfg0.seed, cfg0.evaluate.noise_seed, i]))
              for i, t in enumerate(cfg0.data.tasks)}
    for fold in args.folds:
        held = fold_tasks(cfg0, fold)
        train = [t for t in cfg0.data.tasks if t not in held]
        # The shuffled-condition control: each held-out task given a training task's vector (a fixed
        # permutation of the fold's training tasks), z = 0, denormalized with its own statistics.
        wrong_of = dict(zip(held, np.random.default_rng([cfg0.seed, fold]).permutation(train).tolist()))
        cfg = params_from_dict({**raw, "heldout_tasks": held})  # checked as any params.yaml
        folder = work / f"fold{fold}"
        began = time.perf_counter()
        collect_params(cfg, rank, out_root=folder / "matrix")
        matrix = read_lora_matrix(rank, folder / "matrix")
        print(f"family-folds: fold {fold}: {held}; normalization re-fitted in {time.perf_counter() - began:.0f} s", flush=True)
        few_shot(cfg, out_root=folder / "few_shot", out_json=folder / "few_shot.json", timing=folder / "few_shot_timing.json")
        supports = {}
        for task in held:
            examples, where = support_examples(task, cfg.task_vectors.examples)
            supports[task] = (examples, load_images([where / e.image for e in examples]))
            for source, kwargs in (("base", {"disable": True}),
                                   ("trained", {"weights": read_adapter(final_adapter_dir(task, rank, seed0))[0]}),
                                   ("few_shot_lora", {"weights": read_adapter(few_shot_dir(task, rank, folder / "few_shot"))[0]})):
                _, results[(task, source, -1)] = score(task, source, "-", -1, fold=fold, **kwargs)
            retrieval(task, train, fold)
        for kind in args.kinds:
            for seed in args.generator_seeds if fold == args.folds[0] else args.generator_seeds[:1]:
                kcfg = cfg.model_copy(update={"cvae": cfg.cvae.model_copy(update={"kind": kind, "seed": seed})})
                gen_root = folder / f"{kind}-g{seed}"
                fitted = train_cvae(kcfg, rank, folder / "matrix", TASK_VECTORS_FILE, gen_root, folder / "state",
                                    folder / f"{kind}-g{seed}-loss")
                gen = read_generator(rank, gen_root)
                spread = kind in ("cvae", "flow")  # the others ignore z: every sample is z = 0's
                gen_seconds = []
                for task in held:
                    draws = latents(seed, task, rank, args.samples - 1 if spread else 0, gen.model.config.latent_dim)
                    rows = {}
                    for name, z in draws.items():
                        start = time.perf_counter()
                        rows[name] = matrix.manifest.denormalize(gen.sample(vectors[task], z[None])[0], matrix.task_stats(task))
                        gen_seconds.append(time.perf_counter() - start)
                    scored = {}
                    for name, row in rows.items():
                        weights = unflatten(row, matrix.manifest.names, matrix.manifest.shapes)
                        scored[name] = score(task, kind, name, seed, weights, supports[task], fold=fold)
                    z0 = scored["z0"]
                    other = wrong_of[task]
                    wrong = matrix.manifest.denormalize(gen.sample(vectors[other], draws["z0"][None])[0], matrix.task_stats(task))
                    _, results[(task, f"{kind}_wrong", seed)] = score(
                        task, f"{kind}_wrong", other, seed, unflatten(wrong, matrix.manifest.names, matrix.manifest.shapes), fold=fold)
                    results[(task, kind, seed)] = z0[1]
                    best = max(scored, key=lambda n: (scored[n][0]["support_map50"], n == "z0"))  # ties: z = 0
                    results[(task, f"{kind}_best", seed)] = scored[best][1]
                    records.append({**scored[best][0], "source": f"{kind}_best"})
                    if len(rows) > 1:
                        stacked = torch.stack(list(rows.values()))
                        records[-1]["row_spread"] = float(torch.pdist(stacked).mean() / stacked.norm(dim=1).mean())
                fits.append({"fold": fold, "kind": kind, "generator_seed": seed, "fit_seconds": fitted["train_seconds"],
                             "generate_seconds_median": statistics.median(gen_seconds),
                             "bytes": generator_bytes(rank, gen_root), "parameters": fitted["parameters"],
                             "final": fitted["final"]})
                print(f"family-folds: fold {fold} {kind} g{seed}: fitted in {fitted['train_seconds']:.0f} s; held-out "
                      f"median mAP50 {statistics.median(results[(t, kind, seed)][0] for t in held):.3f}", flush=True)
        print(f"family-folds: fold {fold} done in {(time.perf_counter() - began) / 60:.1f} min", flush=True)
    return records, results, fits


def pooled(results, a: str, b: str, seed: int, confidence: float) -> dict | None:
    """a - b averaged over the tasks both have at ``seed`` (baselines without a seed: -1)."""
    from icmlora.comparison import interval

    def key(source, task):
        return (task, source, seed) if (task, source, seed) in results else (task, source, -1)

    tasks = sorted({t for (t, s, g) in results if s == a and g == seed})
    tasks = [t for t in tasks if key(b, t) in results]
    if not tasks:
        return None
    observed = np.mean([results[key(a, t)][0] - results[key(b, t)][0] for t in tasks])
    resampled = np.mean([results[key(a, t)][1] - results[key(b, t)][1] for t in tasks], axis=0)
    low, high, verdict = interval(resampled, confidence)
    return {"a": a, "b": b, "generator_seed": seed, "tasks": len(tasks), "difference": round(float(observed), 4),
            "ci_low": round(low, 4), "ci_high": round(high, 4), "verdict": verdict}


def write(args, records, results, fits, seconds: float) -> None:
    from icmlora.config import load_params

    cfg = load_params()
    frame = pd.DataFrame(records)
    comparisons = []
    for seed in args.generator_seeds:
        for kind in args.kinds:
            for b in (*BASELINES, *RETRIEVAL):
                if b != kind:
                    comparisons.append(pooled(results, kind, b, seed, cfg.evaluate.confidence))
            comparisons.append(pooled(results, f"{kind}_best", kind, seed, cfg.evaluate.confidence))
            comparisons.append(pooled(results, kind, f"{kind}_wrong", seed, cfg.evaluate.confidence))
    comparisons = [c for c in comparisons if c]
    if args.generator_seeds:
        comparisons.append(pooled(results, "few_shot_lora", "trained", -1, cfg.evaluate.confidence))
        comparisons.append(pooled(results, "oracle_single", "few_shot_lora", -1, cfg.evaluate.confidence))
    first = args.generator_seeds[0]
    ridge = frame[(frame.source == "ridge") & (frame.generator_seed == first)].groupby("task")["map50"].first()
    trained = frame[frame.source == "trained"].groupby("task")["map50"].first()
    gap = float((trained - ridge).mean())
    oracle = frame[frame.source == "oracle_single"].groupby("task")["map50"].first()
    picked = frame[frame.source.isin(["oracle_single", "nearest_task"])]
    kinds = {}
    for kind in args.kinds:
        rows = frame[(frame.source == kind)]
        z0 = rows[rows["sample"] == "z0"]
        mine = [c for c in comparisons if c["a"] == kind]
        vs = {f"{c['b']}@g{c['generator_seed']}": c for c in mine}
        fit = [f for f in fits if f["kind"] == kind]
        spreads = rows.groupby(["task", "generator_seed"])["map50"].agg(lambda v: v.max() - v.min())
        vs_ridge = [c for c in mine if c["b"] == "ridge"]
        first_z0 = z0[z0.generator_seed == first].groupby("task")["map50"].first()
        margin = (first_z0 - oracle).dropna()  # > 0: the kind composes past the best single training adapter
        wrong = frame[(frame.source == f"{kind}_wrong") & (frame.generator_seed == first)].groupby("task")["map50"].first()
        kinds[kind] = {
            "heldout_map50_median": round(float(z0[z0.generator_seed == first]["map50"].median()), 4),
            "heldout_map50_median_per_seed": {str(s): round(float(z0[z0.generator_seed == s]["map50"].median()), 4)
                                              for s in sorted(z0.generator_seed.unique())},
            "best_of_n_median": round(float(frame[(frame.source == f"{kind}_best") & (frame.generator_seed == first)]["map50"].median()), 4),
            "comparisons": vs,
            "fit_seconds_median": statistics.median(f["fit_seconds"] for f in fit),
            "generate_seconds_median": statistics.median(f["generate_seconds_median"] for f in fit),
            "bytes": statistics.median(f["bytes"] for f in fit), "parameters": fit[0]["parameters"],
            "final_kl": [f["final"].get("kl") for f in fit if "kl" in f["final"]],
            "sample_map50_spread_median": round(float(spreads.median()), 4),
            "margin_over_oracle_single": {
                "median": round(float(margin.median()), 4), "tasks_above": int((margin > 0).sum()),
                "tasks_tied": int((margin == 0).sum()), "tasks_below": int((margin < 0).sum()),
                "per_task": {t: round(float(v), 4) for t, v in margin.items()}},
            "wrong_task_map50_median": round(float(wrong.median()), 4) if len(wrong) else None,
            "sample_row_spread_median": (float(f'{frame[frame.source == f"{kind}_best"]["row_spread"].median():.3g}')
                                         if "row_spread" in frame and frame[frame.source == f"{kind}_best"]["row_spread"].notna().any()
                                         else 0.0),
            "target": None if kind == "ridge" else {
                "margin_needed": round(gap / 2, 4),
                "met_at_every_seed": bool(vs_ridge) and all(c["difference"] >= gap / 2 and c["ci_low"] > 0 for c in vs_ridge),
                "beats_few_shot_at_every_seed": all(c["verdict"] == "better" for c in mine if c["b"] == "few_shot_lora"),
            },
        }
    summary = {
        "family": {"tasks": len(cfg.data.tasks), "hues": cfg.data.synthetic.family.hues,
                   "rows": list(cfg.data.synthetic.family.rows)},
        "folds": {str(f): fold_tasks(cfg, f) for f in args.folds}, "kinds_compared": args.kinds,
        "generator_seeds": args.generator_seeds, "seeds_note": "every fold at the first seed; the first fold at every seed",
        "heldout_evaluations": int(frame[(frame.source == "trained")]["task"].nunique()),
        "samples_for_best_of_n": args.samples,
        "medians": {s: round(float(frame[frame.source == s]["map50"].median()), 4)
                    for s in ("base", "trained", "few_shot_lora", *RETRIEVAL)},
        # Which training task the retrievals picked: one of the held-out task's row (same objects, a
        # neighbouring hue) or of its hue (same colour, another row), as a share of the held-out tasks.
        "retrieval_picks": {s: {"same_row": round(float(part["same_row"].astype(float).mean()), 3),
                                "same_hue": round(float(part["same_hue"].astype(float).mean()), 3)}
                            for s, part in picked.groupby("source")},
        "oracle_vs_few_shot": next((c for c in comparisons if c["a"] == "oracle_single"), None),
        "ridge_to_trained_gap_mean": round(gap, 4), "kinds": kinds,
        "few_shot_vs_trained": next((c for c in comparisons if c["a"] == "few_shot_lora"), None),
        "timing": {"total_minutes": round(seconds / 60, 1), "fits": fits,
                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "summary.json", summary)
    for name, table in (("heldout.csv", frame), ("bootstrap.csv", pd.DataFrame(comparisons))):
        with atomic_path(args.out / name) as part:
            table.to_csv(part, index=False, float_format="%.6g")
    plot(frame, comparisons, args, args.out / "kinds.png")
    print(f"family-folds: wrote {args.out}/ in {seconds / 60:.1f} min; " + "; ".join(
        f"{k}: median {v['heldout_map50_median']}, target {v['target'] and v['target']['met_at_every_seed']}"
        for k, v in kinds.items()))


def plot(frame: pd.DataFrame, comparisons: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = args.generator_seeds[0]
    sources = ["base", "few_shot_lora", "mean_training", "nearest_task", "retrieval_mix", "oracle_single", *args.kinds, *[f"{k}_best" for k in args.kinds if k in ("cvae", "flow")], "trained"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    data = [frame[(frame.source == s) & (frame.generator_seed.isin([first, -1])) &
                  (frame["sample"].isin(["z0", "-"]) | frame.source.str.endswith("_best") | frame.source.isin(RETRIEVAL))
                  ]["map50"] for s in sources]
    left.boxplot(data, showmeans=True)
    left.set_xticks(range(1, len(sources) + 1), sources, rotation=30, ha="right")
    left.set_ylabel("held-out mAP50 (query split)")
    left.set_title(f"{len(data[0])} held-out tasks, generator seed {first}")
    shown = [c for c in comparisons if c["b"] in ("ridge", "few_shot_lora", "oracle_single") and c["generator_seed"] == first
             and not c["a"].endswith("_best")]
    for i, c in enumerate(shown):
        right.errorbar(c["difference"], i, xerr=[[c["difference"] - c["ci_low"]], [c["ci_high"] - c["difference"]]],
                       fmt="o", color={"better": "tab:green", "worse": "tab:red"}.get(c["verdict"], "tab:gray"))
    right.set_yticks(range(len(shown)), [f"{c['a']} - {c['b']}" for c in shown])
    right.axvline(0, color="k", lw=0.8)
    right.set_xlabel("pooled mAP50 difference, 95% paired bootstrap")
    fig.tight_layout()
    with atomic_path(path) as part:
        fig.savefig(part, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
