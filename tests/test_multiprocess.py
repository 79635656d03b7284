"""Training stages in 2 CPU processes (torchrun + gloo: Accelerate's MULTI_CPU), as users run them
on several GPUs, and bf16 on CPU.

Each test works in a clone of the micro pipeline (one process, committed outputs) and runs stage
commands with the launcher that params.yaml documents for N CPU processes:
``env ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 -m``.

Tolerance of "2 processes = 1 process": ``batch_size`` is the global batch (each process trains
on its rows of every batch), the detection loss is weighted by each part's target tokens, the
CVAE's loss by each part's rows and its noise is drawn for the whole batch, so both runs compute
the same gradients up to floating-point summation order (two partial sums all-reduced instead of
one sum): losses agree to ~1e-7 relative. Adam divides each step by the gradient's running
magnitude, so where a gradient is ~0 it turns that float noise into steps of ~lr: the attention
key biases (whose gradient is 0 in exact arithmetic: softmax ignores a shift shared by all keys)
and CVAE encoder weights (a weak gradient through the KL term) then drift apart by a fraction of
their spread. So weights are compared where gradients carry signal (LoRA: every value within 1e-4
of the tensor's spread; base: every tensor but the key biases within 1e-4 relative norm), and
models by what they compute: per-step losses, detection metrics, generated rows.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch
from e2e_helpers import BIN, clone_sharing_cache, run
from safetensors.torch import load_file
from spread import within

from icmlora.artifacts.generators import read_generator
from icmlora.artifacts.task_vectors import read_task_vectors
from icmlora.config import load_params
from icmlora.profile import apply_profile

pytestmark = [pytest.mark.slow, pytest.mark.long]

TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m"]
LAUNCHER = "env ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 -m"  # as params.yaml documents it


@pytest.fixture(scope="module")
def env(e2e_env) -> dict:
    return dict(e2e_env, ACCELERATE_USE_CPU="true")


def listing(root: Path) -> set[str]:
    # state/tracking/: the tracking spool's map of run ids (icmlora.spool), kept on purpose for later
    # processes; no output and no training state
    skip = (".git/", ".dvc/tmp/", "mlflow.db", "mlflow-artifacts/", ".dvc/cache/", "state/tracking/")
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and not p.relative_to(root).as_posix().startswith(skip)}


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float,
          name: str = "multiprocess.lora_tensor_over_spread") -> float:
    """Largest difference over the tensors' spread; asserts the names and shapes agree."""
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype == torch.float32
        spread = float(a[key].std()) or 1.0
        worst = max(worst, float((a[key] - b[key]).abs().max()) / spread)
    assert within(name, worst, rel), worst
    return worst


def runs(db: Path) -> list[dict]:
    with sqlite3.connect(db) as conn:
        out = {rid: {"run_id": rid} for (rid,) in conn.execute("select run_uuid from runs")}
        for rid, key, value in conn.execute("select run_uuid, key, value from tags"):
            out[rid][key] = value
        for rid, key, value in conn.execute("select run_uuid, key, value from params"):
            out[rid][f"param:{key}"] = value
    return list(out.values())


@pytest.fixture(scope="module")
def two(micro_pipeline, tmp_path_factory, env):
    """The micro pipeline's clone after train_lora@circle, train_cvae@2 and base_model ran again in
    2 processes (same inputs as the 1-process run: base_model goes last); and its files before."""
    clone = clone_sharing_cache(micro_pipeline, tmp_path_factory.mktemp("two") / "repo", env)
    before = listing(clone)
    # LoRA dropout draws its masks in each process from that process's generator: with dropout,
    # N processes are another random draw of the same training, not the same numbers. Compared
    # without it, in one process then in two.
    params = (clone / "params.yaml").read_text().replace("  dropout: 0.05\n", "  dropout: 0.0\n", 1)
    assert "  dropout: 0.0\n" in params
    (clone / "params.yaml").write_text(params)
    one_env = {k: v for k, v in env.items() if k != "ACCELERATE_USE_CPU"}
    run([BIN / "python", "-m", "icmlora.stages.train_lora", "--task", "circle", "--seed", "0"], clone, one_env)
    one = clone.parent / "one"
    shutil.copytree(clone / "models" / "lora" / "circle-s0", one / "models" / "lora" / "circle-s0")
    shutil.copytree(clone / "metrics" / "lora" / "circle-s0", one / "metrics" / "lora" / "circle-s0")
    # train_lora through DVC with the documented launcher in params.yaml; the others by hand
    (clone / "params.yaml").write_text(params.replace("  launcher: python -m ", f"  launcher: {LAUNCHER} ", 1))
    assert LAUNCHER in (clone / "params.yaml").read_text()
    proc = run([BIN / "dvc", "repro", "--force", "--single-item", "train_lora@circle-0"], clone, env)
    logs = {"train_lora": proc.stdout + proc.stderr}
    for name, args in (("train_cvae", ["--rank", "2"]), ("base_model", [])):
        proc = run([*TORCHRUN, f"icmlora.stages.{name}", *args], clone, env)
        logs[name] = proc.stdout + proc.stderr
    return clone, before, logs, one


