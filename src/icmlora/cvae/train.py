"""Stage `train_cvae`: one generator per rank over the adapters of all training tasks.

    python -m icmlora train_cvae --rank 4

Reads data/params/r<rank>.safetensors (normalized checkpoint rows) and
data/task_vectors.safetensors; rows of ``generator.holdout`` tasks are never seen. The
condition is the task vector, standardized by the mean and spread of the training tasks'
vectors (stored with the model, applied again at generation): raw hidden-state summaries
of different tasks differ by little compared with their shared component.

Writes models/cvae/r<rank>/{model.safetensors, config.json} (the JSON rebuilds the model)
and metrics/cvae/r<rank>.csv (epoch, loss, recon, kl). Resumable: the training state is saved
(safetensors + JSON) in state/cvae/r<rank>/ every ``cvae.checkpoint_every`` epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from icmlora.config import Config, load_config
from icmlora.cvae.model import CVAE, CVAEConfig, default_channels
from icmlora.errors import InputError
from icmlora.files import atomic_dir, read_json, write_json, write_text
from icmlora.params import PARAMS_DIR, load_params
import icmlora.resume as resume
from icmlora.task_vectors import OUT_FILE as TASK_VECTORS_FILE
from icmlora.task_vectors import load_task_vectors
from icmlora.tracking import start_run
from icmlora.training import make_accelerator, seed_everything, set_threads

CVAE_DIR = Path("models/cvae")
STATE_DIR = Path("state/cvae")
METRICS_DIR = Path("metrics/cvae")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def model_config(cfg: Config, dim: int, condition_dim: int) -> CVAEConfig:
    p = cfg.cvae
    channels = p.channels or default_channels(dim, p.max_layers)
    return CVAEConfig(
        input_dim=dim, condition_dim=condition_dim, channels=channels, kernel_size=p.kernel_size,
        latent_dim=p.latent_dim, hidden_dim=p.hidden_dim or None, pad_multiple=p.pad_multiple or 2 ** len(channels),
        kl_weight=p.kl_weight, norm=p.norm,
    )


class Generator:
    """A trained CVAE + the condition standardization: task vector -> normalized adapter row."""

    def __init__(self, model: CVAE, cond_mean: torch.Tensor, cond_scale: torch.Tensor, meta: dict):
        self.model, self.cond_mean, self.cond_scale, self.meta = model.eval(), cond_mean, cond_scale, meta

    def condition(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors.float() - self.cond_mean) / self.cond_scale

    @torch.no_grad()
    def sample(self, vector: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Normalized adapter rows [len(z), D] for one task vector."""
        cond = self.condition(vector.reshape(1, -1)).expand(len(z), -1)
        return self.model.decode(z, cond)

    @classmethod
    def load(cls, folder: Path) -> "Generator":
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise InputError(f"{folder}: no generator here (run `dvc repro train_cvae`)")
        meta = read_json(folder / CONFIG_FILE)
        model = CVAE(CVAEConfig.from_json(meta["model"]))
        tensors = load_file(str(folder / WEIGHTS_FILE))
        cond_mean, cond_scale = tensors.pop("condition.mean"), tensors.pop("condition.scale")
        model.load_state_dict(tensors)
        return cls(model, cond_mean, cond_scale, meta)


