"""Stage `task_vectors`: one vector per task from the model's own hidden states.

    python -m icmlora task_vectors

Methods (``task_vectors.method`` picks the one written for the generator; all are computed
and compared in metrics/task_vectors.json):
- ``icl`` (default): the *base* model reads k labelled examples of the task; the last decoder
  layer's hidden states are pooled per example and averaged (``task_vectors.pooling``).
  ``match`` (default): the base describes the example image itself (``<OD>``), and the state at
  the position where it names the object that overlaps the labelled box is taken: how the base
  sees the task's objects. ``last`` / ``mean`` / ``label``: the image and the target text are
  teacher-forced, and the state at the last target position, the mean over target positions, or
  the states right after the target's category-name tokens are taken. The base has never read a
  task name, so those states say little about the task (silhouettes near 0, see README).
  Needs no trained LoRA, so it works for a task never trained.
- ``reference``: the paper's code: the task's trained adapter generates on training images
  and the last decoder layer's state at the last position is averaged.
- ``text``: the base model's text encoder on a short task description.

Writes data/task_vectors.safetensors (``vectors`` [tasks x d], ``<method>_examples`` per-example
vectors), data/task_vectors.json (task names, method), metrics/task_vectors.json
(silhouette of per-example vectors grouped by task, per method and pooling) and
metrics/plots/task_vectors/<method>.png (2-D PCA projection).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from icmlora.config import Config, load_config
from icmlora.data.florence_format import ANNOTATIONS_FILE, read_annotations
from icmlora.data.prepare import PREPARED_DIR, task_dir
from icmlora.files import atomic_path, write_json
from icmlora.florence import LOC_TOKENS, encode, load_base, load_images
from icmlora.lora.train import BASE_DIR, LORA_DIR, adapter_name

OUT_FILE = Path("data/task_vectors.safetensors")
METRICS_FILE = Path("metrics/task_vectors.json")
PLOTS_DIR = Path("metrics/plots/task_vectors")
METHODS = ("icl", "reference", "text")
POOLINGS = ("last", "mean", "label", "match")


class LastDecoderLayer:
    """Records the output of the last decoder layer (a [B, T, d] tensor) during a forward."""

    def __init__(self, model):
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.layer = core.model.language_model.decoder.layers[-1]
        self.outputs: list[torch.Tensor] = []

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(
            lambda _m, _i, out: self.outputs.append((out[0] if isinstance(out, tuple) else out).detach().float()))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _examples(prepared: Path, task: str, count: int):
    path = task_dir(prepared, task, "train") / ANNOTATIONS_FILE
    examples = read_annotations(path, check_images=False)[:count]
    return examples, load_images([path.parent / e.image for e in examples])


def icl_vectors(model, processor, prepared: Path, task: str, k: int, max_new_tokens: int = 48) -> dict[str, torch.Tensor]:
    """Per-example vectors [k, d] for every pooling."""
    return icl_vectors_of(model, processor, *_examples(prepared, task, k), max_new_tokens=max_new_tokens)


def _named_objects(seq: list[int], loc_index: dict[int, int], special: set[int], width: int, height: int):
    """(position whose state predicts the name, box) for each ``name <loc>x4`` in a generated sequence."""
    from icmlora.data.florence_format import Box, dequantize

    out = []
    for j in range(len(seq) - 5):
        name, locs = seq[j + 1], seq[j + 2 : j + 6]
        if name in special or name in loc_index or not all(t in loc_index for t in locs):
            continue
        q = [loc_index[t] for t in locs]
        out.append((j, Box("", dequantize(q[0], width), dequantize(q[1], height), dequantize(q[2], width), dequantize(q[3], height))))
    return out


def _match_vectors(model, inputs: dict, examples, loc_index: dict[int, int], special: set[int],
                   max_new_tokens: int) -> tuple[torch.Tensor, float]:
    """``match`` pooling: the base describes each example image itself (greedy ``<OD>``); for
    each labelled box, the last decoder layer's state at the position where the base names the
    object it boxes best (IoU) is taken, and an example's states are averaged. Returns the
    per-example vectors [k, d] and the fraction of labelled boxes matched at IoU >= 0.5. An
    example whose description boxes nothing uses the state that starts the description."""
    from icmlora.evaluation.metrics import MATCH_IOU, box_iou

    sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    with LastDecoderLayer(model) as hook:
        model(**inputs, decoder_input_ids=sequences)  # position j's state predicts sequences[:, j + 1]
    hidden = hook.outputs[-1]
    vectors, matched, total = [], 0, 0
    for row, (example, seq) in enumerate(zip(examples, sequences.tolist())):
        named = _named_objects(seq, loc_index, special, example.width, example.height)
        picks = []
        for box in example.boxes:
            total += 1
            if not named:
                continue
            overlap, position = max((box_iou(b, box), j) for j, b in named)
            matched += overlap >= MATCH_IOU
            picks.append(position)
        vectors.append(hidden[row, picks].mean(0) if picks else hidden[row, 0])
    return torch.stack(vectors), matched / max(total, 1)


@torch.no_grad()
def icl_vectors_of(model, processor, examples, images, max_new_tokens: int = 48) -> dict[str, torch.Tensor]:
    batch = encode(processor, images, [e.prefix for e in examples], [e.suffix for e in examples])
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with LastDecoderLayer(model) as hook:
        model(**batch)
    hidden = hook.outputs[-1]  # [k, T, d], position t is the state after reading labels[:t] (shifted)
    mask = (labels != -100).float()
    last = mask.sum(1).long() - 1
    # Category-name tokens (not <loc_N>, not special): the state one position later has read them.
    tok = processor.tokenizer
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    loc_index = {t: i for i, t in enumerate(tok.convert_tokens_to_ids(LOC_TOKENS))}
    is_name = torch.tensor([[t not in special and t != -100 and t not in loc_index for t in row] for row in labels.tolist()])
    name_mask = torch.zeros_like(mask)
    name_mask[:, 1:] = is_name[:, :-1].float()
    name_mask = torch.where(name_mask.sum(1, keepdim=True) > 0, name_mask, mask)  # no box: fall back to all positions
    match, matched = _match_vectors(model, inputs, examples, loc_index, special, max_new_tokens)
    return {
        "last": hidden[torch.arange(len(examples)), last],
        "mean": (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
        "label": (hidden * name_mask[..., None]).sum(1) / name_mask.sum(1, keepdim=True),
        "match": match,
        "matched": torch.tensor(matched),
    }


@torch.no_grad()
def reference_vectors(model, processor, prepared: Path, task: str, k: int, max_new_tokens: int) -> torch.Tensor:
    """The paper's code: the tuned adapter generates; last decoder layer, last position."""
    examples, images = _examples(prepared, task, k)
    inputs = processor(text=[e.prefix for e in examples], images=images, return_tensors="pt")
    with LastDecoderLayer(model) as hook:
        model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    # One hook call per generated position; the last call holds the final position of each sequence.
    return hook.outputs[-1][:, -1]