def test_two_processes_train_what_one_process_trains(two, micro_pipeline):
    clone, _, logs, one_run = two
    for name in ("train_lora", "train_cvae", "base_model"):
        seen = r"accelerate: 2 process\(es\), MULTI_CPU, device cpu(:\d+)?, mixed precision no"
        assert re.search(seen, logs[name]), logs[name][-2000:]
    for rank in (1, 2):
        one, two_ = (root / "models" / "lora" / "circle-s0" / f"r{rank}" for root in (one_run, clone))
        assert sorted(p.name for p in (two_ / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
        close(load_file(one / "final" / "adapter_model.safetensors"),
              load_file(two_ / "final" / "adapter_model.safetensors"), rel=1e-4)
        m1, m2 = (json.loads((root / "metrics" / "lora" / "circle-s0" / f"r{rank}.json").read_text())
                  for root in (one_run, clone))
        # scored once, on process 0, from weights that agree to 1e-4: the same detections
        timing = ("train_seconds", "eval_seconds", "pass_seconds")
        assert {k: v for k, v in m1.items() if k not in timing} == {k: v for k, v in m2.items() if k not in timing}
    # CVAE: the same per-epoch losses, and the same generated rows
    h1, h2 = (list(csv.DictReader((root / "metrics" / "cvae" / "r2.csv").open())) for root in (micro_pipeline, clone))
    # (the KL term comes from the encoder, whose weights drift: measured up to 2.8 %; loss and
    # reconstruction ~1e-5)
    tolerance = {"loss": 1e-4, "recon": 1e-4, "kl": 5e-2}
    assert len(h1) == len(h2)
    for k, tol in tolerance.items():
        gap = max(abs(float(a[k]) - float(b[k])) / (abs(float(a[k])) + 1e-6 / tol) for a, b in zip(h1, h2))
        assert within(f"multiprocess.cvae_{k}_relative", gap, tol), (k, h1[-1], h2[-1])
    g1, g2 = (read_generator(2, root / "models" / "cvae") for root in (micro_pipeline, clone))
    vectors = read_task_vectors(clone / "data" / "task_vectors.safetensors")
    for vector in vectors.values():
        z = torch.zeros(1, g1.model.config.latent_dim)
        r1, r2 = g1.sample(vector, z), g2.sample(vector, z)
        assert within("multiprocess.cvae_row_relative", float((r1 - r2).norm() / r1.norm()), 1e-2)  # measured ~5e-4
    # base: the same per-step losses and detection metrics; weights where gradients carry signal
    l1, l2 = ((root / "metrics" / "base_model_loss.csv").read_text().splitlines()[1:] for root in (micro_pipeline, clone))
    assert [round(float(a.split(",")[1]), 4) for a in l1] == [round(float(b.split(",")[1]), 4) for b in l2]
    w1, w2 = (load_file(root / "models" / "base" / "model.safetensors") for root in (micro_pipeline, clone))
    assert w1.keys() == w2.keys()
    drift = {k: float((w1[k] - w2[k]).norm() / (w1[k].norm() or 1)) for k in w1}
    worst = max(d for k, d in drift.items() if not k.endswith("k_proj.bias"))
    assert within("multiprocess.base_relative_norm", worst, 1e-4), max(drift.items(), key=lambda kv: kv[1])
    b1, b2 = (json.loads((root / "metrics" / "base_model.json").read_text()) for root in (micro_pipeline, clone))
    assert b1 == b2


def test_two_processes_write_one_set_of_outputs_and_one_run_per_model(two):
    clone, before, _, _ = two
    assert listing(clone) == before  # the same files, replaced: no extra file from process 1, no state left
    assert not any(p for p in (clone / "state").rglob("*.json") if "tracking" not in p.relative_to(clone / "state").parts)
    logged = runs(clone / "mlflow.db")
    by_stage: dict[str, list[dict]] = {}
    for r in logged:
        by_stage.setdefault(r.get("stage"), []).append(r)
    two_ = [r for r in logged if r.get("param:accelerate.num_processes") == "2"]
    assert all(r["param:accelerate.distributed_type"] == "MULTI_CPU" for r in two_)
    # one run per adapter (the 1-process reference run of train_lora logged its own, with "1")
    adapters = [r for r in by_stage["train_lora"] if r.get("rank")]
    for processes in ("1", "2"):
        assert sorted(r["rank"] for r in adapters if r.get("param:accelerate.num_processes") == processes) == ["1", "2"]
    assert len([r for r in by_stage["train_cvae"] if r.get("rank") == "2"]) == 1
    assert len(by_stage["base_model"]) == 1
    assert {r["stage"] for r in two_} == {"train_lora", "train_cvae", "base_model"}


def worker(parent: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ) and ppid == parent:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} under {parent}")


def test_a_killed_worker_fails_the_stage_and_a_rerun_resumes_in_two_processes(micro_pipeline, tmp_path, env):
    clone = clone_sharing_cache(micro_pipeline, tmp_path / "repo", env)
    longer = tmp_path / "longer.yaml"  # enough steps to kill a worker mid-run
    longer.write_text("lora:\n  train:\n    steps: 40\n")
    apply_profile(clone / "params.yaml", longer)
    assert load_params(clone / "params.yaml").lora.train.steps == 40
    cmd = [*TORCHRUN, "icmlora.stages.train_lora", "--task", "circle", "--seed", "0"]
    # the ranks train together (runtime.lora_batch: 0): one training state for both
    state = clone / "state" / "lora" / "circle-r1+2-s0" / "train" / "state.json"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(cmd, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not (state.is_file() and json.loads(state.read_text())["extra"]["step"] >= 4):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    os.kill(worker(proc.pid, 1), signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    log.close()
    output = (tmp_path / "killed.log").read_text()
    assert "ChildFailedError" in output and "rank      : 1" in output.replace("rank:", "rank      :") \
        or "Signal 9 (SIGKILL)" in output, output[-3000:]
    saved = json.loads(state.read_text())["extra"]["step"]
    assert saved >= 4
    # nothing half-written: the outputs are still those of the 1-process run
    assert json.loads((clone / "metrics" / "lora" / "circle-s0" / "r1.json").read_text())["train_steps"] == 6

    proc = run(cmd, clone, env)
    for rank in (1, 2):
        out = clone / "models" / "lora" / "circle-s0" / f"r{rank}"
        assert sorted(p.name for p in (out / "checkpoints").iterdir())[-3:] == ["step-36", "step-38", "step-40"]
        assert json.loads((clone / "metrics" / "lora" / "circle-s0" / f"r{rank}.json").read_text())["train_steps"] == 40
    assert not state.exists()
    # the resumed rank-1 run logged only the steps after the saved state
    with sqlite3.connect(clone / "mlflow.db") as conn:
        steps = [s for (s,) in conn.execute(
            "select m.step from metrics m join tags t on t.run_uuid = m.run_uuid and t.key = 'rank' and t.value = '1' "
            "where m.key = 'train_loss' order by m.step")]
    assert steps and steps[0] == saved + 1 and steps[-1] == 40 and len(steps) == 40 - saved, steps


def test_bf16_on_cpu_trains_and_scores_and_saves_float32(micro_pipeline, tmp_path, env):
    """runtime.mixed_precision: bf16 autocasts training (LoRA, CVAE) on CPU; adapters, flattened
    parameters and generators are saved in float32, and scoring runs in float32."""
    clone = clone_sharing_cache(micro_pipeline, tmp_path / "repo", env)
    params = (clone / "params.yaml").read_text()
    (clone / "params.yaml").write_text(params.replace('mixed_precision: "no"', "mixed_precision: bf16", 1))
    one = dict(env)
    one.pop("ACCELERATE_USE_CPU")
    logs = ""
    for cmd in (["train_lora", "--task", "circle"], ["collect_params", "--rank", "2"], ["train_cvae", "--rank", "2"],
                ["generate"], ["evaluate"]):
        proc = run([str(BIN / "python"), "-m", f"icmlora.stages.{cmd[0]}", *cmd[1:]], clone, one)
        logs += proc.stdout
    assert logs.count("mixed precision bf16") == 2  # the two training stages
    adapter = load_file(clone / "models" / "lora" / "circle-s0" / "r2" / "final" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in adapter.values())
    trained_bf16 = json.loads((clone / "metrics" / "lora" / "circle-s0" / "r2.json").read_text())
    assert trained_bf16["train_steps"] == 6 and "map50" in trained_bf16
    assert {t.dtype for t in load_file(clone / "data" / "lora_matrix" / "r2.safetensors").values()} <= {
        torch.float32, torch.int64}
    assert {t.dtype for t in load_file(clone / "models" / "cvae" / "r2" / "model.safetensors").values()} == {torch.float32}
    evaluation = json.loads((clone / "metrics" / "evaluate.json").read_text())
    assert evaluation


def test_after_bf16_training_scoring_runs_in_float32(setting, tmp_path, monkeypatch):
    """runtime.mixed_precision: bf16 on CPU: every prediction train_lora scores with (the base's and
    each rank's) runs on float32 weights with autocast off, so figures compare across precisions."""
    from icmlora import scoring
    from icmlora.stages.train_lora import train_lora

    cfg, root, _ = setting
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"mixed_precision": "bf16"})})
    seen = []
    real = scoring.predict

    def recording(model, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), {p.dtype for p in model.parameters()}))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(scoring, "predict", recording)
    train_lora(cfg, "circle", 0, root / "prepared", root / "base", tmp_path / "lora", tmp_path / "state",
               tmp_path / "metrics")
    assert len(seen) >= 3  # the base, rank 1, rank 2
    assert seen == [(False, {torch.float32})] * len(seen)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_agents(stage: str, args: list[str], cwd: Path, env: dict) -> str:
    """``stage`` as two torchrun agents on 127.0.0.1 (``--nnodes 2``, ``--node_rank`` 0 and 1, one
    process each, c10d rendezvous; agent 0 hosts it), the way two machines sharing a filesystem
    run it; both must succeed. Returns their output."""
    port, rdzv_id = free_port(), f"icmlora-{os.getpid()}-{stage}"
    procs = []
    for node in (0, 1):
        cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", rdzv_id,
               "--rdzv_conf", f"is_host={'true' if node == 0 else 'false'}", "-m", f"icmlora.stages.{stage}", *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    return "\n".join(outs)