def _fingerprint(cfg: Config, rank: int, rows: int) -> str:
    blob = json.dumps([dataclasses.asdict(cfg.cvae), cfg.seed, rank, rows, cfg.generator.holdout], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_cvae(cfg: Config, rank: int, params_dir: Path = PARAMS_DIR, vectors_file: Path = TASK_VECTORS_FILE,
               out_root: Path = CVAE_DIR, state_root: Path = STATE_DIR, metrics_dir: Path = METRICS_DIR) -> dict:
    set_threads(cfg.runtime)
    seed_everything(cfg.seed)
    tensors, manifest = load_params(rank, params_dir)
    vectors = load_task_vectors(vectors_file)
    tasks = manifest.data["tasks"]
    missing = [t for t in tasks if t not in vectors]
    if missing:
        raise InputError(f"{vectors_file}: no task vector for {missing}; re-run task_vectors")
    holdout = {tasks.index(t) for t in cfg.generator.holdout if t in tasks}
    keep = torch.tensor([int(i) not in holdout for i in tensors["task_index"]])
    x = tensors["params"][keep]
    task_rows = tensors["task_index"][keep]
    train_tasks = sorted({int(i) for i in task_rows})
    table = torch.stack([vectors[t] for t in tasks]).float()
    cond_mean = table[train_tasks].mean(0)
    cond_scale = (table[train_tasks] - cond_mean).std().clamp_min(1e-8).expand_as(cond_mean).clone()
    cond = (table[task_rows] - cond_mean) / cond_scale

    mconf = model_config(cfg, manifest.dim, table.shape[1])
    model = CVAE(mconf)
    accelerator = make_accelerator(cfg.runtime)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, cond), batch_size=cfg.cvae.batch_size,
                                         shuffle=True, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.cvae.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.cvae.epochs * len(loader))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    state = state_root / f"r{rank}"
    fingerprint = _fingerprint(cfg, rank, len(x))
    start_epoch, history = 0, []
    try:
        saved = json.loads((state / "state.json").read_text())["extra"]
    except (OSError, ValueError, KeyError):
        saved = {}
    if saved.get("fingerprint") == fingerprint:
        extra = resume.load_training_state(state, accelerator.unwrap_model(model), optimizer, scheduler, generator)
        start_epoch, history = extra["epoch"], extra["history"]
    else:
        shutil.rmtree(state, ignore_errors=True)
    name = f"cvae-r{rank}"
    with start_run("train_cvae", name, params={"cvae": cfg.cvae, "model": mconf.to_json(), "rank": rank,
                                               "rows": len(x), "holdout": cfg.generator.holdout},
                   rank=rank, source="generator") as mlflow:
        start = time.perf_counter()
        model.train()
        for epoch in tqdm(range(start_epoch, cfg.cvae.epochs), desc=f"train_cvae r{rank}", unit="epoch",
                          initial=start_epoch, total=cfg.cvae.epochs, disable=not accelerator.is_main_process):
            sums = torch.zeros(3)
            for xb, cb in loader:
                recon, mu, logvar = model(xb, cb)
                total, rec, kl = accelerator.unwrap_model(model).loss(xb, recon, mu, logvar)
                optimizer.zero_grad()
                accelerator.backward(total)
                optimizer.step()
                scheduler.step()
                sums += torch.tensor([total.item(), rec.item(), kl.item()]) * len(xb)
            loss, rec, kl = (sums / len(x)).tolist()
            history.append({"epoch": epoch + 1, "loss": loss, "recon": rec, "kl": kl})
            if (epoch + 1) % cfg.cvae.checkpoint_every == 0 and epoch + 1 < cfg.cvae.epochs and accelerator.is_main_process:
                resume.save_training_state(state, accelerator.unwrap_model(model), optimizer, scheduler, generator,
                                    {"fingerprint": fingerprint, "epoch": epoch + 1, "history": history})
        seconds = time.perf_counter() - start
        if not accelerator.is_main_process:
            return {}
        model = accelerator.unwrap_model(model).eval()
        meta = {"rank": rank, "model": mconf.to_json(), "tasks": tasks, "train_tasks": [tasks[i] for i in train_tasks],
                "holdout": list(cfg.generator.holdout), "rows": len(x), "parameters": model.num_parameters(),
                "task_vector_method": cfg.task_vectors.method}
        with atomic_dir(out_root / f"r{rank}") as tmp:
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            weights.update({"condition.mean": cond_mean.contiguous(), "condition.scale": cond_scale.contiguous()})
            save_file(weights, str(tmp / WEIGHTS_FILE))
            write_json(tmp / CONFIG_FILE, meta)
        csv = "epoch,loss,recon,kl\n" + "".join(f"{h['epoch']},{h['loss']:.6f},{h['recon']:.6f},{h['kl']:.6f}\n" for h in history)
        write_text(metrics_dir / f"r{rank}.csv", csv)
        client_metrics = [("loss", "loss"), ("recon", "recon"), ("kl", "kl")]
        from icmlora.tracking import MetricBuffer

        buffer = MetricBuffer()
        for h in history:
            for key, col in client_metrics:
                buffer.add(key, h[col], h["epoch"])
        buffer.flush()
        # The run id stays out of config.json: a DVC output must not change from run to run.
        mlflow.set_tag("generator_dir", str(out_root / f"r{rank}"))
        mlflow.log_metrics({"train_seconds": seconds, "parameters": model.num_parameters(), "final_recon": history[-1]["recon"]})
        mlflow.log_artifacts(str(out_root / f"r{rank}"), artifact_path="generator")
    shutil.rmtree(state, ignore_errors=True)
    return {**meta, "train_seconds": round(seconds, 2), "final": history[-1]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="icmlora train_cvae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    out = train_cvae(cfg, args.rank)
    if out:
        print(f"train_cvae: wrote {CVAE_DIR}/r{args.rank} ({out['parameters']:,} parameters, {out['rows']} rows of "
              f"{len(out['train_tasks'])} tasks, {out['train_seconds']:.0f} s, final recon {out['final']['recon']:.4f}) "
              f"and {METRICS_DIR}/r{args.rank}.csv")
    return out
