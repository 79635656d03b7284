"""params.yaml -> typed, validated parameters (pydantic v2).

Each section of params.yaml is a model below, named after what it configures. params.yaml is
the one source of every value: the models declare types and checks, never defaults, so the two
cannot drift apart (a key missing from params.yaml is an error, not a silent default).
``load_params`` checks the whole file before any work starts and reports every problem at once
by its dotted key: an unknown key, a missing key, a wrong type or an impossible value.

YAML is read as YAML 1.2 (ruamel.yaml, as DVC writes params.yaml under ``dvc exp run -S``):
only ``true``/``false`` are booleans, so ``mixed_precision: no`` stays the string "no".
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from icmlora.errors import InputError

PARAMS_FILE = Path("params.yaml")

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0)]  # a number of images; 0 = all of them


class Section(BaseModel):
    # strict: 1.5 is not an int, "5" not a number, "yes" not a boolean; extra: a typo is an error.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FamilyParams(Section):
    """``task_kind: family``: tasks are (hue band, grid row) pairs (``icmlora.data.family``).
    ``task_kind: category_row`` reads ``rows`` and ``confusers`` from here too."""

    hues: Annotated[int, Field(ge=2, le=12)]  # bands evenly spaced, named as the base names hues (12 names)
    rows: list[str]  # the grid's rows top to bottom (a square grid of len(rows) x len(rows) cells)
    shapes: list[str]  # outlines drawn at random: no task depends on them
    label: str  # the one label word every family task writes
    confusers: Fraction  # chance an object is a near miss of one drawn: its hue in another row, or its row in another hue
    colour_floor: Annotated[int, Field(ge=0, le=200)]  # every channel in colour_floor..255 (the categories': 150)

    @field_validator("rows")
    @classmethod
    def _row_names(cls, rows: list[str]) -> list[str]:
        problems = [] if len(rows) >= 2 else ["needs at least two rows"]
        if len(set(rows)) != len(rows):
            problems.append("has duplicates")
        problems += [f"{name!r} is not usable in a task name (letters, digits and _ only)" for name in rows
                     if not re.fullmatch(r"[A-Za-z0-9_]+", name)]
        if problems:
            raise ValueError("; ".join(problems))
        return rows

    @field_validator("shapes")
    @classmethod
    def _some_shapes(cls, shapes: list[str]) -> list[str]:
        if not shapes:
            raise ValueError("needs at least one shape")
        return shapes

    @field_validator("label")
    @classmethod
    def _one_word(cls, label: str) -> str:
        from icmlora.data.family import HUE_NAMES

        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", label):
            raise ValueError(f"{label!r} must be one word (letters, digits, _)")
        if label in HUE_NAMES:
            raise ValueError(f"{label!r} is a hue name the base model already writes: every task would be solved by the base")
        return label


class SyntheticParams(Section):
    image_size: Annotated[int, Field(ge=16)]
    train_images: Positive
    valid_images: Positive
    objects_per_image: list[Positive]
    object_size: list[Positive]
    noise_sigma: NonNegativeFloat
    noise_fraction: Fraction
    grid: bool
    grid_cells: Positive
    category_colours: bool
    base_labels: Literal["hue", "object"]
    # a task is a shape (its own hue), a (hue, row) pair of ``family``, or a (shape, row) pair on family's grid
    task_kind: Literal["category", "family", "category_row"]
    family: FamilyParams

    @field_validator("objects_per_image", "object_size")
    @classmethod
    def _min_max(cls, value: list[int], info: ValidationInfo) -> list[int]:
        if len(value) != 2 or value[0] > value[1]:
            raise ValueError("must be [min, max] with 1 <= min <= max")
        size = info.data.get("image_size")
        if info.field_name == "object_size" and size is not None and value[1] > size:
            raise ValueError(f"max {value[1]} exceeds image_size {size}")
        return value

    @field_validator("base_labels")
    @classmethod
    def _hue_needs_colours(cls, value: str, info: ValidationInfo) -> str:
        if value == "hue" and info.data.get("category_colours") is False:
            raise ValueError("'hue' needs category_colours: true (with random colours a hue names nothing)")
        return value

    @field_validator("family")
    @classmethod
    def _family_fits(cls, family: FamilyParams, info: ValidationInfo) -> FamilyParams:
        kind = info.data.get("task_kind")
        if kind not in ("family", "category_row"):
            return family
        size, sides = info.data.get("image_size"), info.data.get("object_size")
        if size is not None and sides is not None and sides[0] > size // len(family.rows) - 2:
            raise ValueError(f"object_size min {sides[0]} does not fit a grid cell of {size // len(family.rows)} pixels "
                             "less a 2-pixel gap (fewer rows or a larger image_size)")
        if info.data.get("category_colours") is False:
            raise ValueError(f"task_kind {kind!r} selects objects by hue: it needs category_colours: true")
        return family


class DataParams(Section):
    source: Literal["synthetic", "florence_jsonl", "voc", "coco"]
    root: Annotated[str, Field(min_length=1)]  # a DVC dependency of prepare: it must exist
    tasks: list[str]
    max_train_per_task: NonNegative
    max_valid_per_task: NonNegative
    ignore_regions: Literal["keep", "drop_images"]
    synthetic: SyntheticParams

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks: list[str]) -> list[str]:
        problems = [] if tasks else ["needs at least one task (a category name)"]
        if len(set(tasks)) != len(tasks):
            problems.append("has duplicates")
        # A task name is a folder name, part of a DVC stage name, a quoted shell argument and an
        # item of the comma-separated task list in the task-vector file's metadata.
        problems += [f"{t!r} is not usable as a folder and stage name (no / \\ @ , quotes $ or backquote, no "
                     "leading _ . or space)" for t in tasks
                     if not t or t != t.strip() or t.startswith(("_", ".")) or set(t) & set("/\\@,\"'$`")]
        if problems:
            raise ValueError("; ".join(problems))
        return tasks

    @field_validator("synthetic")
    @classmethod
    def _hues_for_tasks(cls, synthetic: SyntheticParams, info: ValidationInfo) -> SyntheticParams:
        tasks = info.data.get("tasks") or []
        if (info.data.get("source") == "synthetic" and synthetic.task_kind == "category" and synthetic.base_labels == "hue"
                and len(tasks) > 12):
            raise ValueError(f"base_labels 'hue' names at most 12 hues apart, data.tasks has {len(tasks)}: use 'object'")
        return synthetic


class TinyModelParams(Section):
    """A Florence-2 built offline from this config with random weights (``base.model: tiny``).
    params.yaml's is small enough to pre-train on a 2-core CPU in minutes; profiles/scale.yaml
    gives Florence-2-base's dimensions."""

    d_model: Positive
    encoder_layers: Positive
    decoder_layers: Positive
    attention_heads: Positive
    ffn_dim: Positive
    vision_embed_dims: list[Positive]
    vision_depths: list[Positive]
    vision_heads: list[Positive]
    vision_groups: list[Positive]
    patch_sizes: list[Positive]
    patch_strides: list[Positive]
    patch_padding: list[NonNegative]
    init_std: PositiveFloat
    vocab_size: Annotated[int, Field(ge=300)]  # 256 bytes + special tokens
    max_target_tokens: Positive
    window_size: Positive  # DaViT attention window (Florence-2-base: 12)
    image_size: NonNegative  # processor input side; 0 = the data's (square images of one size)
    pad_vocab_to: NonNegative  # pad the vocabulary with unused tokens to this many (Florence-2-base: 51289); 0 = no padding

    @field_validator("vision_depths", "vision_heads", "vision_groups", "patch_sizes", "patch_strides", "patch_padding")
    @classmethod
    def _one_per_stage(cls, value: list[int], info: ValidationInfo) -> list[int]:
        stages = info.data.get("vision_embed_dims")
        if stages is not None and len(value) != len(stages):
            raise ValueError(f"must have {len(stages)} entries, like vision_embed_dims")
        return value

    @field_validator("attention_heads")
    @classmethod
    def _heads_divide(cls, heads: int, info: ValidationInfo) -> int:
        d_model = info.data.get("d_model")
        if d_model is not None and d_model % heads:
            raise ValueError(f"must divide d_model {d_model}")
        return heads