def test_two_machines_train_what_one_process_trains(micro_pipeline, tmp_path, env):
    """Two torchrun agents (--nnodes 2, c10d rendezvous on 127.0.0.1, one process each) train
    train_lora and base_model as one process does, within the 2-process tolerances above; process 0
    alone writes the outputs and logs one MLflow run per adapter."""
    clone = clone_sharing_cache(micro_pipeline, tmp_path / "repo", env)
    before = listing(clone)
    params = (clone / "params.yaml").read_text().replace("  dropout: 0.05\n", "  dropout: 0.0\n", 1)
    (clone / "params.yaml").write_text(params)
    one_env = {k: v for k, v in env.items() if k != "ACCELERATE_USE_CPU"}
    run([BIN / "python", "-m", "icmlora.stages.train_lora", "--task", "circle", "--seed", "0"], clone, one_env)
    one = {rank: (load_file(clone / "models" / "lora" / "circle-s0" / f"r{rank}" / "final" / "adapter_model.safetensors"),
                  json.loads((clone / "metrics" / "lora" / "circle-s0" / f"r{rank}.json").read_text())) for rank in (1, 2)}

    logs = two_agents("train_lora", ["--task", "circle", "--seed", "0"], clone, env)
    assert len(re.findall(r"accelerate: 2 process\(es\), MULTI_CPU", logs)) == 1, logs[-3000:]  # printed by process 0
    timing = ("train_seconds", "eval_seconds", "pass_seconds")
    for rank in (1, 2):
        weights = load_file(clone / "models" / "lora" / "circle-s0" / f"r{rank}" / "final" / "adapter_model.safetensors")
        close(one[rank][0], weights, rel=1e-4)
        metrics = json.loads((clone / "metrics" / "lora" / "circle-s0" / f"r{rank}.json").read_text())
        assert {k: v for k, v in metrics.items() if k not in timing} == {k: v for k, v in one[rank][1].items()
                                                                          if k not in timing}
    two_agents("base_model", [], clone, env)
    l1, l2 = ((root / "metrics" / "base_model_loss.csv").read_text().splitlines()[1:] for root in (micro_pipeline, clone))
    assert [round(float(a.split(",")[1]), 4) for a in l1] == [round(float(b.split(",")[1]), 4) for b in l2]
    b1, b2 = (json.loads((root / "metrics" / "base_model.json").read_text()) for root in (micro_pipeline, clone))
    assert b1 == b2

    assert listing(clone) == before  # the same files, replaced: nothing extra from process 1
    logged = runs(clone / "mlflow.db")
    two_ = [r for r in logged if r.get("param:accelerate.num_processes") == "2"]
    assert all(r["param:accelerate.distributed_type"] == "MULTI_CPU" for r in two_)
    assert sorted(r["rank"] for r in two_ if r.get("stage") == "train_lora" and r.get("rank")) == ["1", "2"]
    assert len([r for r in two_ if r.get("stage") == "base_model"]) == 1
