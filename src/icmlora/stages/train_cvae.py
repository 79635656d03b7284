"""Stage `train_cvae`: one generator per rank over the adapters of all training tasks, of the kind
``cvae.kind`` picks (``icmlora.generators``: the paper's CVAE, ridge, hypernet, flow).

    python -m icmlora.stages.train_cvae --rank 4       # or: icmlora train_cvae --rank 4

Reads data/lora_matrix/r<rank>.* (normalized checkpoint rows) and data/task_vectors.safetensors;
rows of ``heldout_tasks`` are never seen. The condition is the task vector standardized by the
training tasks' vectors (``icmlora.cvae.Generator``: stored with the model, applied again at
generation). The trained kinds share one loop; ``ridge`` is solved in closed form (its lam by
leaving one training task out), with no epochs.

Writes models/cvae/r<rank>/ (``icmlora.artifacts.generators``) and metrics/cvae/r<rank>.csv
(epoch, loss, recon, kl). Resumable: the training state is saved in state/cvae/r<rank>/ every
``cvae.train.checkpoint_every`` epochs (``icmlora.resume``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from icmlora.artifacts import (
    CVAE_DIR,
    CVAE_METRICS_DIR,
    LORA_MATRIX_DIR,
    STATE_DIR,
    TASK_VECTORS_FILE,
    cvae_loss_file,
    cvae_state_dir,
    generator_dir,
    lora_manifest_file,
    lora_matrix_file,
)
from icmlora.artifacts.generators import write_generator
from icmlora.artifacts.lora_matrix import read_lora_matrix
from icmlora.artifacts.task_vectors import read_task_vectors
from icmlora.config import Params
from icmlora.cvae import Generator
from icmlora.errors import InputError
from icmlora.files import write_text
from icmlora.generators import build, noise_width, step_loss
from icmlora.generators.ridge import RidgeGenerator, fit_ridge_loto, task_targets
from icmlora.resume import TrainingState, content_digest, fingerprint
from icmlora.runtime import accelerate_params, make_accelerator, seed_everything, set_threads
from icmlora.stage_cli import require, run_stage, stage_parser
from icmlora.tracking import MetricBuffer, stage_params, start_run


def train_cvae(cfg: Params, rank: int, matrix_root: Path = LORA_MATRIX_DIR, vectors_file: Path = TASK_VECTORS_FILE,
               out_root: Path = CVAE_DIR, state_root: Path = STATE_DIR, metrics_dir: Path = CVAE_METRICS_DIR) -> dict:
    """Train and write one rank's generator; returns what it wrote ({} on processes other than rank 0)."""
    set_threads(cfg.runtime)
    seed = cfg.generator_seed()
    seed_everything(seed)
    matrix = read_lora_matrix(rank, matrix_root)
    vectors = read_task_vectors(vectors_file)
    tasks = matrix.tasks
    missing = [t for t in tasks if t not in vectors]
    if missing:
        raise InputError(f"{vectors_file}: no task vector for {missing}; re-run task_vectors")
    heldout = {tasks.index(t) for t in cfg.heldout_tasks if t in tasks}
    keep = torch.tensor([int(i) not in heldout for i in matrix.task_index])
    x = matrix.rows[keep]
    task_rows = matrix.task_index[keep]
    train_tasks = sorted({int(i) for i in task_rows})
    table = torch.stack([vectors[t] for t in tasks]).float()
    cond_mean, cond_scale = Generator.standardization(table[train_tasks])
    cond = (table[task_rows] - cond_mean) / cond_scale

    kind = cfg.cvae.kind
    if kind == "ridge":
        return _fit_ridge(cfg, rank, matrix, table, train_tasks, x, cond_mean, cond_scale, out_root, metrics_dir)
    model = build(cfg.cvae, matrix.manifest.dim, table.shape[1])
    shape, width = model.config, noise_width(kind, model)  # read before Accelerate wraps the model (DDP)
    accelerator = make_accelerator(cfg.runtime)
    hp = cfg.cvae.train
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, cond), batch_size=hp.batch_size,
                                         shuffle=True, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.epochs * len(loader))
    processes = accelerator.num_processes
    if processes == 1:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    else:
        # Every process reads the same batches (same seeded order) and trains on its own
        # contiguous rows of each: Accelerate would split by the nominal batch size and pad a short
        # last batch with repeated rows, which one process never sees.
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    inputs = content_digest(lora_matrix_file(rank, matrix_root), lora_manifest_file(rank, matrix_root), vectors_file)
    state = TrainingState(cvae_state_dir(rank, state_root),
                          fingerprint(cfg.cvae, cfg.runtime, seed, rank, cfg.heldout_tasks, inputs))
    start_epoch, history = 0, []
    if state.resumable():
        extra = state.load(accelerator.unwrap_model(model), optimizer, scheduler, generator)
        start_epoch, history = extra["epoch"], extra["history"]
    else:
        state.clear()
    run_params = {**stage_params(cfg, "train_cvae"), **accelerate_params(accelerator), "model": shape.to_json(),
                  "rank": rank, "rows": len(x)}
    with start_run("train_cvae", f"cvae-r{rank}", params=run_params,
                   rank=rank, source="generator", generator_kind=kind) as run:
        start = time.perf_counter()
        model.train()
        for epoch in tqdm(range(start_epoch, hp.epochs), desc=f"train_cvae r{rank}", unit="epoch",
                          initial=start_epoch, total=hp.epochs, disable=not accelerator.is_main_process):
            sums = torch.zeros(3)
            for xb, cb in loader:
                noise, weight = None, 1.0
                if processes > 1:
                    n, p = len(xb), accelerator.process_index
                    lo, hi = p * n // processes, (p + 1) * n // processes
                    # The batch's noise drawn alike in every process (same seed, same draws), and this
                    # process's rows of it: N processes draw what one process draws.
                    noise = torch.randn(n, width)[lo:hi] if hi > lo else torch.zeros(1, width)
                    # Losses are means over this process's rows and DDP averages the gradients: weight
                    # by the rows' share of the batch (a process without rows runs one at weight 0).
                    weight = processes * (hi - lo) / n
                    xb, cb = (xb[lo:hi], cb[lo:hi]) if hi > lo else (xb[:1], cb[:1])
                    xb, cb = xb.to(accelerator.device), cb.to(accelerator.device)
                total, rec, kl = step_loss(kind, model, accelerator.unwrap_model(model), xb, cb, noise)
                optimizer.zero_grad()
                accelerator.backward(total * weight if processes > 1 else total)
                optimizer.step()
                scheduler.step()
                rows = (hi - lo) if processes > 1 else len(xb)
                sums += torch.tensor([total.item(), rec.item(), kl.item()]) * rows
            if processes > 1:  # each process saw its rows of every batch
                sums = accelerator.reduce(sums, reduction="sum")
            loss, rec, kl = (sums / len(x)).tolist()
            history.append({"epoch": epoch + 1, "loss": loss, "recon": rec, "kl": kl})
            if (epoch + 1) % hp.checkpoint_every == 0 and epoch + 1 < hp.epochs and accelerator.is_main_process:
                state.save(accelerator.unwrap_model(model), optimizer, scheduler, generator,
                           epoch=epoch + 1, history=history)
        seconds = time.perf_counter() - start
        if not accelerator.is_main_process:
            return {}
        model = accelerator.unwrap_model(model).eval()
        meta = {"rank": rank, "kind": kind, "model": shape.to_json(), "tasks": tasks, "train_tasks": [tasks[i] for i in train_tasks],
                "holdout": list(cfg.heldout_tasks), "rows": len(x), "parameters": model.num_parameters(),
                "task_vector_method": cfg.task_vectors.method}
        folder = write_generator(rank, Generator(model, cond_mean, cond_scale, meta), out_root)
        csv = "epoch,loss,recon,kl\n" + "".join(f"{h['epoch']},{h['loss']:.6f},{h['recon']:.6f},{h['kl']:.6f}\n"
                                                for h in history)
        write_text(cvae_loss_file(rank, metrics_dir), csv)
        buffer = MetricBuffer(run)
        for h in history:
            for key in ("loss", "recon", "kl"):
                buffer.add(key, h[key], h["epoch"])
        buffer.flush()
        run.set_tag("generator_dir", str(folder))
        run.log_metrics({"train_seconds": seconds, "parameters": model.num_parameters(),
                         "final_recon": history[-1]["recon"]})
        run.log_artifacts(str(folder), artifact_path="generator")
    state.clear()
    return {**meta, "train_seconds": round(seconds, 2), "epochs_run": hp.epochs - start_epoch, "final": history[-1]}


