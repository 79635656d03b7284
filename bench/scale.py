"""Benchmark (not a test): the whole pipeline at the real setting's shape, on this machine.

    make scale                                  # = .venv/bin/python bench/scale.py
    .venv/bin/python bench/scale.py --keep      # keep the clone (its path is printed)

Clones this repository (HEAD) into a temporary folder, writes a synthetic PASCAL VOC2012 folder
there (`icmlora synth-voc`: JPEGs at VOC sizes, XML), merges profiles/scale.yaml (Florence-2-base's
architecture with random weights, 768x768 input, the reference code's LoRA targets, the paper's
CVAE channels and latent) and runs every `dvc repro` stage item one at a time (`dvc repro -s`),
recording each one's wall seconds and peak RSS (the largest process of its tree, from wait4).
Then it measures, at the real D of rank 8:
- the flattened dimension per rank (1, 2, 4, 8) for the `reference` preset and for params.yaml's
  default targets (PEFT on the architecture built on the meta device);
- seconds per LoRA step (train_lora's own timing) and per generated adapter (generate's: decode +
  de-normalize + write a PEFT folder);
- the CVAE at D = 1,929,928, batch 2, on the run's own rank-8 rows: the paper's network (patch 1,
  BatchNorm, padding 4096) against the scale profile's (cvae.patch): seconds per step, peak RSS
  (each in a process of its own) and the reconstruction error after the same number of steps;
- bytes of checkpoints, final adapters, generators and normalization files, and the storage at
  the paper's counts (7 tasks x 50 checkpoints at rank 8).
Writes metrics/scale.json (the machine it ran on included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from icmlora.files import write_json  # noqa: E402

PAPER_TASKS, PAPER_CHECKPOINTS, PAPER_RANK = 7, 50, 8
REFERENCE_CVAE = {"step_seconds": 11.0, "peak_rss_gb": 4.0, "parameters": 7_500_000,
                  "source": "issue #11: the reference code's CVAE at D = 1,929,928, batch 2, on a 2-core CPU"}


def stage_env(repo: Path) -> dict:
    """The clone's own code and MLflow store, this interpreter's bin/ first on PATH."""
    return dict(os.environ, PYTHONPATH=str(repo / "src"), MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def run_timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, peak RSS in GiB of the largest process of its tree)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"scale: {' '.join(cmd)} failed in {cwd} (exit {proc.returncode})")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def lora_dimensions(repo: Path) -> dict:
    """D per rank for the reference preset and for params.yaml's default targets, on the scale
    profile's architecture (meta device: no weights allocated)."""
    import torch
    from peft import get_peft_model

    from icmlora.config import load_params
    from icmlora.florence.model import build_tiny_model, build_tiny_processor
    from icmlora.lora import peft_config

    scale = load_params(repo / "params.yaml")
    default_targets = load_params(ROOT / "params.yaml").lora.target_modules
    processor = build_tiny_processor(["dog", "cat", "object"], scale.base.tiny.image_size, scale.base.tiny)
    out: dict = {}
    for name, targets in (("reference", "reference"), ("default", default_targets)):
        lora = scale.lora.model_copy(update={"target_modules": targets})
        out[name] = {}
        for rank in (1, 2, 4, 8):
            with torch.device("meta"):
                model = build_tiny_model(scale.base.tiny, processor, scale.base.tiny.image_size, seed=0)
            peft = get_peft_model(model, peft_config(lora, rank))
            out[name][str(rank)] = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    with torch.device("meta"):
        out["base_parameters"] = sum(
            p.numel() for p in build_tiny_model(scale.base.tiny, processor, scale.base.tiny.image_size, 0).parameters())
    return out