class OptimizerParams(Section):
    """AdamW with linear warm-up then cosine decay, and gradient clipping (0 disables it)."""

    steps: Positive
    batch_size: Positive
    lr: PositiveFloat
    weight_decay: NonNegativeFloat
    warmup_steps: NonNegative
    grad_clip: NonNegativeFloat


class BaseParams(Section):
    model: str  # "tiny", a hub id or a local folder
    revision: str | None
    finetune_steps: NonNegative
    eval_images: Count
    tiny: TinyModelParams
    train: OptimizerParams


# A launcher that starts several processes for one stage (torchrun, SLURM, MPI, or Accelerate told to).
_SEVERAL_PROCESSES = re.compile(r"(^|[\s/])(torchrun|srun|mpirun)(\s|$)|--multi_gpu|--nproc[_-]per[_-]node|--nnodes"
                                r"|--num[_-]machines|--num[_-]processes[=\s]+(?!1(\s|$))")


class RuntimeParams(Section):
    mixed_precision: Literal["no", "bf16", "fp16"]
    launcher: str
    lora_workers: Positive
    lora_batch: NonNegative  # train_lora: ranks per forward/backward pass, 0 = all
    threads: NonNegative
    image_cache_mb: NonNegative
    portable_kernels: bool  # icmlora.kernels: the same bits on any x86-64 host with AVX2 (CPU)

    @field_validator("lora_workers")
    @classmethod
    def _workers_in_one_process(cls, workers: int, info: ValidationInfo) -> int:
        launcher = info.data.get("launcher")
        if workers > 1 and launcher is not None and _SEVERAL_PROCESSES.search(launcher):
            raise ValueError(f"{workers} workers need a one-process runtime.launcher (python -m, or accelerate "
                             f"launch -m on one device), but {launcher!r} launches several processes (torchrun, srun, "
                             f"mpirun, accelerate --multi_gpu/--num_processes N): each would start {workers} workers "
                             "of its own on the same devices; set lora_workers to 1 with this launcher")
        return workers