TEXT_TEMPLATES = ("Locate the {} in the image.", "Find every {}.", "Detect {} objects.", "Where is the {}?")


@torch.no_grad()
def text_vector(model, processor, task: str) -> torch.Tensor:
    """[templates, d]: the text encoder's mean state on a few descriptions of the task."""
    tok = processor.tokenizer([t.format(task) for t in TEXT_TEMPLATES], return_tensors="pt", padding=True)
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = core.model.language_model.encoder
    hidden = encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    mask = tok.attention_mask[..., None].float()
    return (hidden * mask).sum(1) / mask.sum(1)


def silhouette(vectors: dict[str, torch.Tensor]) -> float:
    from sklearn.metrics import silhouette_score

    x = torch.cat(list(vectors.values())).numpy()
    y = [i for i, v in enumerate(vectors.values()) for _ in range(len(v))]
    if len(set(y)) < 2 or len(x) <= len(set(y)):
        return 0.0
    return float(silhouette_score(x, y, metric="cosine"))


def plot_projection(vectors: dict[str, torch.Tensor], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.cat(list(vectors.values())).double()
    x = x - x.mean(0)
    # An exact SVD: torch.pca_lowrank is randomized, and the plot is a DVC output.
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ vh[:2].T).float().numpy()
    fig, ax = plt.subplots(figsize=(5, 4))
    start = 0
    for task, vec in vectors.items():
        ax.scatter(xy[start : start + len(vec), 0], xy[start : start + len(vec), 1], s=12, label=task)
        start += len(vec)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def compute_task_vectors(cfg: Config, prepared: Path = PREPARED_DIR, base_dir: Path = BASE_DIR, lora_dir: Path = LORA_DIR,
                         out_file: Path = OUT_FILE, metrics_file: Path = METRICS_FILE, plots_dir: Path = PLOTS_DIR) -> dict:
    from peft import PeftModel

    tv = cfg.task_vectors
    start = time.perf_counter()
    model, processor = load_base(base_dir)
    model.eval()
    per_example: dict[str, dict[str, torch.Tensor]] = {f"icl_{p}": {} for p in POOLINGS}
    per_example.update(reference={}, text={})
    matched: dict[str, float] = {}
    for task in tqdm(cfg.data.tasks, desc="task_vectors", unit="task"):
        icl = icl_vectors(model, processor, prepared, task, tv.examples, cfg.eval.max_new_tokens)
        for pooling in POOLINGS:
            per_example[f"icl_{pooling}"][task] = icl[pooling]
        matched[task] = round(float(icl["matched"]), 4)
        per_example["text"][task] = text_vector(model, processor, task)
        adapter = lora_dir / adapter_name(task, tv.reference_rank, cfg.lora.seeds[0]) / "final"
        if "reference" in tv.compare and adapter.is_dir():
            tuned = PeftModel.from_pretrained(model, adapter)
            per_example["reference"][task] = reference_vectors(tuned, processor, prepared, task, tv.reference_examples,
                                                               cfg.eval.max_new_tokens)
            model = tuned.unload()
    metrics: dict = {"method": tv.method, "pooling": tv.pooling, "examples": tv.examples, "silhouette": {},
                     "match_fraction": matched}
    for name, vecs in per_example.items():
        if len(vecs) == len(cfg.data.tasks):
            metrics["silhouette"][name] = round(silhouette(vecs), 4)
            plot_projection(vecs, f"{name}: silhouette {metrics['silhouette'][name]:.2f}", plots_dir / f"{name}.png")
    chosen = per_example[f"icl_{tv.pooling}" if tv.method == "icl" else tv.method]
    vectors = torch.stack([chosen[t].mean(0) for t in cfg.data.tasks])
    metrics["default_silhouette"] = metrics["silhouette"].get(f"icl_{tv.pooling}" if tv.method == "icl" else tv.method)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    tensors = {"vectors": vectors.contiguous()}
    tensors.update({f"{name}_examples": torch.cat([v[t] for t in cfg.data.tasks]).contiguous()
                    for name, v in per_example.items() if len(v) == len(cfg.data.tasks)})
    with atomic_path(out_file) as tmp:
        # One metadata key: safetensors writes a metadata dict in an order that varies between runs.
        save_file(tensors, str(tmp), metadata={"tasks": ",".join(cfg.data.tasks)})
    write_json(out_file.with_suffix(".json"), {"tasks": cfg.data.tasks, "method": tv.method, "pooling": tv.pooling,
                                               "dim": vectors.shape[1]})
    write_json(metrics_file, metrics)
    return metrics


def load_task_vectors(path: Path = OUT_FILE) -> dict[str, torch.Tensor]:
    """{task: vector} from data/task_vectors.safetensors."""
    from safetensors import safe_open

    from icmlora.errors import InputError

    if not Path(path).is_file():
        raise InputError(f"{path}: not found (run `dvc repro task_vectors`)")
    with safe_open(str(path), framework="pt") as fh:
        tasks = fh.metadata()["tasks"].split(",")
        vectors = fh.get_tensor("vectors")
    return dict(zip(tasks, vectors))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="icmlora task_vectors", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    m = compute_task_vectors(cfg)
    sil = ", ".join(f"{k} {v:.2f}" for k, v in m["silhouette"].items())
    print(f"task_vectors: wrote {OUT_FILE} ({len(cfg.data.tasks)} tasks, method {m['method']}/{m['pooling']}; "
          f"silhouette {sil}) and {METRICS_FILE}")
    return m
