"""The data contract: every path the pipeline writes, defined once.

Paths are relative to the repository root (where ``dvc repro`` runs). dvc.yaml names the same
paths as stage outputs; tests/test_architecture.py checks the two agree. Each artifact's one
reader and writer lives in the module of this package named for it:

| artifact                                   | path                                                   | module         |
| ------------------------------------------ | ------------------------------------------------------ | -------------- |
| prepared datasets (Florence JSONL + images) | data/prepared/<task>/{train,valid}/annotations.jsonl   | annotations    |
| base model + processor                     | models/base/                                           | base_model     |
| LoRA trajectories and final adapters       | models/lora/<task>-s<seed>/r<rank>/{checkpoints/step-<n>,final}/ | adapters |
| LoRA weight matrix + manifest, per rank    | data/lora_matrix/r<rank>.{safetensors,json}            | lora_matrix    |
| task vectors                               | data/task_vectors.{safetensors,json}                   | task_vectors   |
| generators (CVAE), per rank                | models/cvae/r<rank>/                                   | generators     |
| generated adapters                         | models/generated/<task>-r<rank>/sample-<name>/         | adapters       |
| metrics (JSON, CSV) and PNG plots          | metrics/...                                            | icmlora.files  |

Work in progress of the resumable stages lives under state/ (ignored by git and DVC): outputs
are replaced whole when a stage completes, and a half-done run must not be taken for one.
"""

from __future__ import annotations

from pathlib import Path

# --- data -------------------------------------------------------------------------------
PREPARED_DIR = Path("data/prepared")
SPLITS = ("train", "valid")
IMAGES_SUBDIR = "_images"  # every image once, shared by the tasks' annotation files
BASE_SPLIT = "_agnostic"  # the base model's pre-training split: every box, none named by its task
ANNOTATIONS_FILE = "annotations.jsonl"
PREPARED_SUMMARY = PREPARED_DIR / "summary.json"
LORA_MATRIX_DIR = Path("data/lora_matrix")
TASK_VECTORS_FILE = Path("data/task_vectors.safetensors")
TASK_VECTORS_INFO = Path("data/task_vectors.json")

# --- models -----------------------------------------------------------------------------
BASE_MODEL_DIR = Path("models/base")
LORA_DIR = Path("models/lora")
CVAE_DIR = Path("models/cvae")
GENERATED_DIR = Path("models/generated")
FEW_SHOT_DIR = Path("models/few_shot")
Z0_SAMPLE = "z0"  # the generated sample decoded from z = 0

# --- metrics (git-tracked, `dvc metrics` / `dvc plots`) -------------------------------------
METRICS_DIR = Path("metrics")
BASE_MODEL_METRICS = METRICS_DIR / "base_model.json"
BASE_MODEL_LOSS = METRICS_DIR / "base_model_loss.csv"
LORA_METRICS_DIR = METRICS_DIR / "lora"
TASK_VECTOR_METRICS = METRICS_DIR / "task_vectors.json"
TASK_VECTOR_PLOTS = METRICS_DIR / "plots" / "task_vectors"
CVAE_METRICS_DIR = METRICS_DIR / "cvae"
GENERATE_METRICS = METRICS_DIR / "generate.json"
COMPARISON_TABLE = METRICS_DIR / "comparison.csv"
CROSS_TASK_TABLE = METRICS_DIR / "cross_task.csv"
BOOTSTRAP_TABLE = METRICS_DIR / "bootstrap.csv"
EVALUATE_METRICS = METRICS_DIR / "evaluate.json"
FEW_SHOT_METRICS = METRICS_DIR / "few_shot.json"
SUMMARY_METRICS = METRICS_DIR / "summary.json"
# Wall-clock times, apart from the metrics: `dvc metrics diff` compares only what a run decides.
TIMING_DIR = METRICS_DIR / "timing"
VERDICTS = METRICS_DIR / "verdicts.txt"
REPORT_PLOTS = METRICS_DIR / "plots" / "report"

# --- work in progress ---------------------------------------------------------------------
STATE_DIR = Path("state")


def timing_file(stage: str, root: Path = TIMING_DIR) -> Path:
    return Path(root) / f"{stage}.json"


