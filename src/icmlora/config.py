"""params.yaml -> a typed, validated config.

Every section is a small dataclass. ``load_config`` checks the whole file before any work
starts and reports every problem at once with its dotted key: an unknown key (with the
keys that are allowed), a wrong type, or an impossible value.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from icmlora.errors import InputError

PARAMS_FILE = "params.yaml"


# --------------------------------------------------------------------------- sections
@dataclass
class SyntheticData:
    image_size: int = 64
    train_images: int = 12000
    valid_images: int = 600
    objects_per_image: list[int] = field(default_factory=lambda: [1, 3])  # [min, max]
    object_size: list[int] = field(default_factory=lambda: [14, 30])  # [min, max] pixels
    noise_sigma: float = 12.0  # Gaussian pixel noise, on a noise_fraction of the images
    noise_fraction: float = 0.5
    grid: bool = False  # objects aligned to a grid of grid_cells x grid_cells
    grid_cells: int = 4
    category_colours: bool = True  # each category its own hue (off: random colours, outline only)
    # How the base model's pre-training split names every object: "hue", the name of its colour
    # (red, yellow, ...; a vocabulary disjoint from the task names), or "object" (class-agnostic).
    base_labels: Literal["hue", "object"] = "hue"

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.image_size < 16:
            out.append(("image_size", "must be >= 16"))
        for key in ("train_images", "valid_images"):
            if getattr(self, key) < 1:
                out.append((key, "must be >= 1"))
        for key in ("objects_per_image", "object_size"):
            lo_hi = getattr(self, key)
            if len(lo_hi) != 2 or lo_hi[0] < 1 or lo_hi[0] > lo_hi[1]:
                out.append((key, "must be [min, max] with 1 <= min <= max"))
        if len(self.object_size) == 2 and self.object_size[1] > self.image_size:
            out.append(("object_size", f"max {self.object_size[1]} exceeds image_size {self.image_size}"))
        if not 0.0 <= self.noise_fraction <= 1.0:
            out.append(("noise_fraction", "must be in [0, 1]"))
        if self.noise_sigma < 0:
            out.append(("noise_sigma", "must be >= 0"))
        if self.grid_cells < 1:
            out.append(("grid_cells", "must be >= 1"))
        if self.base_labels == "hue" and not self.category_colours:
            out.append(("base_labels", "'hue' needs category_colours: true (with random colours a hue names nothing)"))
        return out


@dataclass
class DataConfig:
    source: Literal["synthetic", "florence_jsonl", "voc", "coco"] = "synthetic"
    root: str | None = None  # folder of a real source; unused for synthetic
    tasks: list[str] = field(default_factory=lambda: ["circle", "square", "triangle", "cross", "ring", "star"])
    max_train_per_task: int = 0  # 0 keeps every image
    max_valid_per_task: int = 0
    synthetic: SyntheticData = field(default_factory=SyntheticData)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not self.tasks:
            out.append(("tasks", "needs at least one task (a category name)"))
        if len(set(self.tasks)) != len(self.tasks):
            out.append(("tasks", "has duplicates"))
        for name in self.tasks:
            if not name or "/" in name or name != name.strip() or name.startswith(("_", ".")):
                out.append(("tasks", f"{name!r} is not usable as a folder name"))
        if self.source != "synthetic" and not self.root:
            out.append(("root", f"source {self.source!r} needs data.root, the folder to import from"))
        for key in ("max_train_per_task", "max_valid_per_task"):
            if getattr(self, key) < 0:
                out.append((key, "must be >= 0 (0 keeps every image)"))
        if self.source == "synthetic" and self.synthetic.base_labels == "hue" and len(self.tasks) > 12:
            out.append(("synthetic.base_labels", f"'hue' names at most 12 hues apart, data.tasks has {len(self.tasks)}: "
                                                 "use 'object'"))
        return out


@dataclass
class TinyModel:
    """A Florence-2 small enough to pre-train on a 2-core CPU in minutes."""

    d_model: int = 64
    encoder_layers: int = 1
    decoder_layers: int = 1
    attention_heads: int = 2
    ffn_dim: int = 128
    vision_embed_dims: list[int] = field(default_factory=lambda: [32, 48, 64])
    vision_depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    vision_heads: list[int] = field(default_factory=lambda: [1, 2, 4])
    vision_groups: list[int] = field(default_factory=lambda: [1, 2, 4])
    patch_sizes: list[int] = field(default_factory=lambda: [7, 3, 3])
    patch_strides: list[int] = field(default_factory=lambda: [4, 2, 1])
    patch_padding: list[int] = field(default_factory=lambda: [3, 1, 1])
    # BART's default 0.02 makes the decoder ignore the image; 0.1 lets it learn to look.
    init_std: float = 0.1
    vocab_size: int = 600  # byte-level BPE size before <loc_*> and task tokens
    max_target_tokens: int = 64

    def problems(self) -> list[tuple[str, str]]:
        out = []
        n = len(self.vision_embed_dims)
        for key in ("vision_depths", "vision_heads", "vision_groups", "patch_sizes", "patch_strides", "patch_padding"):
            if len(getattr(self, key)) != n:
                out.append((key, f"must have {n} entries, like vision_embed_dims"))
        if self.d_model % self.attention_heads:
            out.append(("d_model", f"{self.d_model} is not divisible by attention_heads {self.attention_heads}"))
        for key in ("d_model", "encoder_layers", "decoder_layers", "attention_heads", "ffn_dim", "max_target_tokens"):
            if getattr(self, key) < 1:
                out.append((key, "must be >= 1"))
        if self.init_std <= 0:
            out.append(("init_std", "must be > 0"))
        if self.vocab_size < 300:
            out.append(("vocab_size", "must be >= 300 (256 bytes + special tokens)"))
        return out


@dataclass
class Optim:
    steps: int = 1600
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                out.append((key, "must be >= 1"))
        if self.lr <= 0:
            out.append(("lr", "must be > 0"))
        if self.weight_decay < 0:
            out.append(("weight_decay", "must be >= 0"))
        if self.warmup_steps < 0:
            out.append(("warmup_steps", "must be >= 0"))
        if self.grad_clip < 0:
            out.append(("grad_clip", "must be >= 0 (0 disables clipping)"))
        return out


@dataclass
class BaseConfig:
    # "tiny" builds and pre-trains a small Florence-2 here; anything else is a hub id or a
    # local folder (e.g. florence-community/Florence-2-base-ft), copied once into models/base.
    model: str = "tiny"
    revision: str | None = None
    tiny: TinyModel = field(default_factory=TinyModel)
    train: Optim = field(default_factory=Optim)
    # For a real model: also fine-tune it class-agnostically (0 steps keeps it as released).
    finetune_steps: int = 0

    def problems(self) -> list[tuple[str, str]]:
        return [("finetune_steps", "must be >= 0")] if self.finetune_steps < 0 else []


@dataclass
class RuntimeConfig:
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # The command dvc.yaml runs a training stage with; a GPU user sets
    # "accelerate launch --multi_gpu -m icmlora" here, not in code.
    launcher: str = "python -m icmlora"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    def problems(self) -> list[tuple[str, str]]:
        return [("threads", "must be >= 0")] if self.threads < 0 else []


@dataclass
class EvalConfig:
    batch_size: int = 64
    max_new_tokens: int = 48
    num_beams: int = 1
    max_images: int = 0  # 0 evaluates the whole valid split

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for key in ("batch_size", "max_new_tokens", "num_beams"):
            if getattr(self, key) < 1:
                out.append((key, "must be >= 1"))
        if self.max_images < 0:
            out.append(("max_images", "must be >= 0"))
        return out


# LoRA on the language model's attention projections and feed-forward layers (a plain
# "fc1"/"fc2" list would also hit the vision tower's MLPs).
DEFAULT_LORA_TARGETS = (
    r".*language_model\.(encoder|decoder)\.layers\.\d+\.(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)"
    r"|.*language_model\.(encoder|decoder)\.layers\.\d+\.(fc1|fc2)"
)


def _lora_optim() -> Optim:
    return Optim(steps=150, batch_size=32, lr=5e-3, weight_decay=0.0, warmup_steps=10, grad_clip=1.0)


@dataclass
class LoraConfig:
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0])
    alpha: float = 8.0
    dropout: float = 0.05
    use_rslora: bool = True
    init: Literal["gaussian", "default"] = "gaussian"
    # A regex (full match on module names) or a list of module-name suffixes, as PEFT takes them.
    target_modules: str | list[str] = DEFAULT_LORA_TARGETS
    train: Optim = field(default_factory=_lora_optim)
    checkpoint_every: int = 10  # one trajectory checkpoint every N steps ...
    keep_checkpoints: int = 8  # ... of which the last K are kept (the generator's data)
    eval_max_images: int = 100  # valid images per task for LoRA metrics (0 = all)
    cross_eval_ranks: list[int] = field(default_factory=lambda: [4])  # ranks evaluated on every task

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not self.ranks or any(r < 1 for r in self.ranks):
            out.append(("ranks", "needs at least one rank, each >= 1"))
        if not self.seeds:
            out.append(("seeds", "needs at least one seed"))
        if not 0.0 <= self.dropout < 1.0:
            out.append(("dropout", "must be in [0, 1)"))
        if self.alpha <= 0:
            out.append(("alpha", "must be > 0"))
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            out.append(("checkpoint_every", "checkpoint_every and keep_checkpoints must be >= 1"))
        elif self.checkpoint_every * self.keep_checkpoints > self.train.steps:
            out.append(("keep_checkpoints", f"{self.keep_checkpoints} checkpoints every {self.checkpoint_every} steps "
                        f"need more than lora.train.steps = {self.train.steps}"))
        if isinstance(self.target_modules, str):
            import re

            try:
                re.compile(self.target_modules)
            except re.error as exc:
                out.append(("target_modules", f"is not a valid regex ({exc})"))
        if self.eval_max_images < 0:
            out.append(("eval_max_images", "must be >= 0"))
        return out


@dataclass
class TaskVectorConfig:
    method: Literal["icl", "reference", "text"] = "icl"  # the vectors the generator is conditioned on
    # icl: last target position | mean over target positions | label: after the category-name tokens |
    # match: where the base, describing the image itself, names the labelled object
    pooling: Literal["last", "mean", "label", "match"] = "match"
    examples: int = 16  # labelled examples per task (icl)
    reference_rank: int = 4  # reference: the trained adapter of this rank generates ...
    reference_examples: int = 30  # ... on this many training images (the paper's 30)
    compare: list[str] = field(default_factory=lambda: ["icl", "reference", "text"])

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.examples < 2 or self.reference_examples < 1:
            out.append(("examples", "needs >= 2 examples (and reference_examples >= 1)"))
        bad = [m for m in self.compare if m not in ("icl", "reference", "text")]
        if bad:
            out.append(("compare", f"{bad} are not methods (icl, reference, text)"))
        return out


@dataclass
class GeneratorConfig:
    # Tasks the generator never sees: no checkpoint of theirs enters its training data or
    # the normalization statistics. Their adapters are generated from task vectors alone.
    holdout: list[str] = field(default_factory=lambda: ["star"])
    # centered: subtract the training tasks' element-wise mean checkpoint, then z-score per
    # tensor (statistics over the training tasks' checkpoints).
    # train_tasks: per-tensor z-score only, statistics over the training tasks' checkpoints.
    # per_checkpoint: the paper's variant, each checkpoint's tensors z-scored by their own
    # statistics; de-normalizing a generated adapter then needs a trained checkpoint of the
    # target task, so it leaks that task's weights into "generation".
    normalization: Literal["centered", "train_tasks", "per_checkpoint"] = "centered"

    def problems(self) -> list[tuple[str, str]]:
        return [("holdout", "has duplicates")] if len(set(self.holdout)) != len(self.holdout) else []


@dataclass
class CVAEParams:
    """The generator (the paper's 1-D conv CVAE); sizes default from D, the flattened adapter."""

    channels: list[int] = field(default_factory=list)  # [] = picked from D (the paper's 12 layers at real scale)
    max_layers: int = 12
    kernel_size: int = 7
    latent_dim: int = 256
    hidden_dim: int = 0  # feature before the mu/logvar heads; 0 = latent_dim
    pad_multiple: int = 0  # 0 = 2 ** len(channels); the paper pads to a multiple of 4096
    kl_weight: float = 0.005
    norm: Literal["group", "batch", "none"] = "group"
    epochs: int = 100
    batch_size: int = 8
    lr: float = 2e-3
    checkpoint_every: int = 25  # epochs between resumable states

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for key in ("max_layers", "kernel_size", "latent_dim", "epochs", "batch_size", "checkpoint_every"):
            if getattr(self, key) < 1:
                out.append((key, "must be >= 1"))
        if self.kernel_size % 2 == 0:
            out.append(("kernel_size", "must be odd"))
        if self.lr <= 0 or self.kl_weight < 0:
            out.append(("lr", "lr must be > 0 and kl_weight >= 0"))
        return out


@dataclass
class GenerateConfig:
    samples: int = 3  # latents z ~ N(0, I) per task and rank, plus z = 0


@dataclass
class EvaluateConfig:
    max_images: int = 100  # valid images per task (0 = all)
    cross_task_ranks: list[int] = field(default_factory=lambda: [4])  # generated adapter of task i on task j
    noise_seed: int = 0


@dataclass
class Config:
    seed: int = 2024
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    task_vectors: TaskVectorConfig = field(default_factory=TaskVectorConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    cvae: CVAEParams = field(default_factory=CVAEParams)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__}")
            return tp()
        return _build(tp, value, key + ".", problems)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _convert(arg, value, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
            return []
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field type {tp} is not supported")  # a bug in this module


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            problems.append(f"{prefix}{key}: unknown key; allowed keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
    before = len(problems)
    kwargs = {name: _convert(hints[name], data[name], prefix + name, problems) for name in names if name in data}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # only reachable through a type error already reported
        problems.append(f"{prefix.rstrip('.')}: {exc}")
        return cls()
    if len(problems) == before and hasattr(obj, "problems"):
        problems.extend(f"{prefix}{k}: {msg}" for k, msg in obj.problems())
    return obj


def config_from_dict(data: dict, source: str = PARAMS_FILE) -> Config:
    problems: list[str] = []
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    cfg = _build(Config, data, "", problems)
    if not problems:
        unknown = [t for t in cfg.generator.holdout if t not in cfg.data.tasks]
        if unknown:
            problems.append(f"generator.holdout: {unknown} not in data.tasks ({', '.join(cfg.data.tasks)})")
        elif len(cfg.generator.holdout) >= len(cfg.data.tasks):
            problems.append("generator.holdout: leaves no training task for the generator")
        if cfg.task_vectors.method == "reference" and cfg.task_vectors.reference_rank not in cfg.lora.ranks:
            problems.append(f"task_vectors.reference_rank: {cfg.task_vectors.reference_rank} is not in lora.ranks")
    if problems:
        raise InputError(f"{source}: invalid parameters", problems)
    return cfg


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (only true/false). DVC rewrites params.yaml under `dvc exp run -S`
    with a YAML 1.2 writer, which leaves `no` unquoted; YAML 1.1 would read it as False."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def read_yaml(text: str):
    return yaml.load(text, Loader=Yaml12Loader)


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    path = Path(path)
    try:
        data = read_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: parameters file not found (run from the repository root)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    return config_from_dict(data, str(path))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Config (or nested dict) -> {"dotted.key": value}, as MLflow params."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
