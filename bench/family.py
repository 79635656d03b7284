"""The task family end to end (not a test): tasks the generator has not seen, against what a user
could do without a generator, at several generator seeds.

    make family                                   # = .venv/bin/python bench/family.py
    .venv/bin/python bench/family.py --generator-seeds 0 1 2 --keep

Clones this repository (HEAD) into a temporary folder, merges profiles/family.yaml (30 (hue, row)
tasks, 6 held out, rank 4) and runs the pipeline as DVC experiments, one per generator seed:
`dvc exp run -n family-g<s> -S cvae.seed=<s>`. The first runs every stage; the others share its
base model, LoRAs and task vectors (DVC restores them from its cache) and run train_cvae,
generate, evaluate and report again. MLflow runs go to this repository's store (`make mlflow`;
or to MLFLOW_TRACKING_URI), tagged `dvc_exp = family-g<s>`; held-out rows carry `heldout = true`.

Writes metrics/family/:
- summary.json: per generator seed, the held-out tasks' medians per method, generated / own
  trained, and the pooled paired-bootstrap verdicts of generated against each baseline; the
  issue's target checked at every seed; the base's attribute probes, LoRA quality, stage times;
- heldout.csv: mAP50 per held-out task x method x generator seed;
- bootstrap.csv: the held-out rows of every seed's bootstrap table (per task and pooled);
- heldout.png: held-out tasks x methods, and generated minus each baseline with its interval,
  one row per generator seed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from repro_time import per_stage, timed_repro  # noqa: E402

from icmlora.artifacts.tables import POOLED_HELDOUT  # noqa: E402
from icmlora.files import atomic_path, read_json, write_json  # noqa: E402

OUT = ROOT / "metrics" / "family"
TARGET_RATIO = 0.7  # median generated / own trained over the held-out tasks
TARGET_BASELINES = ("nearest_task", "retrieval_mix")  # pooled verdict "better" against each


def seed_record(repo: Path, seed: int) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """One generator seed's figures from the clone's metrics: summary entry, held-out table, bootstrap rows."""
    from icmlora.config import load_params

    cfg = load_params(repo / "params.yaml")
    heldout = list(cfg.heldout_tasks)
    frame = pd.read_csv(repo / "metrics" / "comparison.csv")
    paired = pd.read_csv(repo / "metrics" / "bootstrap.csv")
    summary = read_json(repo / "metrics" / "summary.json")
    rows = frame[frame["task"].isin(heldout)]
    table = (rows.groupby(["task", "source"])["map50"].mean().rename("map50").reset_index()
             .assign(generator_seed=seed))
    boot = paired[paired["task"].isin([*heldout, POOLED_HELDOUT])].assign(generator_seed=seed)
    record = {}
    for rank, values in summary["ranks"].items():
        comparisons = values.get("heldout_comparisons") or {}
        checks = {"generated_over_trained_median": values.get("heldout_generated_over_trained_median")}
        checks["ratio_met"] = (checks["generated_over_trained_median"] or 0) >= TARGET_RATIO
        for baseline in TARGET_BASELINES:
            checks[f"better_than_{baseline}"] = comparisons.get(f"generated - {baseline}", {}).get("verdict") == "better"
        checks["met"] = checks["ratio_met"] and all(checks[f"better_than_{b}"] for b in TARGET_BASELINES)
        record[rank] = {"heldout": {k: v for k, v in values.items() if k.startswith("heldout_") and k != "heldout_comparisons"},
                        "heldout_comparisons": comparisons, "target": checks,
                        "training_generated_over_trained_median": values.get("generated_over_trained_median")}
    return record, table, boot


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="cvae.seed values, one DVC experiment each (default 0 1 2)")
    parser.add_argument("--profile", action="append", help="profile to merge, a name in profiles/ or a file; repeat to "
                        "merge several in turn (default: family)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more `dvc exp run -S` overrides for every run (e.g. a smaller family)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = parser.parse_args(argv)
    args.profile = args.profile or ["family"]
    args.name = Path(args.profile[-1]).stem  # experiments are <name>-g<seed>

    tmp = Path(tempfile.mkdtemp(prefix="family-"))
    repo = tmp / "repo"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True)
    env = dict(os.environ, PYTHONPATH=str(repo / "src"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")
    for profile in args.profile:
        subprocess.run([sys.executable, "-m", "icmlora", "profile", str(Path(profile).resolve()) if Path(profile).is_file()
                        else profile], cwd=repo, env=env, check=True)
    subprocess.run(["git", "commit", "--quiet", "-am", f"profiles {' + '.join(args.profile)}"], cwd=repo, env=env, check=True)

    records, tables, boots, timing = {}, [], [], {}
    begin = time.perf_counter()
    for seed in args.generator_seeds:
        name = f"{args.name}-g{seed}"
        sets = [a for kv in [f"cvae.seed={seed}", *args.set] for a in ("-S", kv)]
        total, starts = timed_repro(repo, env, ["exp", "run", "-n", name, *sets])
        seconds, _ = per_stage(total, starts)
        timing[name] = {"seconds": round(total, 1), "stage_seconds": seconds}
        records[str(seed)], table, boot = seed_record(repo, seed)
        tables.append(table)
        boots.append(boot)
        print(f"family: {name} done in {total / 60:.1f} min", flush=True)

    first = args.generator_seeds[0]
    base = read_json(repo / "metrics" / "base_model.json")
    vectors = read_json(repo / "metrics" / "task_vectors.json")
    lora = [read_json(p)["map50"] for p in sorted((repo / "metrics" / "lora").rglob("r*.json"))]
    ranks = sorted(records[str(first)])
    summary = {
        "profile": args.profile, "overrides": args.set, "generator_seeds": args.generator_seeds,
        "base_map50": base["map50"], "lora_own_task_map50_median": statistics.median(lora),
        "task_vector_attribute_probe": vectors.get("attribute_probe"),
        "task_vector_method": vectors.get("method"), "task_vector_pooling": vectors.get("pooling"),
        "per_seed": records,
        "target": {r: {"met_at_every_seed": all(records[str(s)][r]["target"]["met"] for s in args.generator_seeds),
                       "ratio_range": [min(records[str(s)][r]["target"]["generated_over_trained_median"] or 0
                                           for s in args.generator_seeds),
                                       max(records[str(s)][r]["target"]["generated_over_trained_median"] or 0
                                           for s in args.generator_seeds)]} for r in ranks},
        "timing": {"total_minutes": round((time.perf_counter() - begin) / 60, 1), "runs": timing,
                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "summary.json", summary)
    table = pd.concat(tables).pivot_table(index=["task", "generator_seed"], columns="source", values="map50").reset_index()
    for name, frame in (("heldout.csv", table), ("bootstrap.csv", pd.concat(boots))):
        with atomic_path(args.out / name) as part:
            frame.to_csv(part, index=False, float_format="%.6g")
    plot(repo, args, args.out / "heldout.png")
    print(f"family: wrote {args.out}/ (summary.json, heldout.csv, bootstrap.csv, heldout.png) in "
          f"{summary['timing']['total_minutes']} min; target met at every seed: "
          f"{ {r: t['met_at_every_seed'] for r, t in summary['target'].items()} }"
          + (f"; clone kept at {repo}" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


def plot(repo: Path, args, path: Path) -> None:
    """The report stage's held-out plot with one row per generator seed (read from each experiment)."""
    from icmlora.config import load_params
    from icmlora.stages.report import heldout_plot

    heldout = list(load_params(repo / "params.yaml").heldout_tasks)
    frames, paired = [], []
    for seed in args.generator_seeds:
        ref = f"{args.name}-g{seed}"
        for name, out in (("comparison.csv", frames), ("bootstrap.csv", paired)):
            text = subprocess.run(["git", "show", f"{exp_commit(repo, ref)}:metrics/{name}"], cwd=repo,
                                  capture_output=True, text=True, check=True).stdout
            out.append(pd.read_csv(pd.io.common.StringIO(text)).assign(rank=f"generator seed {seed}"))
    heldout_plot(pd.concat(frames), pd.concat(paired), heldout, path)


def exp_commit(repo: Path, name: str) -> str:
    """The commit of experiment ``name`` (its metrics files are in it)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.split("\n")
    found = [line.split()[1] for line in refs if line.strip() and line.split()[0].endswith(f"/{name}")]
    if not found:
        raise SystemExit(f"family: no experiment {name} in {repo}")
    return found[-1]


if __name__ == "__main__":
    main()