class PredictParams(Section):
    """How detections are decoded (greedy or beam search over <OD> output)."""

    batch_size: Positive
    max_new_tokens: Positive
    num_beams: Positive
    image_cache_mb: NonNegative


class LoraParams(Section):
    ranks: list[Positive]
    seeds: list[NonNegative]
    alpha: PositiveFloat
    dropout: Annotated[float, Field(ge=0, lt=1)]
    use_rslora: bool
    init: Literal["gaussian", "default"]
    target_modules: str | list[str]
    train: OptimizerParams
    checkpoint_every: Positive
    keep_checkpoints: Positive
    eval_images: Count
    cross_task_ranks: list[Positive]
    # {"r<rank>": lr} in place of train.lr for that rank (keys for ranks not trained are unused)
    lr_by_rank: dict[str, PositiveFloat]

    def optimizer(self, rank: int) -> OptimizerParams:
        """``train`` with the learning rate ``lr_by_rank`` gives this rank, if any."""
        lr = self.lr_by_rank.get(f"r{rank}")
        return self.train if lr is None else self.train.model_copy(update={"lr": lr})

    @field_validator("lr_by_rank")
    @classmethod
    def _rank_keys(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k in value if not re.fullmatch(r"r[1-9]\d*", k)]
        if bad:
            raise ValueError(f"keys {bad} are not ranks written r<rank> (e.g. r1)")
        return value

    @field_validator("ranks", "seeds")
    @classmethod
    def _not_empty(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value):
            raise ValueError("needs at least one value, without duplicates")
        return value

    @field_validator("target_modules")
    @classmethod
    def _regex(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"is not a valid regex ({exc})") from None
        return value

    @field_validator("keep_checkpoints")
    @classmethod
    def _trajectory_fits(cls, keep: int, info: ValidationInfo) -> int:
        train, every = info.data.get("train"), info.data.get("checkpoint_every")
        if train is not None and every is not None and every * keep > train.steps:
            raise ValueError(f"{keep} checkpoints every {every} steps need more than lora.train.steps = {train.steps}")
        return keep

    @field_validator("cross_task_ranks")
    @classmethod
    def _known_ranks(cls, value: list[int], info: ValidationInfo) -> list[int]:
        unknown = [r for r in value if r not in (info.data.get("ranks") or value)]
        if unknown:
            raise ValueError(f"{unknown} not in lora.ranks")
        return value


TASK_VECTOR_METHODS = ("icl", "reference", "text")


class TaskVectorParams(Section):
    method: Literal["icl", "reference", "text"]
    pooling: Literal["last", "mean", "label", "match", "object"]
    examples: Annotated[int, Field(ge=2)]
    reference_rank: Positive
    reference_examples: Positive
    compare: list[Literal["icl", "reference", "text"]]


class CvaeTrainParams(Section):
    epochs: Positive
    batch_size: Positive
    lr: PositiveFloat
    checkpoint_every: Positive


