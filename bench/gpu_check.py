"""GPU check (not a test): the pipeline on CUDA, ready to run on any GPU machine.

    bash bench/gpu_check.sh                # = .venv/bin/python bench/gpu_check.py
    bash bench/gpu_check_device.sh         # a lent machine without network: wheels from .whl/ first

Three parts run at the same time on the one GPU, each in its own copy of the working tree (its
own DVC cache and MLflow store, runtime.threads and OMP_NUM_THREADS = CPU cores / parts):
  default_bf16  params.yaml as it is, runtime.mixed_precision bf16: one `dvc repro`
  default_fp32  the same in fp32
  scale         profiles/scale.yaml (Florence-2-base's shape, the paper's D) in bf16: the training
                stages and their inputs (`dvc repro train_cvae`: prepare .. train_cvae)
With 2 or more GPUs, once default_bf16 is done: train_lora of one task in 2 processes
(`accelerate launch --multi_gpu --num_processes 2`), against the 1-GPU run's mAP50s.

Per stage: wall seconds (DVC's "Running stage" line to its "Updating lock file" line: the command
plus DVC caching its outputs) and peak GPU memory, two ways (parts share the GPU, so the GPU's own
used-memory figure is not any one stage's):
  peak_gpu_allocated_mib / _reserved_mib  torch's allocator peak of the stage's own process(es),
      written at exit by bench/gpu_check_hook/sitecustomize.py (no CUDA context; a process killed
      at the deadline writes none);
  peak_gpu_mib_sampled  nvidia-smi's per-process used memory (context included) of the part's
      processes, polled every second (short peaks can be missed).
Per part: the quality figures (base mAP50, LoRA mAP50 median, generated / trained from
metrics/summary.json) and, for scale, seconds per LoRA step.

Everything is written as it happens to metrics/gpu/gpu_check.json (and $OUT/gpu_check.json when OUT is
set), so a run stopped from outside keeps what finished. A part still running at --deadline
seconds is stopped and recorded as incomplete with the stages it finished. Each part's full output
goes to <part>.log ($OUT/ when set, else beside the copies). Without a CUDA GPU it says so and exits
with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "bench" / "gpu_check_hook"
STAGE_START = re.compile(r"Running stage '([^']+)'")
STAGE_END = re.compile(r"Updating lock file")
PARTS = ("default_bf16", "default_fp32", "scale")
GPU_MEMORY_METHOD = (
    "Parts run at the same time on one GPU. peak_gpu_allocated_mib / peak_gpu_reserved_mib: torch.cuda."
    "max_memory_allocated / max_memory_reserved of the stage's own process(es) at exit (the largest over "
    "its processes and GPUs; no CUDA context; none for a process killed at the deadline). "
    "peak_gpu_mib_sampled: nvidia-smi --query-compute-apps used memory (CUDA context included) summed over "
    "the part's processes, polled every second. gpu_wide_peak_mib: nvidia-smi memory.used of all GPUs, "
    "every part together.")


def gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def nvidia_smi(*query: str) -> list[list[str]]:
    """Rows of an nvidia-smi CSV query; [] where there is no nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def as_int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def snapshot(dest: Path) -> Path:
    """A git repository holding the working tree as it is here (tracked files with their edits,
    untracked files git does not ignore): what was sent to a lent machine is what runs. Without
    .git (a copy that travelled without it), every file but the usual build folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".whl", "__pycache__", "state", "mlruns", "mlflow-artifacts", "build"}
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
                 and not p.name.startswith("mlflow.db") and p.relative_to(ROOT).parts[:2] != (".dvc", "cache")]
    for name in files:
        src = ROOT / name
        if src.is_file():  # a tracked file deleted here is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    if shutil.which("git"):
        git = ["git", "-c", "user.name=gpu-check", "-c", "user.email=gpu-check@localhost"]
        for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "gpu_check snapshot"]):
            subprocess.run(git + cmd, cwd=dest, check=True)
    else:  # no git program (DVC itself needs none: it reads the repository through dulwich/pygit2)
        from dulwich import porcelain

        porcelain.init(str(dest))
        porcelain.add(str(dest), paths=[str(dest / name) for name in files if (dest / name).is_file()])
        porcelain.commit(str(dest), message=b"gpu_check snapshot", author=b"gpu-check <gpu-check@localhost>",
                         committer=b"gpu-check <gpu-check@localhost>")
    return dest


def source_state() -> dict:
    """HEAD and what differs from it here: the record says which code it measured."""
    def git(*args: str) -> list[str]:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
            return out.stdout.split("\n")
        except (OSError, subprocess.CalledProcessError):
            return []

    head = [line for line in git("rev-parse", "HEAD") if line]
    return {"git_commit": head[0] if head else None,
            "modified": [line[3:] for line in git("status", "--porcelain", "--untracked-files=no") if line],
            "untracked": [line for line in git("ls-files", "--others", "--exclude-standard") if line]}


class Part:
    """One pipeline in its own copy: commands run one after another in a thread, each in a
    process session of its own (so a deadline stops the whole tree); stage times come from DVC's
    output lines, stamped as they arrive."""

    def __init__(self, name: str, repo: Path, commands: list[list[str]], env: dict, log: Path, t0: float,
                 notify, single_stage: str | None = None, about: dict | None = None):
        self.name, self.repo, self.commands, self.log_path, self.t0 = name, repo, commands, log, t0
        self.notify, self.single_stage = notify, single_stage
        self.mem_dir = repo.parent / f"{name}.mem"
        self.mem_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env, GPU_CHECK_MEM_DIR=str(self.mem_dir))
        self.about = about or {}
        self.status, self.stages, self.current = "pending", {}, None
        self.proc: subprocess.Popen | None = None
        self.started = self.ended = None
        self.setup_seconds = 0.0
        self.peak_sampled = 0
        self.stopped = False
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.status, self.started = "running", time.time()
        self.thread.start()

    def _open(self, stage: str, now: float) -> None:
        self._close(now)
        self.current = stage
        self.stages[stage] = {"start_s": round(now - self.t0, 1), "seconds": None}

    def _close(self, now: float) -> None:
        if self.current:
            self.stages[self.current]["seconds"] = round(now - self.t0 - self.stages[self.current]["start_s"], 1)
            self.current = None

    def _run(self) -> None:
        try:
            self._commands()
        except Exception as exc:  # noqa: BLE001 - a broken part must not hang the others
            self.status, self.error = "failed", repr(exc)
        self.ended = time.time()
        print(f"[{self.name} {self.ended - self.t0:6.0f}s] {self.status}" + (f": {self.error}" if self.error else ""),
              flush=True)
        self.notify()

    def _commands(self) -> None:
        with open(self.log_path, "a") as log:
            for cmd in self.commands:
                if self.stopped:
                    break
                is_repro = self.single_stage is None and cmd[1:4] == ["-m", "dvc", "repro"]
                if self.single_stage:
                    self._open(self.single_stage, time.time())
                start = time.time()
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                self.proc = subprocess.Popen(cmd, cwd=self.repo, env=self.env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True, errors="replace",
                                             start_new_session=True)
                for line in self.proc.stdout:
                    now = time.time()
                    shown = [seg for seg in line.rstrip("\n").split("\r") if seg.strip()]  # a progress bar:
                    log.write(f"{now - self.t0:8.1f} {shown[-1] if shown else ''}\n")     # its last state
                    log.flush()
                    if (m := STAGE_START.search(line)) and not self.single_stage:
                        self._open(m.group(1), now)
                        print(f"[{self.name} {now - self.t0:6.0f}s] stage {m.group(1)}", flush=True)
                        self.notify()
                    elif STAGE_END.search(line) and not self.single_stage:
                        self._close(now)
                        self.notify()
                returncode = self.proc.wait()
                if not is_repro and not self.single_stage:
                    self.setup_seconds += time.time() - start
                if returncode:
                    self.status = "stopped at deadline" if self.stopped else "failed"
                    self.error = None if self.stopped else f"`{' '.join(cmd[1:])}` exited {returncode}"
                    break
                if self.single_stage:
                    self._close(time.time())
            else:
                self._close(time.time())
                self.status = "complete"

    def signal(self, sig: int) -> None:
        """Signal the running command's whole process session (its own: start_new_session)."""
        self.stopped = True
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def memory_records(self) -> list[dict]:
        return [r for p in sorted(self.mem_dir.glob("*.json")) if (r := read_json(p))]

    def record(self) -> dict:
        """The part as JSON: stages with times and memory, what finished, the quality figures."""
        now = time.time()
        stages = {k: dict(v) for k, v in list(self.stages.items())}
        # A stage process's exit lies between its stage's "Running stage" and "Updating lock file"
        # lines (DVC starts it after the one and prints the other after it ends): its peaks are that stage's.
        for rec in self.memory_records():
            end = rec["end"] - self.t0
            for stage in stages.values():
                stop = stage["start_s"] + stage["seconds"] if stage["seconds"] is not None else now - self.t0
                if stage["start_s"] - 0.1 <= end <= stop + 0.1:
                    cuda = rec.get("cuda") or []
                    for key, field in (("peak_gpu_allocated_mib", "max_allocated_mib"),
                                       ("peak_gpu_reserved_mib", "max_reserved_mib")):
                        if cuda:
                            stage[key] = max(stage.get(key, 0), max(d[field] for d in cuda))
                    stage["peak_rss_mib"] = max(stage.get("peak_rss_mib", 0), rec.get("max_rss_mib", 0))
                    break
        done = [k for k, v in stages.items() if v["seconds"] is not None]
        out = dict(self.about)
        out.update({"status": self.status, "incomplete": self.status != "complete", "stages_done": done,
                    "running_stage": self.current if self.status != "complete" else None,
                    "seconds": round((self.ended or now) - self.started, 1) if self.started else None,
                    "setup_seconds": round(self.setup_seconds, 1), "peak_gpu_mib_sampled": self.peak_sampled,
                    "stages": stages, "log": self.log_path.name})
        if self.error:
            out["error"] = self.error
        out.update(self.quality())
        return out

    def fresh(self, path: Path) -> bool:
        """Written by this run (the copy starts with the committed metrics of another run)."""
        return self.started is not None and path.is_file() and path.stat().st_mtime >= self.started

    def quality(self) -> dict:
        out: dict = {}
        metrics = self.repo / "metrics"
        base = metrics / "base_model.json"
        if self.fresh(base) and (figures := read_json(base)):
            out["base_map50"] = figures.get("map50")
        lora = [m for p in sorted((metrics / "lora").rglob("r*.json")) if self.fresh(p) and (m := read_json(p))]
        if lora:
            out["lora_count"] = len(lora)
            out["lora_map50_median"] = round(statistics.median(m["map50"] for m in lora), 4)
            by_rank: dict[str, list[float]] = {}
            for m in lora:
                if m.get("train_steps"):
                    by_rank.setdefault(f"r{m['rank']}", []).append(m["train_seconds"] / m["train_steps"])
            out["lora_step_seconds_median"] = {r: round(statistics.median(v), 4) for r, v in sorted(by_rank.items())}
        summary = metrics / "summary.json"
        if self.fresh(summary):
            keys = ("trained_map50_median", "generated_map50_median", "generated_over_trained_median",
                    "base_map50_median", "heldout_generated_map50_median")
            out["summary"] = {f"r{rank}": {k: v[k] for k in keys if k in v}
                              for rank, v in (read_json(summary) or {}).get("ranks", {}).items()}
        return out


