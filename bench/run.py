"""Benchmarks (not tests): time to generate one adapter vs to train one, and the generator at paper scale.

    make bench            # or: .venv/bin/python bench/run.py [--skip-paper-scale]

Needs a finished `dvc repro` (models/cvae, data/lora_matrix, data/task_vectors.safetensors,
metrics/lora). Writes metrics/bench.json:
- generate_adapter_seconds: median wall time of decode + de-normalize + write one PEFT folder,
  per rank and overall (the target: <= 1 s on a CPU);
- train_lora_seconds_median: from metrics/lora/<task>-s<seed>/r<rank>.json (measured by train_lora), and
  the speed-up generate vs train (target: >= 100x);
- paper_scale: the paper's CVAE (12 conv layers, latent 256) at D = 1,929,928 with a 768-d
  condition: parameters, bytes, seconds per decode on this machine (random weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from icmlora import artifacts  # noqa: E402
from icmlora.artifacts.generators import read_generator  # noqa: E402
from icmlora.artifacts.lora_matrix import read_manifest  # noqa: E402
from icmlora.artifacts.task_vectors import read_task_vectors  # noqa: E402
from icmlora.config import load_params  # noqa: E402
from icmlora.cvae import CVAE, PAPER_CHANNELS, CVAEArchitecture  # noqa: E402
from icmlora.files import write_json  # noqa: E402
from icmlora.stages.generate import latents  # noqa: E402


def time_generation(cfg, repeats: int) -> dict:
    vectors = read_task_vectors(ROOT / artifacts.TASK_VECTORS_FILE)
    per_rank = {}
    for rank in cfg.lora.ranks:
        gen = read_generator(rank, ROOT / artifacts.CVAE_DIR)
        manifest = read_manifest(rank, ROOT / artifacts.LORA_MATRIX_DIR)
        task = cfg.data.tasks[0]
        z = latents(cfg.seed, task, rank, repeats, gen.model.config.latent_dim)
        times = []
        with tempfile.TemporaryDirectory() as tmp:
            for name, zk in z.items():
                start = time.perf_counter()
                manifest.write_adapter(Path(tmp) / name, gen.sample(vectors[task], zk[None])[0])
                times.append(time.perf_counter() - start)
        per_rank[str(rank)] = {"median_seconds": statistics.median(times), "max_seconds": max(times),
                               "dim": manifest.dim, "generator_parameters": gen.model.num_parameters()}
    return per_rank


def paper_scale(repeats: int) -> dict:
    config = CVAEArchitecture(input_dim=1_929_928, condition_dim=768, channels=PAPER_CHANNELS, kernel_size=7,
                              latent_dim=256, pad_multiple=4096, kl_weight=0.005, hidden_dim=None, norm="group")
    model = CVAE(config).eval()
    z, cond = torch.randn(1, 256), torch.randn(1, 768)
    times = []
    with torch.inference_mode():
        model.decode(z, cond)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.decode(z, cond)
            times.append(time.perf_counter() - start)
    params = model.num_parameters()
    return {"input_dim": config.input_dim, "parameters": params, "bytes_fp32": params * 4,
            "decode_seconds_median": statistics.median(times)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-paper-scale", action="store_true")
    args = parser.parse_args()
    cfg = load_params(ROOT / "params.yaml")
    per_rank = time_generation(cfg, args.repeats)
    lora = [json.loads((ROOT / artifacts.lora_metrics_file(t, r, s)).read_text())["train_seconds"]
            for t in cfg.data.tasks for r in cfg.lora.ranks for s in cfg.lora.seeds]
    gen_median = statistics.median(r["median_seconds"] for r in per_rank.values())
    result = {
        "threads": torch.get_num_threads(),
        "generate_adapter_seconds": round(gen_median, 5),
        "generate_adapter_seconds_by_rank": per_rank,
        "train_lora_seconds_median": round(statistics.median(lora), 2) if lora else None,
        "speedup_generate_vs_train": round(statistics.median(lora) / gen_median, 1) if lora else None,
    }
    if not args.skip_paper_scale:
        result["paper_scale"] = paper_scale(3)
    write_json(ROOT / artifacts.METRICS_DIR / "bench.json", result)
    print(f"bench: wrote metrics/bench.json (generate one adapter {gen_median * 1000:.1f} ms; "
          f"train one LoRA {result['train_lora_seconds_median']} s; speed-up {result['speedup_generate_vs_train']}x)")
    return result


if __name__ == "__main__":
    main()