CVAE_PROBE = r"""
import json, resource, sys, time, torch
from icmlora.artifacts.lora_matrix import read_lora_matrix
from icmlora.cvae import CVAE, CVAEArchitecture
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
x = read_lora_matrix(8, spec["matrix_root"]).rows
x = x[: spec["rows"]] if spec["rows"] else x
cond = torch.randn(len(x), 768, generator=torch.Generator().manual_seed(1))
model = CVAE(CVAEArchitecture(input_dim=x.shape[1], condition_dim=768, **spec["arch"]))
opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
steps, times = [], []
for step in range(spec["steps"]):
    i = torch.arange(2 * step, 2 * step + 2) % len(x)
    start = time.perf_counter()
    recon, mu, logvar = model(x[i], cond[i])
    total, rec, kl = model.loss(x[i], recon, mu, logvar)
    opt.zero_grad(); total.backward(); opt.step()
    times.append(time.perf_counter() - start)
model.eval()
with torch.no_grad():
    err = sum(model.loss(x[i:i+2], *model(x[i:i+2], cond[i:i+2], sample=False))[1].item() * len(x[i:i+2])
              for i in range(0, len(x), 2)) / len(x)
    start = time.perf_counter(); model.decode(torch.zeros(1, model.config.latent_dim), cond[:1]); dec = time.perf_counter() - start
print(json.dumps({"parameters": model.num_parameters(), "bytes_fp32": 4 * model.num_parameters(),
                  "step_seconds_median": sorted(times[1:])[len(times[1:]) // 2], "steps": spec["steps"],
                  "recon_mse_after": err, "decode_seconds": dec, "rows": len(x),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


COLLECT_PROBE = r"""
import json, sys
from icmlora.config import load_params
from icmlora.stages.collect_params import collect_params

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024  # kB -> MiB