class HypernetParams(Section):
    """``cvae.kind: hypernet``: an MLP from the task vector to the adapter row (``icmlora.generators.hypernet``)."""

    hidden: Positive
    layers: Positive
    dropout: Annotated[float, Field(ge=0, lt=1)]


class FlowParams(Section):
    """``cvae.kind: flow``: conditional flow matching over rows (``icmlora.generators.flow``)."""

    hidden: Positive
    layers: Positive
    steps: Positive  # Euler steps from z (the starting noise) to a row


class CvaeParams(Section):
    """The generator: which kind (``icmlora.generators``), and the knobs of each. The paper's 1-D conv
    CVAE's sizes left at 0 / [] follow D, the flattened adapter's length; ``icmlora.cvae.architecture``
    resolves them."""

    kind: Literal["cvae", "ridge", "hypernet", "flow"]
    normalization: Literal["centered", "train_tasks", "per_checkpoint"]
    channels: list[Positive]
    max_layers: Positive
    kernel_size: Positive
    latent_dim: Positive
    hidden_dim: NonNegative
    pad_multiple: NonNegative
    kl_weight: NonNegativeFloat
    norm: Literal["group", "batch", "none"]
    patch: Positive
    condition_head: NonNegative
    decoder_condition: bool
    seed: NonNegative | None  # trains and samples the generators; None: the top-level seed
    hypernet: HypernetParams
    flow: FlowParams
    train: CvaeTrainParams

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd")
        return value


class GenerateParams(Section):
    samples: NonNegative


class EvaluateParams(Section):
    eval_images: Count
    cross_task_ranks: list[Positive]
    retrieval_k: Positive  # held-out baseline retrieval_mix: the k nearest training tasks' adapters ...
    retrieval_temperature: PositiveFloat  # ... weighted by softmax(cosine / temperature)
    noise_seed: NonNegative
    bootstrap_resamples: Annotated[int, Field(ge=100)]
    confidence: Annotated[float, Field(gt=0.5, lt=1)]


class FewShotParams(Section):
    """The held-out baseline ``few_shot_lora`` (``icmlora.few_shot``): a LoRA trained on a task's
    support examples only, its lr and step count chosen by k-fold over those examples."""

    lrs: Annotated[list[PositiveFloat], Field(min_length=1)]  # candidate learning rates
    steps: Positive  # each run's length (warm-up, then cosine decay over it)
    select_every: Positive  # candidate step counts: every N steps up to steps
    folds: Annotated[int, Field(ge=2)]  # k-fold over the support examples to choose (lr, step)
    seed: NonNegative  # the LoRAs' seed, as lora.seeds' (0: the pipeline's own initial A)


