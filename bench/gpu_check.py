"""GPU check (not a test): the pipeline on CUDA, ready to run on any GPU machine.

    bash bench/gpu_check.sh          # = .venv/bin/python bench/gpu_check.py

1. the micro pipeline (profiles/micro.yaml) with runtime.mixed_precision bf16 on one GPU: `dvc repro`
   in a clone, each stage's seconds and peak GPU memory, base / LoRA / generated mAP50;
2. with 2 or more GPUs: train_lora of one task in 2 processes (`accelerate launch --multi_gpu
   --num_processes 2 -m`), against the 1-GPU run's metrics;
3. the scale profile (Florence-2-base's shape, the paper's D) in bf16: prepare, base_model,
   train_lora, collect_params and train_cvae, each stage's seconds and peak GPU memory, seconds
   per LoRA step and CVAE training seconds.
Prints a table and writes metrics/gpu_check.json. On a machine without a CUDA GPU it says so and
exits with status 2 (no traceback).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class GpuMemory:
    """Peak used memory (MiB) over all GPUs, polled with nvidia-smi while a command runs."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak = max(self.peak, sum(int(v) for v in out.split() if v.strip().isdigit()))
            except (OSError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def clone(tmp: Path, name: str) -> Path:
    repo = tmp / name
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True)
    return repo


def staged_repro(repo: Path, env: dict, targets: list[str] | None = None) -> dict:
    """`dvc repro` stage by stage: {stage: {seconds, peak_gpu_mib}}."""
    names = [line.split()[0] for line in subprocess.check_output(
        [sys.executable, "-m", "dvc", "stage", "list"], cwd=repo, env=env, text=True).splitlines() if line.strip()]
    if targets:
        names = [n for n in names if n.split("@")[0] in targets]
    out = {}
    for name in names:
        start = time.perf_counter()
        with GpuMemory() as mem:
            proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", name], cwd=repo, env=env)
        if proc.returncode:
            raise SystemExit(f"gpu_check: `dvc repro -s {name}` failed in {repo} (exit {proc.returncode})")
        out[name] = {"seconds": round(time.perf_counter() - start, 1), "peak_gpu_mib": mem.peak}
    return out


def read(path: Path):
    return json.loads(path.read_text())


def main() -> int:
    n = gpus()
    if not n:
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check on this machine. "
              "Run it where `nvidia-smi` lists a GPU.", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_TRACKING_URI", None)
    icmlora = [sys.executable, "-m", "icmlora"]
    record: dict = {"gpus": n, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    import torch

    record["machine"]["gpu"] = torch.cuda.get_device_name(0)
    bf16 = tmp / "bf16.yaml"
    bf16.write_text('runtime:\n  mixed_precision: bf16\n  launcher: python -m\n')

    micro = clone(tmp, "micro")
    for profile in ("micro", str(bf16)):
        subprocess.run([*icmlora, "profile", profile], cwd=micro, env=env, check=True)
    stages = staged_repro(micro, env)
    lora = [read(p) for p in sorted((micro / "metrics" / "lora").rglob("r*.json"))]
    summary = read(micro / "metrics" / "summary.json")
    record["micro_bf16_1gpu"] = {
        "stages": stages, "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1),
        "base_map50": read(micro / "metrics" / "base_model.json")["map50"],
        "lora_map50_median": statistics.median(m["map50"] for m in lora),
        "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
    }
    if n >= 2:
        task = lora[0]["task"]
        env2 = dict(env)
        start = time.perf_counter()
        with GpuMemory() as mem:
            subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m",
                            "icmlora.stages.train_lora", "--task", task], cwd=micro, env=env2, check=True)
        two = [read(p) for p in sorted((micro / "metrics" / "lora" / f"{task}-s0").glob("r*.json"))]
        one = [m for m in lora if m["task"] == task]
        record["micro_train_lora_2gpu"] = {"task": task, "seconds": round(time.perf_counter() - start, 1),
                                           "peak_gpu_mib": mem.peak,
                                           "map50_1gpu": [m["map50"] for m in one], "map50_2gpu": [m["map50"] for m in two]}

    scale = clone(tmp, "scale")
    subprocess.run([*icmlora, "synth-voc", "data/scale-voc/VOC2012", "--tasks", "dog", "cat"], cwd=scale, env=env, check=True)
    for profile in ("scale", str(bf16)):
        subprocess.run([*icmlora, "profile", profile], cwd=scale, env=env, check=True)
    stages = staged_repro(scale, env, ["prepare", "base_model", "train_lora", "collect_params", "task_vectors",
                                       "train_cvae"])
    lora = [read(p) for p in sorted((scale / "metrics" / "lora").rglob("r*.json"))]
    record["scale_bf16_1gpu"] = {
        "stages": stages,
        "lora_step_seconds": {str(m["rank"]): round(m["train_seconds"] / m["train_steps"], 3) for m in lora},
    }

    rows = [(f"micro {k}", v["seconds"], v["peak_gpu_mib"]) for k, v in record["micro_bf16_1gpu"]["stages"].items()]
    rows += [(f"scale {k}", v["seconds"], v["peak_gpu_mib"]) for k, v in stages.items()]
    print(f"\n{'stage':40} {'seconds':>9} {'peak GPU MiB':>13}")
    for name, sec, mib in rows:
        print(f"{name:40} {sec:9.1f} {mib:13d}")
    m = record["micro_bf16_1gpu"]
    print(f"micro bf16: base mAP50 {m['base_map50']:.3f}, LoRA mAP50 median {m['lora_map50_median']:.3f}")
    sys.path.insert(0, str(ROOT / "src"))
    from icmlora.files import write_json

    write_json(ROOT / "metrics" / "gpu_check.json", record)
    print(f"gpu_check: wrote {ROOT / 'metrics' / 'gpu_check.json'} (clones under {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
