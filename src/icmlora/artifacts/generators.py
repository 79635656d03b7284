"""models/cvae/r<rank>/: one trained generator per rank, of the kind ``cvae.kind`` picks
(``icmlora.generators``; the folder keeps its name whatever the kind).

``model.safetensors`` holds the generator's weights (a ridge map's: its dual form) and the condition
standardization (``condition.mean``, ``condition.scale``); ``config.json`` holds the kind (``kind``;
absent in generators saved before kinds existed: the CVAE), the architecture (``model``, which
rebuilds the network), the task list, the training tasks, the held-out tasks, the number
of rows it learned from, its parameter count and the task-vector method it was conditioned on.
No run id is written: a DVC output must not change from run to run.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from icmlora.artifacts import CVAE_DIR, generator_dir
from icmlora.cvae import Generator
from icmlora.errors import InputError
from icmlora.files import atomic_dir, read_json, write_json
from icmlora.generators import KINDS, model_from_json

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def write_generator(rank: int, generator: Generator, root: Path = CVAE_DIR) -> Path:
    folder = generator_dir(rank, root)
    with atomic_dir(folder) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in generator.model.state_dict().items()}
        weights.update({"condition.mean": generator.cond_mean.contiguous(),
                        "condition.scale": generator.cond_scale.contiguous()})
        save_file(weights, str(tmp / WEIGHTS_FILE))
        write_json(tmp / CONFIG_FILE, generator.meta)
    return folder


def read_generator(rank: int, root: Path = CVAE_DIR) -> Generator:
    folder = generator_dir(rank, root)
    if not (folder / CONFIG_FILE).is_file():
        raise InputError(f"{folder}: no generator here (run `dvc repro train_cvae@{rank}`)")
    meta = read_json(folder / CONFIG_FILE)
    kind = meta.get("kind", "cvae")
    if kind not in KINDS:
        raise InputError(f"{folder / CONFIG_FILE}: kind {kind!r} is not a generator this version knows ({list(KINDS)})")
    model = model_from_json(kind, meta["model"])
    tensors = load_file(str(folder / WEIGHTS_FILE))
    cond_mean, cond_scale = tensors.pop("condition.mean"), tensors.pop("condition.scale")
    model.load_state_dict(tensors)
    return Generator(model, cond_mean, cond_scale, meta)


def generator_bytes(rank: int, root: Path = CVAE_DIR) -> int:
    return (generator_dir(rank, root) / WEIGHTS_FILE).stat().st_size