cfg = load_params()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS: imports excluded
before = status("VmRSS")
collect_params(cfg, int(sys.argv[1]))
print(json.dumps({"rss_after_imports_mb": before, "peak_mb": status("VmHWM")}))
"""


def collect_params_memory(repo: Path, env: dict, rank: int) -> dict:
    """collect_params at one rank, run again with this checkout's code: its peak RSS above the RSS
    it had once its imports were done (Linux: /proc/self/clear_refs resets the peak), against the
    target's budget, 1.5 x (its output tensor + one checkpoint)."""
    env = dict(env, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run([sys.executable, "-c", COLLECT_PROBE, str(rank)], cwd=repo, env=env, check=True,
                         capture_output=True, text=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    output = (repo / "data" / "lora_matrix" / f"r{rank}.safetensors").stat().st_size
    checkpoint = statistics.median(folder_bytes(p) for p in (repo / "models" / "lora").glob(f"*/r{rank}/checkpoints/*"))
    return {"rank": rank, **{k: round(v, 1) for k, v in probe.items()},
            "above_imports_mb": round(probe["peak_mb"] - probe["rss_after_imports_mb"], 1),
            "output_mb": round(output / 2**20, 1), "checkpoint_mb": round(checkpoint / 2**20, 1),
            "budget_mb": round(1.5 * (output + checkpoint) / 2**20, 1)}


STAND_IN_CHECKPOINT = r"""
import sys
from pathlib import Path
import torch
from peft import get_peft_model
from icmlora.artifacts import checkpoint_name, checkpoints_dir
from icmlora.artifacts.adapters import save_adapter
from icmlora.config import load_params
from icmlora.florence.model import build_tiny_model, build_tiny_processor
from icmlora.lora import peft_config

cfg, rank = load_params(), int(sys.argv[1])
tiny = cfg.base.tiny
processor = build_tiny_processor([*cfg.data.tasks, "object"], tiny.image_size, tiny)
model = get_peft_model(build_tiny_model(tiny, processor, tiny.image_size, seed=0), peft_config(cfg.lora, rank))
steps = range(cfg.lora.train.steps - cfg.lora.keep_checkpoints + 1, cfg.lora.train.steps + 1)
for task in cfg.data.tasks:
    for step in steps:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        save_adapter(model, checkpoints_dir(task, rank, 0, Path("models/lora")) / checkpoint_name(step))
"""


def collect_memory_only(out: Path) -> None:
    """--collect-memory: collect_params's peak memory at rank 8 of the scale profile, on stand-in
    checkpoints (PEFT adapters of Florence-2-base's shape with random B, saved as train_lora saves
    them: the same names, shapes, count and bytes, which memory depends on; not the values).
    About 2 min instead of the whole run; updates collect_params_memory in --out."""
    from icmlora.profile import apply_profile

    rev = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    with tempfile.TemporaryDirectory(prefix="collect-memory-") as tmp:
        repo = Path(tmp)
        shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
        apply_profile(repo / "params.yaml", ROOT / "profiles" / "scale.yaml")
        env = dict(stage_env(repo), PYTHONPATH=str(ROOT / "src"))
        subprocess.run([sys.executable, "-c", STAND_IN_CHECKPOINT, str(PAPER_RANK)], cwd=repo, env=env, check=True)
        memory = collect_params_memory(repo, env, PAPER_RANK)
    memory.update(rev=rev, checkpoints="stand-ins: PEFT adapters of the scale profile's shape, random B (bench/scale.py "
                                       "--collect-memory)", ratio_to_budget=round(memory["above_imports_mb"] / memory["budget_mb"], 2))
    record = json.loads(out.read_text()) if out.is_file() else {}
    record["collect_params_memory"] = memory
    write_json(out, record)
    print(f"scale: collect_params r{PAPER_RANK}: {memory['above_imports_mb']} MB above imports, budget "
          f"{memory['budget_mb']} MB (1.5 x (output {memory['output_mb']} + checkpoint {memory['checkpoint_mb']})) -> {out}")


def cvae_probe(repo: Path, env: dict, arch: dict, steps: int) -> dict:
    spec = {"matrix_root": str(repo / "data" / "lora_matrix"), "rows": 0, "steps": steps, "arch": arch}
    out = subprocess.run([sys.executable, "-c", CVAE_PROBE, json.dumps(spec)], cwd=repo, env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="git revision to clone (default HEAD)")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "scale.json")
    parser.add_argument("--cvae-steps", type=int, default=12, help="steps of each CVAE in the comparison (default 12)")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    parser.add_argument("--reuse", type=Path, help="a clone kept by an earlier run (--keep): skip the pipeline, keep its "
                                                   "stage figures from --out, measure the rest again")
    parser.add_argument("--reuse-cvae", action="store_true", help="with --reuse: keep the CVAE comparison from --out too")
    parser.add_argument("--collect-memory", action="store_true", help="measure only collect_params's peak memory at "
                        "rank 8, on stand-in checkpoints of the scale profile's shape (about 2 min)")
    args = parser.parse_args(argv)

    if args.collect_memory:
        return collect_memory_only(args.out)
    if args.reuse:
        repo, tmp = args.reuse.resolve(), None
        old = json.loads(args.out.read_text())
        rev, stages, pipeline_seconds = old["rev"], old["stages"], old["pipeline_minutes"] * 60
        env = stage_env(repo)
    else:
        rev = subprocess.check_output(["git", "rev-parse", args.rev], cwd=ROOT, text=True).strip()
        tmp = Path(tempfile.mkdtemp(prefix="scale-"))
        repo = tmp / "repo"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True)
        subprocess.run(["git", "checkout", "--quiet", rev], cwd=repo, check=True)
        env = stage_env(repo)
        begin = time.perf_counter()
        icmlora = [sys.executable, "-m", "icmlora"]
        subprocess.run([*icmlora, "synth-voc", "data/scale-voc/VOC2012", "--tasks", "dog", "cat", "--train", "12",
                        "--valid", "6"], cwd=repo, env=env, check=True)
        subprocess.run([*icmlora, "profile", "scale"], cwd=repo, env=env, check=True)
        names = [line.split()[0] for line in subprocess.check_output(
            [sys.executable, "-m", "dvc", "stage", "list"], cwd=repo, env=env, text=True).splitlines() if line.strip()]
        stages = {}
        for name in names:
            print(f"scale: stage {name}", flush=True)
            seconds, rss = run_timed([sys.executable, "-m", "dvc", "repro", "--single-item", name], repo, env)
            stages[name] = {"seconds": round(seconds, 1), "peak_rss_gb": round(rss, 2)}
        pipeline_seconds = time.perf_counter() - begin

    sys.path.insert(0, str(repo / "src"))
    from icmlora.config import load_params

    cfg = load_params(repo / "params.yaml")
    dims = lora_dimensions(repo)
    # this profile's tasks only: the clone also holds the default run's committed metrics
    lora_metrics = [json.loads(p.read_text()) for task in cfg.data.tasks
                    for p in sorted((repo / "metrics" / "lora" / f"{task}-s0").glob("r*.json"))]
    # per rank, median over tasks; rank 1 trains first in each process and carries its warm-up
    # (filling the image cache at 768x768, first-step allocations)
    step_seconds = {str(r): statistics.median(m["train_seconds"] / m["train_steps"] for m in lora_metrics if m["rank"] == r)
                    for r in cfg.lora.ranks}
    generate_timing = json.loads((repo / "metrics" / "timing" / "generate.json").read_text())

    models = repo / "models"
    checkpoints = sorted((models / "lora").glob(f"*/r{PAPER_RANK}/checkpoints/*"))
    finals = sorted((models / "lora").glob(f"*/r{PAPER_RANK}/final"))
    checkpoint_bytes = statistics.median(folder_bytes(p) for p in checkpoints)
    final_bytes = statistics.median(folder_bytes(p) for p in finals)
    generator_bytes = folder_bytes(models / "cvae" / f"r{PAPER_RANK}")
    matrix = repo / "data" / "lora_matrix"
    dim_r8 = dims["reference"][str(PAPER_RANK)]
    # What generating reads besides the generator: the manifest (per-tensor mean and std) and, with
    # centered normalization, the centre (one fp32 value per adapter value).
    normalization_bytes = (matrix / f"r{PAPER_RANK}.json").stat().st_size + (
        4 * dim_r8 if cfg.cvae.normalization == "centered" else 0)
    center_file = matrix / f"r{PAPER_RANK}.safetensors"

    memory = collect_params_memory(repo, env, PAPER_RANK)

    paper_arch = {"channels": [8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8], "kernel_size": 7, "latent_dim": 256,
                  "pad_multiple": 4096, "kl_weight": 0.005, "hidden_dim": None, "norm": "batch", "patch": 1}
    ours = dict(paper_arch, norm=cfg.cvae.norm, patch=cfg.cvae.patch,
                pad_multiple=cfg.cvae.pad_multiple or cfg.cvae.patch * 4096)
    if args.reuse and args.reuse_cvae:
        cvae = old["cvae"]
    else:
        print("scale: CVAE comparison at D of rank 8 (each in its own process)", flush=True)
        cvae = {"paper": cvae_probe(repo, env, paper_arch, args.cvae_steps),
                "ours": cvae_probe(repo, env, ours, args.cvae_steps)}
    if "ours_equal_time" not in cvae:  # the same rows for the wall time the paper's network took for its steps
        equal_time = round(args.cvae_steps * cvae["paper"]["step_seconds_median"] / cvae["ours"]["step_seconds_median"])
        print(f"scale: the scale profile's CVAE for {equal_time} steps (the paper's {args.cvae_steps} steps' time)",
              flush=True)
        cvae["ours_equal_time"] = cvae_probe(repo, env, ours, equal_time)
    cvae["paper"]["architecture"], cvae["ours"]["architecture"] = paper_arch, ours
    cvae["speedup_step"] = round(cvae["paper"]["step_seconds_median"] / cvae["ours"]["step_seconds_median"], 1)
    cvae["rss_ratio"] = round(cvae["ours"]["peak_rss_gb"] / cvae["paper"]["peak_rss_gb"], 2)
    cvae["reference_code"] = REFERENCE_CVAE

    store = PAPER_TASKS * PAPER_CHECKPOINTS * checkpoint_bytes
    replaced = PAPER_TASKS * final_bytes
    ours_generator = cvae["ours"]["bytes_fp32"]
    record = {
        "rev": rev,
        "pipeline_minutes": round(pipeline_seconds / 60, 1),
        "peak_rss_gb": max(s["peak_rss_gb"] for s in stages.values()),
        "stages": stages,
        "lora_dimension": dims,
        "collect_params_memory": memory,
        "lora_step_seconds": {r: round(s, 2) for r, s in step_seconds.items()},
        "generate_adapter_seconds": generate_timing,
        "cvae": cvae,
        "bytes": {"checkpoint_r8": checkpoint_bytes, "final_adapter_r8": final_bytes, "generator_r8_folder": generator_bytes,
                  "normalization_r8": normalization_bytes, "lora_matrix_r8": center_file.stat().st_size},
        "storage_at_paper_counts": {
            "tasks": PAPER_TASKS, "checkpoints_per_task": PAPER_CHECKPOINTS, "rank": PAPER_RANK,
            "checkpoint_store_bytes": store, "final_adapters_bytes": replaced, "generator_bytes": ours_generator,
            "generator_over_checkpoint_store": round(ours_generator / store, 4),
            "generator_over_final_adapters": round(ours_generator / replaced, 3),
            "generator_and_normalization_over_final_adapters": round((ours_generator + normalization_bytes) / replaced, 3),
            "paper_generator_over_final_adapters": round(cvae["paper"]["bytes_fp32"] / replaced, 3),
            "note": "generator = the CVAE's fp32 weights; generating also reads the normalization (mean, std per "
                    "tensor, plus the centre: one value per adapter value with cvae.normalization centered)",
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "bench_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)},
    }
    write_json(args.out, record)
    print(f"scale: pipeline {record['pipeline_minutes']} min, peak RSS {record['peak_rss_gb']} GiB; D(r8, reference) "
          f"{dims['reference']['8']:,}; CVAE step {cvae['ours']['step_seconds_median']:.2f} s vs paper's "
          f"{cvae['paper']['step_seconds_median']:.2f} s -> {args.out}" + (f"; clone kept at {repo}" if args.keep else ""))
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