def split_dir(task: str, split: str, prepared: Path = PREPARED_DIR) -> Path:
    """data/prepared/<task>/<split>/: its annotations.jsonl names images relative to it."""
    return Path(prepared) / task / split


def annotations_file(task: str, split: str, prepared: Path = PREPARED_DIR) -> Path:
    return split_dir(task, split, prepared) / ANNOTATIONS_FILE


def adapter_name(task: str, rank: int, seed: int) -> str:
    """The adapter's name in logs, MLflow runs and state folders."""
    return f"{task}-r{rank}-s{seed}"


def lora_group_name(task: str, seed: int) -> str:
    """One train_lora item: every rank of one task and seed, trained in one process."""
    return f"{task}-s{seed}"


def lora_group_dir(task: str, seed: int, root: Path = LORA_DIR) -> Path:
    """models/lora/<task>-s<seed>/: the DVC output of one train_lora item, a folder per rank."""
    return Path(root) / lora_group_name(task, seed)


def lora_dir(task: str, rank: int, seed: int, root: Path = LORA_DIR) -> Path:
    return lora_group_dir(task, seed, root) / f"r{rank}"


def checkpoints_dir(task: str, rank: int, seed: int, root: Path = LORA_DIR) -> Path:
    return lora_dir(task, rank, seed, root) / "checkpoints"


CHECKPOINT_PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each checkpoint folder under ``folder``, by step."""
    found = [p for p in Path(folder).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
    return sorted(((int(p.name.removeprefix(CHECKPOINT_PREFIX)), p) for p in found), key=lambda t: t[0])


def final_adapter_dir(task: str, rank: int, seed: int, root: Path = LORA_DIR) -> Path:
    return lora_dir(task, rank, seed, root) / "final"


def lora_metrics_group_dir(task: str, seed: int, root: Path = LORA_METRICS_DIR) -> Path:
    """metrics/lora/<task>-s<seed>/: one train_lora item's metrics, a file per rank."""
    return Path(root) / lora_group_name(task, seed)


def lora_metrics_file(task: str, rank: int, seed: int, root: Path = LORA_METRICS_DIR) -> Path:
    return lora_metrics_group_dir(task, seed, root) / f"r{rank}.json"


def lora_state_dir(task: str, rank: int, seed: int, root: Path = STATE_DIR) -> Path:
    return Path(root) / "lora" / adapter_name(task, rank, seed)


def lora_matrix_file(rank: int, root: Path = LORA_MATRIX_DIR) -> Path:
    return Path(root) / f"r{rank}.safetensors"


def lora_manifest_file(rank: int, root: Path = LORA_MATRIX_DIR) -> Path:
    return Path(root) / f"r{rank}.json"


def generator_dir(rank: int, root: Path = CVAE_DIR) -> Path:
    return Path(root) / f"r{rank}"


def cvae_loss_file(rank: int, root: Path = CVAE_METRICS_DIR) -> Path:
    return Path(root) / f"r{rank}.csv"


def cvae_state_dir(rank: int, root: Path = STATE_DIR) -> Path:
    return Path(root) / "cvae" / f"r{rank}"


def generated_dir(task: str, rank: int, root: Path = GENERATED_DIR) -> Path:
    return Path(root) / f"{task}-r{rank}"


def few_shot_dir(task: str, rank: int, root: Path = FEW_SHOT_DIR) -> Path:
    """models/few_shot/<task>-r<rank>/: the held-out baseline few_shot_lora (a PEFT folder)."""
    return Path(root) / f"{task}-r{rank}"


SAMPLE_PREFIX = "sample-"


def sample_dir(folder: Path, sample: str) -> Path:
    """One generated adapter under ``folder`` (generated_dir(...) or a user's --out)."""
    return Path(folder) / f"{SAMPLE_PREFIX}{sample}"


def samples(folder: Path) -> dict[str, Path]:
    """{sample name: folder} of the generated adapters under ``folder``, sorted by folder name."""
    found = sorted(p for p in Path(folder).glob(f"{SAMPLE_PREFIX}*") if p.is_dir())
    return {p.name.removeprefix(SAMPLE_PREFIX): p for p in found}