def _fit_ridge(cfg: Params, rank: int, matrix, table: torch.Tensor, train_tasks: list[int], x: torch.Tensor,
               cond_mean: torch.Tensor, cond_scale: torch.Tensor, out_root: Path, metrics_dir: Path) -> dict:
    """``cvae.kind: ridge``: the closed-form map on the training tasks' mean rows, lam by leaving one
    training task out among them (``icmlora.generators.ridge``); no epochs, so the loss file holds
    its header alone and the run logs lam and the leave-one-task-out scores."""
    tasks = matrix.tasks
    start = time.perf_counter()
    fitted, scores = fit_ridge_loto(table[train_tasks], task_targets(matrix.rows, matrix.task_index, train_tasks))
    seconds = time.perf_counter() - start
    model = RidgeGenerator.from_map(fitted)
    run_params = {**stage_params(cfg, "train_cvae"), "model": model.config.to_json(), "rank": rank, "rows": len(x)}
    meta = {"rank": rank, "kind": "ridge", "model": model.config.to_json(), "tasks": tasks,
            "train_tasks": [tasks[i] for i in train_tasks], "holdout": list(cfg.heldout_tasks), "rows": len(x),
            "parameters": model.num_parameters(), "task_vector_method": cfg.task_vectors.method,
            "loto_cosine": {f"{c:.3g}": round(v, 6) for c, v in scores.items()}}
    with start_run("train_cvae", f"cvae-r{rank}", params=run_params, rank=rank, source="generator",
                   generator_kind="ridge") as run:
        folder = write_generator(rank, Generator(model, cond_mean, cond_scale, meta), out_root)
        write_text(cvae_loss_file(rank, metrics_dir), "epoch,loss,recon,kl\n")
        run.set_tag("generator_dir", str(folder))
        run.log_metrics({"train_seconds": seconds, "parameters": model.num_parameters(), "lam": fitted.lam})
        run.log_artifacts(str(folder), artifact_path="generator")
    return {**meta, "train_seconds": round(seconds, 2), "epochs_run": 0, "final": {"lam": fitted.lam}}


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("train_cvae", __doc__)
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank, from lora.ranks")
    args, cfg = parser.parse(argv)
    require(args.rank, cfg.lora.ranks, "--rank", "lora.ranks")
    out = train_cvae(cfg, args.rank)
    if out:
        final = ", ".join(f"final {k} {v:.4g}" for k, v in out["final"].items() if k in ("recon", "kl", "lam"))
        print(f"train_cvae: wrote {generator_dir(args.rank)} (kind {out['kind']}, {out['parameters']:,} parameters, "
              f"{out['rows']} rows of {len(out['train_tasks'])} tasks, {out['train_seconds']:.0f} s, {final}) "
              f"and {cvae_loss_file(args.rank)}")
    return out


if __name__ == "__main__":
    run_stage(main)