class Params(Section):
    """The whole of params.yaml."""

    seed: NonNegative
    data: DataParams
    heldout_tasks: list[str]
    base: BaseParams
    runtime: RuntimeParams
    predict: PredictParams
    lora: LoraParams
    task_vectors: TaskVectorParams
    cvae: CvaeParams
    generate: GenerateParams
    evaluate: EvaluateParams
    few_shot: FewShotParams

    @field_validator("heldout_tasks")
    @classmethod
    def _heldout_are_tasks(cls, heldout: list[str], info: ValidationInfo) -> list[str]:
        data = info.data.get("data")
        if data is None:
            return heldout
        unknown = [t for t in heldout if t not in data.tasks]
        if unknown:
            raise ValueError(f"{unknown} not in data.tasks ({', '.join(data.tasks)})")
        if len(set(heldout)) != len(heldout):
            raise ValueError("has duplicates")
        if len(heldout) >= len(data.tasks):
            raise ValueError("leaves no training task for the generator")
        kind, family = data.synthetic.task_kind, data.synthetic.family
        if data.source == "synthetic" and kind in ("family", "category_row"):
            from icmlora.data.family import SHAPES, category_row_problems, problems

            found = (problems(data.tasks, heldout, family.hues, family.rows) if kind == "family"
                     else category_row_problems(data.tasks, heldout, family.rows, SHAPES))
            if found:
                raise ValueError("; ".join(found))
        return heldout

    @field_validator("task_vectors")
    @classmethod
    def _reference_rank_is_trained(cls, tv: TaskVectorParams, info: ValidationInfo) -> TaskVectorParams:
        lora = info.data.get("lora")
        if lora is not None and "reference" in (tv.method, *tv.compare) and tv.reference_rank not in lora.ranks:
            raise ValueError(f"reference_rank {tv.reference_rank} is not in lora.ranks")
        return tv

    @field_validator("evaluate")
    @classmethod
    def _cross_ranks_are_trained(cls, ev: EvaluateParams, info: ValidationInfo) -> EvaluateParams:
        lora = info.data.get("lora")
        unknown = [r for r in ev.cross_task_ranks if lora is not None and r not in lora.ranks]
        if unknown:
            raise ValueError(f"cross_task_ranks {unknown} not in lora.ranks")
        return ev

    def training_tasks(self) -> list[str]:
        """The tasks whose adapters the generator learns from (data.tasks minus heldout_tasks)."""
        return [t for t in self.data.tasks if t not in self.heldout_tasks]

    def generator_seed(self) -> int:
        """The seed of the generators' training and of their samples (``cvae.seed``, else ``seed``)."""
        return self.seed if self.cvae.seed is None else self.cvae.seed

    def is_family(self) -> bool:
        return self.data.source == "synthetic" and self.data.synthetic.task_kind == "family"

    def is_category_row(self) -> bool:
        return self.data.source == "synthetic" and self.data.synthetic.task_kind == "category_row"

    def task_attributes(self, task: str) -> dict[str, str]:
        """What a grid task selects by ({"hue": ..., "row": ...} in a family, {"category": ...,
        "row": ...} for category_row); {} for a task that is a category."""
        from icmlora.data.family import split_category_row, split_cell

        family = self.data.synthetic.family
        if self.is_family():
            return dict(zip(("hue", "row"), split_cell(task, family.hues, family.rows)))
        if self.is_category_row():
            return dict(zip(("category", "row"), split_category_row(task, family.rows)))
        return {}

    def task_label(self, task: str) -> str:
        """The label word a task's targets write: its own name (a category), the family's one word,
        or a category_row task's category."""
        if self.is_family():
            return self.data.synthetic.family.label
        return self.task_attributes(task)["category"] if self.is_category_row() else task


# --------------------------------------------------------------------------- loading
def _dotted(loc: tuple, model: type[BaseModel] | None = Params) -> str:
    """('lora', 'train', 'lr') -> 'lora.train.lr'; list indices as [i]; a mapping's keys as keys;
    union member tags dropped."""
    out, mapping = "", False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if mapping:  # a key of a dict-valued knob (lora.lr_by_rank.r1)
            out, mapping = f"{out}.{part}", False
            continue
        fields = model.model_fields if model is not None else {}
        if out and part not in fields:
            break  # a union member's tag ('str', 'list[str]'): not a key
        out += f".{part}" if out else str(part)
        annotation = fields[part].annotation if part in fields else None
        mapping = get_origin(annotation) is dict
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return out


def _problems(exc: ValidationError) -> list[str]:
    by_key: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = err["loc"]
        if err["type"] == "extra_forbidden":
            parent = _dotted(loc[:-1])
            key = f"{parent}.{loc[-1]}" if parent else str(loc[-1])
            section: type[BaseModel] = Params
            for part in loc[:-1]:
                section = section.model_fields[part].annotation
            message = f"unknown key; allowed keys under {parent or 'the top level'}: {', '.join(section.model_fields)}"
        else:
            key = _dotted(loc)
            if err["type"] == "missing":
                message = "missing: params.yaml must set every knob (see the repository's params.yaml)"
            elif err["type"] == "value_error":
                message = str(err["ctx"]["error"])
            else:
                message = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {err['input']!r}"
        if message not in by_key.setdefault(key, []):
            by_key[key].append(message)
    return [f"{key}: {'; or '.join(messages)}" for key, messages in by_key.items()]


def params_from_dict(data: Any, source: str | Path = PARAMS_FILE) -> Params:
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"{source}: invalid parameters", _problems(exc)) from None


def read_yaml(text: str, source: str | Path = PARAMS_FILE) -> Any:
    """Plain Python values from YAML 1.2 text; a syntax error names the file and line."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        # pure=True: the C loader speaks YAML 1.1, where `no` would be a boolean.
        return YAML(typ="safe", pure=True).load(io.StringIO(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}" if mark else str(source)
        raise InputError(f"{where}: invalid YAML ({exc.problem})") from None
    except YAMLError as exc:
        raise InputError(f"{source}: invalid YAML ({exc})") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: parameters file not found (run from the repository root)") from None
    return params_from_dict(read_yaml(text, path) or {}, path)