class Sampler:
    """nvidia-smi every second: GPU-wide used memory, and each part's processes' own (matched by
    process ancestry to the part's command)."""

    def __init__(self, parts: dict[str, Part], t0: float):
        self.parts, self.t0 = parts, t0
        self.gpu_wide_peak, self.timeline, self.unmatched = 0, [], 0
        self.available = bool(nvidia_smi("--query-gpu=memory.used"))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def ancestors(pid: int) -> set[int]:
        seen: set[int] = set()
        while pid > 1 and pid not in seen and len(seen) < 64:
            seen.add(pid)
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                break
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after state: ppid
        return seen

    def _poll(self) -> None:
        last_point = 0.0
        while not self._stop.wait(1.0):
            used = sum(as_int(row[0]) for row in nvidia_smi("--query-gpu=memory.used"))
            self.gpu_wide_peak = max(self.gpu_wide_peak, used)
            parts = list(self.parts.items())  # the 2-GPU part may be added meanwhile
            per_part = {name: 0 for name, _ in parts}
            for row in nvidia_smi("--query-compute-apps=pid,used_memory"):
                if len(row) < 2 or not row[0].isdigit():
                    continue
                chain = self.ancestors(int(row[0]))
                owner = next((n for n, p in parts if p.proc and p.proc.pid in chain), None)
                if owner:
                    per_part[owner] += as_int(row[1])
                elif len(chain) <= 1:
                    self.unmatched += 1  # a pid this machine cannot see (another PID namespace)
            for name, part in parts:
                part.peak_sampled = max(part.peak_sampled, per_part[name])
                if part.current and part.current in part.stages:
                    stage = part.stages[part.current]
                    stage["peak_gpu_mib_sampled"] = max(stage.get("peak_gpu_mib_sampled", 0), per_part[name])
            now = time.time()
            if now - last_point >= 5:
                self.timeline.append([round(now - self.t0), used, {n: v for n, v in per_part.items() if v}])
                last_point = now

    def start(self) -> None:
        if self.available:
            self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "tokenizers", "huggingface_hub", "dvc",
                 "mlflow-skinny", "mlflow"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline", type=float, default=480,
                        help="seconds from start after which running parts are stopped and recorded as incomplete "
                             "(default 480)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"which parts, comma-separated (default {','.join(PARTS)})")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per part (runtime.threads, OMP_NUM_THREADS); default: cores / parts")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "gpu" / "gpu_check.json", help="the record (default "
                        "metrics/gpu/gpu_check.json)")
    # Undocumented, for checking this script's orchestration on a CPU in minutes: not a GPU check.
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-override", help=argparse.SUPPRESS)  # merged into the default parts first
    args = parser.parse_args(argv)
    t0 = time.time()

    n = gpus()
    if not n and not args.allow_cpu:
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check on this machine. "
              "Run it where `nvidia-smi` lists a GPU.", file=sys.stderr)
        return 2
    names = [p for p in args.parts.split(",") if p]
    if unknown := set(names) - set(PARTS):
        parser.error(f"unknown part(s) {sorted(unknown)}; known: {', '.join(PARTS)}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(names))
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    log_dir = out_dir or tmp
    log_dir.mkdir(parents=True, exist_ok=True)

    # Each part's processes: its copy's own code first on PYTHONPATH (not this checkout's src/), the
    # memory hook before it, this interpreter's bin/ first on PATH (dvc.yaml's `python -m ...`).
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if p and Path(p).resolve() != (ROOT / "src").resolve()]
    base_env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    base_env.pop("MLFLOW_TRACKING_URI", None)  # each copy logs to its own sqlite:///<copy>/mlflow.db

    record: dict = {
        "about": "bench/gpu_check.py: the pipeline on CUDA, parts run at the same time on one GPU",
        "status": "running", "deadline_seconds": args.deadline, "gpus": n,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "gpu": [", ".join(row) for row in nvidia_smi("--query-gpu=name,memory.total,driver_version")],
                    **versions()},
        "source": source_state(),
        "settings": {"parts": names, "threads_per_part": threads, "profile_override": args.profile_override,
                     "cpu_only_smoke_test": not n},
        "gpu_memory_method": GPU_MEMORY_METHOD,
    }
    lock = threading.Lock()
    parts: dict[str, Part] = {}
    sampler: Sampler | None = None

    def notify() -> None:
        with lock:
            record["elapsed_seconds"] = round(time.time() - t0, 1)
            record["parts"] = {name: part.record() for name, part in list(parts.items())}
            if sampler:
                record["gpu_wide_peak_mib"] = sampler.gpu_wide_peak
                record["timeline"] = {"columns": ["seconds", "gpu_wide_mib", "per part sampled mib"],
                                      "points": list(sampler.timeline)}
                if sampler.unmatched:
                    record["sampling_note"] = (f"{sampler.unmatched} nvidia-smi process samples had pids this machine "
                                               "cannot see: peak_gpu_mib_sampled misses them")
            write_json(args.out, record)
            if out_dir:
                write_json(out_dir / "gpu_check.json", record)

    def overlay(name: str, precision: str) -> Path:
        path = tmp / f"{name}.yaml"
        path.write_text(f'runtime:\n  mixed_precision: "{precision}"\n  launcher: python -m\n  threads: {threads}\n')
        return path

    icmlora = [sys.executable, "-m", "icmlora"]
    for name in names:
        repo = snapshot(tmp / name)
        env = dict(base_env, PYTHONPATH=os.pathsep.join([str(HOOK), str(repo / "src"), *inherited]))
        if name == "scale":
            commands = [[*icmlora, "synth-voc", "data/scale-voc/VOC2012", "--tasks", "dog", "cat"],
                        [*icmlora, "profile", "scale"], [*icmlora, "profile", str(overlay(name, "bf16"))],
                        [sys.executable, "-m", "dvc", "repro", "train_cvae"]]
            about = {"profile": "profiles/scale.yaml", "mixed_precision": "bf16", "targets": "train_cvae and upstream"}
        else:
            precision = "bf16" if name.endswith("bf16") else "no"
            commands = [[*icmlora, "profile", args.profile_override]] if args.profile_override else []
            commands += [[*icmlora, "profile", str(overlay(name, precision))], [sys.executable, "-m", "dvc", "repro"]]
            about = {"profile": f"params.yaml + profiles/{args.profile_override}.yaml" if args.profile_override
                     else "params.yaml", "mixed_precision": precision}
        parts[name] = Part(name, repo, commands, env, log_dir / f"{name}.log", t0, notify, about=about)

    sampler = Sampler(parts, t0)
    sampler.start()
    for part in parts.values():
        part.start()
    notify()

    two_gpu: Part | None = None
    last_write = time.time()
    while any(p.status in ("pending", "running") for p in parts.values()):
        time.sleep(1)
        if time.time() - t0 > args.deadline:
            print(f"gpu_check: deadline {args.deadline:.0f}s reached: stopping "
                  f"{[n for n, p in parts.items() if p.status == 'running']}", flush=True)
            running = [p for p in parts.values() if p.status == "running"]
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                for part in running:
                    part.signal(sig)
                end = time.time() + grace
                while time.time() < end and any(p.thread.is_alive() for p in running):
                    time.sleep(0.5)
            for part in running:
                part.thread.join(5)
                if part.status == "running":  # a process outside the session kept its output open
                    part.status = "stopped at deadline"
            break
        bf16 = parts.get("default_bf16")
        if n >= 2 and two_gpu is None and bf16 and bf16.status == "complete":
            # train_lora of one task in 2 processes, in the bf16 copy, against its 1-process mAP50s.
            one = [m for p in sorted((bf16.repo / "metrics" / "lora").rglob("r*.json")) if (m := read_json(p))]
            task, seed = one[0]["task"], one[0]["seed"]
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m",
                   "icmlora.stages.train_lora", "--task", task, "--seed", str(seed)]
            two_gpu = Part("train_lora_2gpu", bf16.repo, [cmd], bf16.env, log_dir / "train_lora_2gpu.log", t0,
                           notify, single_stage=f"train_lora@{task}-{seed} (2 processes)",
                           about={"task": task, "seed": seed,
                                  "map50_1gpu": {m["rank"]: m["map50"] for m in one if m["task"] == task}})
            with lock:
                parts["train_lora_2gpu"] = two_gpu
            two_gpu.start()
        if time.time() - last_write > 15:  # memory peaks arrive between stage lines
            notify()
            last_write = time.time()
    sampler.stop()
    if two_gpu is not None and two_gpu.status == "complete":
        two_gpu.about["map50_2gpu"] = {m["rank"]: m["map50"] for p in sorted(
            (two_gpu.repo / "metrics" / "lora" / f"{two_gpu.about['task']}-s{two_gpu.about['seed']}").glob("r*.json"))
            if (m := read_json(p))}
    record["status"] = "complete" if all(p.status == "complete" for p in parts.values()) else "incomplete"
    notify()

    print(f"\n{'part / stage':44} {'seconds':>8} {'alloc MiB':>10} {'smi MiB':>8}")
    for name, part in record["parts"].items():
        print(f"{name} ({part['status']}, {part['seconds']} s)")
        for stage, s in part["stages"].items():
            secs = f"{s['seconds']:8.1f}" if s["seconds"] is not None else "     ..."
            alloc, sampled = s.get("peak_gpu_allocated_mib", "-"), s.get("peak_gpu_mib_sampled", "-")
            print(f"  {stage:42} {secs} {alloc:>10} {sampled:>8}")
        figures = {k: part[k] for k in ("base_map50", "lora_map50_median") if k in part}
        if figures:
            print(f"  {figures}")
    print(f"gpu_check: {record['status']}; wrote {args.out}" + (f" and {out_dir / 'gpu_check.json'}" if out_dir else "")
          + f" (copies under {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
