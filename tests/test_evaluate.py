"""Stage evaluate (``icmlora.stages.evaluate``) in-process on the micro setting, with conftest's
``generators`` (a flow of random weights per rank) and stand-in trained and few-shot adapters (the
setting's checkpoints).

The fast tests replace one thing, the model's box writing (``predict``, which scoring and few_shot call):
``Detector`` writes, for each image, some of its true boxes (moved a little) and some false ones, drawn
by a generator seeded with the bits of the adapter weights the model holds then (one seed for the base,
its adapter disabled; one for rank 1's adapters on train images, so its samples tie on the support
examples; one adapter, a training task's trained one, writes exactly the true boxes, so the oracle's
pick does not depend on the CPU's bits). The rest is evaluate's own: PEFT loading the weights, the
Scorer, the COCO metrics, the bootstrap. So scores differ from adapter to adapter, and every figure is
checked against its definition: the weights of the adapter its source names, recomputed here, looked
up among the weights the model held when it wrote boxes; where the definition is a library function
tested on its own (``novelty``, ``retrieval_weights``, the paired bootstrap), that function's result on
the inputs the definition names. The stage with the real tiny model writing the boxes
runs under `dvc repro` in tests/test_pipeline.py (slow), which checks its tables, verdicts and runs."""

import os
import shutil
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from icmlora.artifacts import checkpoint_name, checkpoints_dir, few_shot_dir, final_adapter_dir, generated_dir, sample_dir
from icmlora.artifacts.adapters import adapter_bytes, read_adapter, trajectory
from icmlora.artifacts.annotations import read_split
from icmlora.artifacts.generators import read_generator
from icmlora.artifacts.lora_matrix import flatten, read_lora_matrix
from icmlora.artifacts.task_vectors import read_task_vectors
from icmlora.comparison import ap50_table, best_of_n_rows, bootstrap_counts, error_overlap, paired_bootstrap
from icmlora.errors import InputError
from icmlora.files import read_json, write_json
from icmlora.config import PredictParams
from icmlora.florence.format import Box
from icmlora.generators.ridge import fit_training_tasks
from icmlora.images import load_images
from icmlora.metrics import detection_metrics
from icmlora.stages import evaluate as stage
from icmlora.stages.evaluate import METRIC_KEYS, evaluate, novelty, retrieval_weights
from icmlora.stages.collect_params import collect_params
from icmlora.stages.generate import generate_all
from icmlora import tracking
from icmlora.tracking import MLFLOW_PARAM_LIMIT, spool_folder, stage_params
from params_helpers import params_dict

HELD = "triangle"  # micro's held-out task
DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
FEW_SHOT = {"lr": 0.005, "steps": 4}
TICK = 0.123456  # the fake clock's step (seconds)


def _paths(out):
    """conftest's ``generators`` folder, or a namespace of (gen, tv, matrix) paths."""
    if isinstance(out, SimpleNamespace):
        return out
    return SimpleNamespace(gen=out / "gen", tv=out / "tv.safetensors", matrix=out / "matrix")


def _inputs(cfg, out, work, final_adapters):
    """Final adapters (each task's last checkpoint), generated samples and few-shot adapters (the
    held-out task's first checkpoint) beside the generators' outputs."""
    out = _paths(out)
    lora = final_adapters(work / "lora", cfg.lora.ranks)
    generate_all(cfg, out.gen, out.matrix, out.tv, work / "generated", work / "g.json", work / "gt.json")
    for rank in cfg.lora.ranks:
        shutil.copytree(checkpoints_dir(HELD, rank, 0, lora) / checkpoint_name(2), few_shot_dir(HELD, rank, work / "few_shot"))
    write_json(work / "few_shot.json", {"tasks": {HELD: {f"r{rank}": FEW_SHOT for rank in cfg.lora.ranks}}})
    return lora


def _evaluate(cfg, root, out, work, lora, **changes):
    paths = dict(out_csv=work / "comparison.csv", cross_csv=work / "cross.csv", bootstrap_csv=work / "bootstrap.csv",
                 out_json=work / "evaluate.json", timing=work / "timing.json", few_shot_root=work / "few_shot",
                 few_shot_json=work / "few_shot.json")
    out = _paths(out)
    return evaluate(cfg, root / "prepared", root / "base", lora, out.matrix, out.gen, work / "generated", out.tv,
                    **{**paths, **changes})


def _digest(image) -> int:
    return zlib.crc32(image.tobytes())


class Detector:
    """``predict``'s stand-in: an image's boxes are a function of the image and of the adapter weights
    the model holds (their bits); every call is kept as (image digests, flattened weights or None for
    the base, predictions). Adapters of ``tie_sizes`` parameters write the same boxes on train images
    whatever their weights: their samples tie on the support examples."""

    def __init__(self, prepared, tasks, tie_sizes=(), perfect=()):
        self.truth, self.train, self.tie_sizes, self.perfect = {}, set(), set(tie_sizes), list(perfect)
        for task in tasks:
            for split in ("train", "valid"):
                examples, folder = read_split(task, split, prepared)
                for example, image in zip(examples, load_images([folder / e.image for e in examples])):
                    key = _digest(image)
                    self.truth[key] = example.boxes
                    if split == "train":
                        self.train.add(key)
        self.calls = []

    def __call__(self, model, processor, images, params, *, desc="predict", prompt=None, encoded=None):
        from peft.tuners.tuners_utils import BaseTunerLayer

        if processor is None or not isinstance(params, PredictParams):  # what the real predict needs
            raise TypeError(f"predict needs the processor and the predict params, got {processor!r}, {params!r}")
        off = any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))
        held = sorted((name, p) for name, p in model.named_parameters() if "lora_" in name)  # the order of sorted(names)
        weights = None if off else torch.cat([p.detach().flatten() for _, p in held]).cpu()
        keys = tuple(_digest(image) for image in images)
        tie = not off and len(weights) in self.tie_sizes and set(keys) <= self.train
        seed = 0 if off else 1 if tie else zlib.crc32(weights.numpy().tobytes()) + 2
        if not off and any(_same(w, weights) for w in self.perfect):
            preds = [[Box(b.label, b.x1, b.y1, b.x2, b.y2, 1.0) for b in self.truth[key]] for key in keys]
        else:
            preds = [self._boxes(np.random.default_rng([seed, key]), self.truth[key]) for key in keys]
        self.calls.append((keys, weights, preds))
        return preds

    @staticmethod
    def _boxes(rng, truth) -> list[Box]:
        boxes = []
        for box in truth:
            if rng.random() < 0.6:  # found, a pixel or two off
                dx, dy = rng.uniform(-2, 2, size=2)
                boxes.append(Box(box.label, box.x1 + dx, box.y1 + dy, box.x2 + dx, box.y2 + dy, float(rng.random())))
            if rng.random() < 0.4:  # a false one
                x, y = rng.uniform(0, 40, size=2)
                boxes.append(Box(box.label, x, y, x + 9, y + 9, float(rng.random())))
        return boxes


def _split(root, task, split="valid", count=None):
    examples, folder = read_split(task, split, root / "prepared")
    examples = examples[:count]
    return examples, tuple(_digest(image) for image in load_images([folder / e.image for e in examples]))


def _same(a, b) -> bool:
    """The same adapter weights up to float32 rounding (a de-normalized row and the checkpoint it came from
    are equal up to rounding, not bit for bit)."""
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def _candidates(detector, keys, vector):
    """Every prediction list the model wrote for these images while holding these weights (``_same``)."""
    found = [p for k, w, p in detector.calls if k == keys and w is not None and _same(w, vector)]
    assert found, "the model never wrote boxes for these images with these weights"
    return found


def _metrics(examples, preds):
    m = detection_metrics([e.boxes for e in examples], preds, [(e.width, e.height) for e in examples])
    return {k: m[k] for k in (*METRIC_KEYS, "num_pred")}


def _scored_as(row, examples, candidates):
    """The predictions among ``candidates`` whose metrics are the row's (asserts there is one)."""
    got = {k: row[k] for k in (*METRIC_KEYS, "num_pred")}
    match = [p for p in candidates if _metrics(examples, p) == pytest.approx(got, rel=1e-12, abs=0, nan_ok=True)]
    assert match, (row["task"], row["source"], row["sample"], got, [_metrics(examples, p) for p in candidates])
    return match[0]


@pytest.fixture
def evaluated(generators, final_adapters, tmp_path):
    """evaluate run once on micro (the one test below checks every figure of that run: mutmut runs, for a
    mutant of ``evaluate()``, only the tests that called it, so a fixture shared by several tests would
    leave all but the first unrun). The matrices use ``per_checkpoint`` normalization, the one where a
    task's own statistics change what a generator's sample de-normalizes to, and noise_seed is not 0."""
    cfg, root, out = generators
    cfg = cfg.model_copy(update={"cvae": cfg.cvae.model_copy(update={"normalization": "per_checkpoint"}),
                                 "evaluate": cfg.evaluate.model_copy(update={"noise_seed": 3, "bootstrap_resamples": 200})})
    out, work = SimpleNamespace(gen=out / "gen", tv=out / "tv.safetensors", matrix=tmp_path / "matrix"), tmp_path / "work"
    work.mkdir()
    for rank in cfg.lora.ranks:
        collect_params(cfg, rank, root / "lora", out.matrix)
    lora = _inputs(cfg, out, work, final_adapters)
    # Rank 1's samples tie on the support examples (the tie rule decides); rank 2's are scored by their weights.
    # square's trained adapter writes the true boxes: the held-out task's oracle picks it, the second training task.
    perfect = [flatten(read_adapter(final_adapter_dir("square", r, 0, lora))[0], read_lora_matrix(r, out.matrix).manifest.names)
               for r in cfg.lora.ranks]
    detector = Detector(root / "prepared", cfg.data.tasks, tie_sizes=[read_lora_matrix(1, out.matrix).manifest.dim],
                        perfect=perfect)
    ticks = iter(100 + TICK * n for n in range(1000))  # a clock that does not start at 0, as perf_counter's
    bars, logged, vectors_read = [], [], []
    real_icl = stage.icl_vectors

    def icl_vectors(model, processor, examples, images, max_new_tokens):
        vectors_read.append(([e.image for e in examples], len(images), max_new_tokens))
        return real_icl(model, processor, examples, images, max_new_tokens)

    def tqdm(iterable, **kwargs):
        bars.append(kwargs)
        return iterable

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("icmlora.scoring.predict", detector)
        mp.setattr("icmlora.few_shot.predict", detector)
        mp.setattr(stage, "time", SimpleNamespace(perf_counter=lambda: next(ticks), time=time.time))
        mp.setattr(stage, "tqdm", tqdm)
        mp.setattr(stage, "icl_vectors", icl_vectors)
        mp.setattr(stage, "_log_runs", lambda *args: logged.append(args))
        shutil.copy(DVC_YAML, "dvc.yaml")  # as under `dvc repro`: the run logs the params dvc.yaml lists for evaluate
        frame = _evaluate(cfg, root, out, work, lora)
    ev = SimpleNamespace(cfg=cfg, root=root, out=out, work=work, lora=lora, frame=frame, detector=detector, bars=bars,
                         logged=logged, vectors_read=vectors_read)
    ev.expected = _expected_weights(ev)
    ev.splits = {t: _split(root, t, count=cfg.evaluate.eval_images) for t in cfg.data.tasks}  # (examples, digests) scored
    return ev


def _expected_weights(ev):
    """{(rank, task, source, sample): flattened weights} by each source's definition (evaluate's docstring),
    with the held-out task's single training adapters under source "single"."""
    cfg, out, work, lora = ev.cfg, ev.out, ev.work, ev.lora
    tasks = cfg.data.tasks
    vectors = read_task_vectors(out.tv)
    train_tasks = [t for t in tasks if t != HELD]
    g = torch.Generator().manual_seed(cfg.seed + cfg.evaluate.noise_seed)  # the noise and random-condition draws, in order
    mean_norm = torch.stack([vectors[t] for t in tasks]).norm(dim=1).mean()
    expected = {}
    for rank in cfg.lora.ranks:
        matrix, gen = read_lora_matrix(rank, out.matrix), read_generator(rank, out.gen)
        names, raw = matrix.manifest.names, torch.stack([matrix.raw(i) for i in range(len(matrix.rows))])
        train = torch.tensor([tasks[int(i)] != HELD for i in matrix.task_index])
        finals = {t: flatten(read_adapter(final_adapter_dir(t, rank, 0, lora))[0], names) for t in tasks}
        z0 = torch.zeros(1, gen.model.config.latent_dim)
        for ti, task in enumerate(tasks):
            stats = matrix.task_stats(task)
            own = raw[matrix.task_index == ti]
            key = lambda source, sample="-": (rank, task, source, sample)  # noqa: E731
            expected[key("trained")] = finals[task]
            expected[key("avg_checkpoint")] = own.mean(0)
            for name in ["z0", *map(str, range(cfg.generate.samples))]:
                folder = sample_dir(generated_dir(task, rank, work / "generated"), name)
                expected[key("generated", name)] = flatten(read_adapter(folder)[0], names)
            nov = novelty(expected[key("generated", "z0")], raw[train], own)
            nearest = raw[train][nov["nearest_index"]]
            noise = torch.randn(nearest.shape, generator=g)
            expected[key("noise")] = nearest + noise / noise.norm() * nov["nn_distance"]
            other = tasks[(ti + 1) % len(tasks)]
            expected[key("wrong_task", other)] = matrix.manifest.denormalize(gen.sample(vectors[other], z0)[0], stats)
            rnd = torch.randn(vectors[task].shape, generator=g)
            expected[key("random_condition")] = matrix.manifest.denormalize(gen.sample(rnd / rnd.norm() * mean_norm, z0)[0], stats)
            if task != HELD:
                continue
            for t in train_tasks:
                expected[key("single", t)] = finals[t]
            sims = torch.stack([torch.nn.functional.cosine_similarity(vectors[task], vectors[t], dim=0) for t in train_tasks])
            expected[key("nearest_task", train_tasks[int(sims.argmax())])] = finals[train_tasks[int(sims.argmax())]]
            mix = retrieval_weights(sims, cfg.evaluate.retrieval_k, cfg.evaluate.retrieval_temperature)
            label = "+".join(f"{train_tasks[i]}:{w:.2f}" for i, w in mix.items())
            expected[key("retrieval_mix", label)] = sum(w * finals[train_tasks[i]] for i, w in mix.items())
            expected[key("mean_training")] = torch.stack([finals[t] for t in train_tasks]).mean(0)
            expected[key("few_shot_lora", "lr=0.005,steps=4")] = flatten(read_adapter(few_shot_dir(task, rank, work / "few_shot"))[0], names)
            ridge, _ = fit_training_tasks(matrix.rows, matrix.task_index, tasks, vectors, {HELD})
            expected[key("ridge", f"lam={ridge.lam:.3g}")] = matrix.manifest.denormalize(ridge.predict(vectors[task]), stats)
    return expected


def _every_row_is_the_score_of_the_adapter_its_source_names(evaluated):
    ev = evaluated
    cfg, frame, detector = ev.cfg, ev.frame, ev.detector
    tasks = cfg.data.tasks
    expected = ev.expected
    splits = ev.splits
    assert all(len(examples) == cfg.evaluate.eval_images for examples, _ in splits.values())
    # The base: scored once per task (its predictions serve every rank), with its adapter disabled.
    assert [k for k, w, _ in detector.calls if w is None and k in {s[1] for s in splits.values()}] == [splits[t][1] for t in tasks]
    picks = []
    for rank in cfg.lora.ranks:
        for task in tasks:
            examples, keys = splits[task]
            rows = frame[(frame["rank"] == rank) & (frame["task"] == task)]
            named = sorted((r.source, r.sample) for r in rows.itertuples() if r.source != "oracle_single")
            assert named == sorted([("base", "-"), *(k[2:] for k in expected if k[:2] == (rank, task) and k[2] != "single")])
            (base,) = [p for k, w, p in detector.calls if w is None and k == keys]
            _scored_as(rows[rows["source"] == "base"].iloc[0], examples, [base])
            assert (rows["source"] == "oracle_single").sum() == (task == HELD)
            for r in rows[~rows["source"].isin(["base", "oracle_single"])].to_dict("records"):
                _scored_as(r, examples, _candidates(detector, keys, expected[(rank, task, r["source"], r["sample"])]))
                assert r["heldout"] == (task == HELD)
            if task == HELD:  # the oracle: the training adapter best on this split, in hindsight (ties: the first)
                single = {t: _metrics(examples, _candidates(detector, keys, w)[0])["map50"]
                          for (rk, tk, source, t), w in expected.items() if (rk, tk, source) == (rank, task, "single")}
                best = max(single, key=lambda t: (single[t], -list(single).index(t)))
                oracle = rows[rows["source"] == "oracle_single"]
                assert oracle["sample"].item() == best and oracle["map50"].item() == single[best]
                picks.append(list(single).index(best))
    assert picks == [1] * len(cfg.lora.ranks)  # square's perfect adapter: not the first training task, whatever the bits


def _a_heldout_tasks_samples_are_scored_on_its_support_examples_and_the_best_is_marked(evaluated):
    ev = evaluated
    cfg, frame, detector = ev.cfg, ev.frame, ev.detector
    expected = ev.expected
    support, keys = _split(ev.root, HELD, "train", cfg.task_vectors.examples)
    for rank in cfg.lora.ranks:
        generated = frame[(frame["rank"] == rank) & (frame["task"] == HELD) & (frame["source"] == "generated")]
        scores = {}
        for r in generated.to_dict("records"):
            (preds, *_) = _candidates(detector, keys, expected[(rank, HELD, "generated", r["sample"])])
            scores[r["sample"]] = detection_metrics([e.boxes for e in support], preds,
                                                    [(e.width, e.height) for e in support])["map50"]
            assert r["support_map50"] == scores[r["sample"]]
        best = max(sorted(scores, key=lambda n: (n != "z0", n)), key=lambda n: scores[n])  # ties: z0, then in order
        assert generated.loc[generated["best_of_n"].astype(bool), "sample"].tolist() == [best]
        if rank == 1:  # the stand-in made rank 1's samples tie, so the mark checked above is the tie rule's: z0
            assert len(set(scores.values())) == 1 and best == "z0"
    assert frame.loc[frame["task"] != HELD, "support_map50"].isna().all()
    assert len(set(frame.loc[frame["source"] == "generated", "map50"])) > 3  # the stand-in's scores differ by adapter
    # The task vector a user pays for: the first k train examples of the held-out task, read by the base.
    examples, _ = read_split(HELD, "train", ev.root / "prepared")
    k = cfg.task_vectors.examples
    assert ev.vectors_read == [([e.image for e in examples[:k]], k, cfg.predict.max_new_tokens)]


def _novelty_and_error_overlap_of_each_sample(evaluated):
    ev = evaluated
    cfg, frame, detector = ev.cfg, ev.frame, ev.detector
    tasks = cfg.data.tasks
    expected = ev.expected
    for rank in cfg.lora.ranks:
        matrix = read_lora_matrix(rank, ev.out.matrix)
        raw = torch.stack([matrix.raw(i) for i in range(len(matrix.rows))])
        train = torch.tensor([tasks[int(i)] != HELD for i in matrix.task_index])
        for ti, task in enumerate(tasks):
            examples, keys = ev.splits[task]
            truth = [e.boxes for e in examples]
            own_index = (matrix.task_index == ti).nonzero()[:, 0]
            own = raw[own_index]
            last = raw[own_index[-1]]
            pair = raw[own_index[int(torch.cdist(last[None], own[:-1])[0].argmin())]]  # the checkpoint nearest the last
            between = {error_overlap(truth, a, b) for a in _candidates(detector, keys, last)
                       for b in _candidates(detector, keys, pair)}
            rows = frame[(frame["rank"] == rank) & (frame["task"] == task) & (frame["source"] == "generated")]
            for r in rows.to_dict("records"):
                vec = expected[(rank, task, "generated", r["sample"])]
                nov = novelty(vec, raw[train], own)
                assert {k: r[k] for k in ("nn_distance", "novelty_ratio", "nn_cosine")} == pytest.approx(
                    {k: nov[k] for k in ("nn_distance", "novelty_ratio", "nn_cosine")}, rel=1e-5, abs=1e-6)
                preds = _scored_as(r, examples, _candidates(detector, keys, vec))
                nearest = raw[train][nov["nearest_index"]]
                assert r["error_iou"] in {error_overlap(truth, preds, p) for p in _candidates(detector, keys, nearest)}
                assert r["error_iou_checkpoints"] in between
            noise = frame[(frame["rank"] == rank) & (frame["task"] == task) & (frame["source"] == "noise")]
            z0 = novelty(expected[(rank, task, "generated", "z0")], raw[train], own)
            assert noise["nearest_task"].item() == tasks[int(matrix.task_index[train.nonzero()[:, 0][z0["nearest_index"]]])]
            assert frame.loc[frame["source"] != "noise", "nearest_task"].isna().all()


def _bootstrap_rows_are_paired_over_the_same_resamples(evaluated):
    """bootstrap.csv, rebuilt from the rows' predictions: AP50 tables per (task, source, sample), each task's
    images resampled the same way for every source and rank, and the best-of-N rows of the held-out task."""
    ev = evaluated
    cfg, frame, detector = ev.cfg, ev.frame, ev.detector
    tasks = cfg.data.tasks
    expected = ev.expected
    splits = ev.splits
    counts = {t: bootstrap_counts(cfg.evaluate.eval_images, cfg.evaluate.bootstrap_resamples,
                                  np.random.default_rng([cfg.seed, cfg.evaluate.noise_seed, ti])) for ti, t in enumerate(tasks)}
    rows = []
    for rank in cfg.lora.ranks:
        tables = {}
        for r in frame[frame["rank"] == rank].to_dict("records"):
            examples, keys = splits[r["task"]]
            if r["source"] == "base":
                (preds,) = [p for k, w, p in detector.calls if w is None and k == keys]
            else:
                source = "single" if r["source"] == "oracle_single" else r["source"]  # the training adapter it names
                preds = _scored_as(r, examples, _candidates(detector, keys, expected[(rank, r["task"], source, r["sample"])]))
            tables[(r["task"], r["source"], r["sample"])] = ap50_table([e.boxes for e in examples], preds, cfg.task_label(r["task"]))
        generated = frame[(frame["rank"] == rank) & (frame["source"] == "generated") & frame["best_of_n"].eq(True)]
        chosen = dict(zip(generated["task"], generated["sample"]))
        assert list(chosen) == [HELD]
        rows += [{"rank": rank, **row} for row in paired_bootstrap(tables, tasks, {HELD}, counts, cfg.evaluate.confidence)
                 + best_of_n_rows(tables, chosen, counts, cfg.evaluate.confidence, "z0")]
    want = pd.DataFrame(rows).assign(resamples=cfg.evaluate.bootstrap_resamples, confidence=cfg.evaluate.confidence)
    got = pd.read_csv(ev.work / "bootstrap.csv")
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    for column in want.columns:
        if pd.api.types.is_numeric_dtype(want[column]):
            assert got[column].to_numpy() == pytest.approx(want[column].to_numpy(), rel=1e-5, abs=1e-9), column
        else:
            assert got[column].tolist() == want[column].tolist(), column
    assert set(got["verdict"]) - {"better", "worse", "indistinguishable"} == set()


def _cross_task_scores_each_tasks_z0_adapter_on_every_other_task(evaluated):
    ev = evaluated
    cfg, detector = ev.cfg, ev.detector
    tasks = cfg.data.tasks
    expected = ev.expected
    cross = pd.read_csv(ev.work / "cross.csv")
    assert list(cross.columns) == ["rank", "adapter_task", "eval_task", "map50"]
    assert cfg.evaluate.cross_task_ranks == [2] and (cross["rank"] == 2).all()
    assert list(zip(cross["adapter_task"], cross["eval_task"])) == [(a, b) for a in tasks for b in tasks if a != b]
    for r in cross.to_dict("records"):
        examples, keys = ev.splits[r["eval_task"]]
        scores = [_metrics(examples, p)["map50"] for p in _candidates(detector, keys, expected[(2, r["adapter_task"], "generated", "z0")])]
        assert any(r["map50"] == pytest.approx(s, rel=1e-5, abs=1e-9) for s in scores), (r, scores)


def _evaluate_writes_its_files_timing_and_progress(evaluated):
    ev = evaluated
    cfg, work, frame = ev.cfg, ev.work, ev.frame
    tasks = cfg.data.tasks
    assert list(frame.columns) == ["task", "rank", "source", "sample", "heldout", *METRIC_KEYS, "num_pred", "nn_distance",
                                   "novelty_ratio", "nn_cosine", "error_iou", "error_iou_checkpoints", "nearest_task",
                                   "support_map50", "best_of_n"]
    saved = pd.read_csv(work / "comparison.csv")
    assert list(saved.columns) == list(frame.columns) and len(saved) == len(frame)
    assert saved["map50"].to_numpy() == pytest.approx(frame["map50"].to_numpy(), rel=1e-5)
    # Figures written with 6 significant digits (the tables every later stage and the report read).
    text = {name: pd.read_csv(work / name, dtype=str) for name in ("comparison.csv", "bootstrap.csv", "cross.csv")}
    assert text["comparison.csv"]["map50"].tolist() == [f"{v:.6g}" for v in frame["map50"]]
    assert all(len(v.split("e")[0].replace("-", "").replace(".", "").lstrip("0")) <= 6 for name in text for column in ("map50", "difference")
               if column in text[name] for v in text[name][column].dropna())
    data = read_json(work / "evaluate.json")
    cross = pd.read_csv(work / "cross.csv")
    vectors = read_task_vectors(ev.out.tv)
    assert data["generator_kind"] == "flow" and data["evaluations"] == len(frame) + len(cross)
    for rank in cfg.lora.ranks:
        assert data["storage"][str(rank)] == {
            "generator_bytes": (ev.out.gen / f"r{rank}" / "model.safetensors").stat().st_size,
            "checkpoint_bytes": sum(adapter_bytes(f) for t in tasks if t != HELD for _, f in trajectory(t, rank, 0, ev.lora)),
            "final_adapter_bytes": sum(adapter_bytes(final_adapter_dir(t, rank, 0, ev.lora)) for t in tasks)}
        matrix = read_lora_matrix(rank, ev.out.matrix)
        ridge, scores = fit_training_tasks(matrix.rows, matrix.task_index, tasks, vectors, {HELD})
        assert data["ridge"][str(rank)] == {"lam": ridge.lam, "loto_cosine": {f"{c:.3g}": round(v, 6) for c, v in scores.items()}}
    # The fake clock steps TICK a reading: the task vector and each rank's sampling are one step each; the
    # whole run, from the first reading to the last: start, the task vector's two, two a rank, the end.
    steps = 1 + 2 + 2 * len(cfg.lora.ranks)
    assert read_json(work / "timing.json") == {
        "seconds": round(steps * TICK, 2),
        "heldout_adapter_seconds": {HELD: {"task_vector": round(TICK, 3), "generate": {str(r): round(TICK, 4) for r in cfg.lora.ranks}}}}
    assert ev.bars == [{"desc": f"evaluate r{r}", "unit": "task"} for r in cfg.lora.ranks]
    ((logged_frame, params, kind),) = ev.logged
    assert logged_frame is frame and params == stage_params(cfg, "evaluate", DVC_YAML) and kind == "flow"
    assert "evaluate.noise_seed" in params and "predict.image_cache_mb" not in params  # those dvc.yaml lists for evaluate


def test_evaluate_on_micro_every_figure_is_the_one_its_definition_names(evaluated):
    """One evaluate run, every figure it writes: the rows (each the score of the adapter its source names, the
    oracle's pick), the support scores and best-of-N mark, novelty and error overlap, the bootstrap rows, the
    cross-task table, the files, the timing and the progress bars."""
    _every_row_is_the_score_of_the_adapter_its_source_names(evaluated)
    _a_heldout_tasks_samples_are_scored_on_its_support_examples_and_the_best_is_marked(evaluated)
    _novelty_and_error_overlap_of_each_sample(evaluated)
    _bootstrap_rows_are_paired_over_the_same_resamples(evaluated)
    _cross_task_scores_each_tasks_z0_adapter_on_every_other_task(evaluated)
    _evaluate_writes_its_files_timing_and_progress(evaluated)


def test_log_runs_writes_one_run_per_row_with_its_tags_metrics_and_params(monkeypatch):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    frame = pd.DataFrame([
        {"task": "circle", "rank": 1, "source": "generated", "sample": "z0", "heldout": False, "map50_95": 0.25, "map50": 0.5,
         "map75": 0.125, "precision": 0.75, "recall": 0.625, "f1": 0.6875, "num_pred": 3, "novelty_ratio": 1.5,
         "nn_cosine": 0.875, "error_iou": 0.375, "error_iou_checkpoints": 0.4375},
        {"task": "triangle", "rank": 2, "source": "ridge", "sample": "lam=0.1", "heldout": True, "map50_95": 0.0, "map50": 0.1,
         "map75": 0.0, "precision": 0.2, "recall": 0.3, "f1": 0.24, "num_pred": 5, "novelty_ratio": float("nan"),
         "nn_cosine": float("nan"), "error_iou": float("nan"), "error_iou_checkpoints": float("nan")},
    ])
    bars = []
    monkeypatch.setattr(stage, "tqdm", lambda iterable, **kwargs: bars.append(kwargs) or iterable)
    before = int(time.time() * 1000)
    stage._log_runs(frame, {"seed": 2024, "long": "x" * (MLFLOW_PARAM_LIMIT + 5)}, "cvae")
    assert [p.name.split("-", 2)[2] for p in spool_folder().glob("*.jsonl")] == ["evaluate.jsonl"]  # the stage's records
    tracking.finish()  # what the process logged, sent
    assert bars == [{"desc": "evaluate: MLflow runs", "unit": "run", "leave": False}]
    after = int(time.time() * 1000)
    mlflow.set_tracking_uri(uri)
    runs = sorted(mlflow.search_runs(experiment_names=["icmlora"], filter_string="tags.stage = 'evaluate'", output_format="list"),
                  key=lambda run: run.data.tags["task"])
    assert [run.info.run_name for run in runs] == ["circle-r1-generated-z0", "triangle-r2-ridge-lam=0.1"]
    assert [run.info.status for run in runs] == ["FINISHED", "FINISHED"]
    for run, row in zip(runs, frame.to_dict("records")):
        tags = run.data.tags
        assert {k: tags[k] for k in ("task", "rank", "source", "sample", "heldout", "generator_kind")} == {
            "task": row["task"], "rank": str(row["rank"]), "source": row["source"], "sample": row["sample"],
            "heldout": "true" if row["heldout"] else "false", "generator_kind": "cvae"}
        assert run.data.params == {"seed": "2024", "long": "x" * MLFLOW_PARAM_LIMIT, "task": row["task"],
                                   "rank": str(row["rank"]), "source": row["source"]}
        want = {k: row[k] for k in (*METRIC_KEYS, "novelty_ratio", "nn_cosine", "error_iou", "error_iou_checkpoints")
                if pd.notna(row[k])}
        assert run.data.metrics == pytest.approx(want)
        history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "map50")
        assert [(m.step, before <= m.timestamp <= after) for m in history] == [(0, True)]


def test_evaluate_refuses_a_task_without_its_z0_sample_or_its_few_shot_adapter(generators, final_adapters, tmp_path,
                                                                              monkeypatch):
    """The baselines are built around each task's z = 0 sample: without it evaluate stops and says which
    folder lacks it; a held-out task needs its few-shot adapter (its folder and its entry in few_shot.json)."""
    cfg, root, out = generators
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"ranks": [1]}),
                                 "evaluate": cfg.evaluate.model_copy(update={"cross_task_ranks": []})})
    lora = _inputs(cfg, out, tmp_path, final_adapters)
    detector = Detector(root / "prepared", cfg.data.tasks)
    monkeypatch.setattr("icmlora.scoring.predict", detector)
    monkeypatch.setattr("icmlora.few_shot.predict", detector)
    shutil.move(tmp_path / "few_shot.json", tmp_path / "kept.json")
    with pytest.raises(InputError, match=rf"^{few_shot_dir(HELD, 1, tmp_path / 'few_shot')}: no few_shot_lora adapter of "
                                         rf"held-out task {HELD} at rank 1 \(or none in {tmp_path / 'few_shot.json'}\); "
                                         r"run `dvc repro few_shot`$"):
        _evaluate(cfg, root, out, tmp_path, lora)
    write_json(tmp_path / "few_shot.json", {"tasks": {}})  # the task not in it
    with pytest.raises(InputError, match="no few_shot_lora adapter of held-out task triangle at rank 1"):
        _evaluate(cfg, root, out, tmp_path, lora)
    shutil.move(tmp_path / "kept.json", tmp_path / "few_shot.json")
    shutil.move(few_shot_dir(HELD, 1, tmp_path / "few_shot"), tmp_path / "kept")
    with pytest.raises(InputError, match="no few_shot_lora adapter of held-out task triangle at rank 1"):
        _evaluate(cfg, root, out, tmp_path, lora)
    shutil.move(tmp_path / "kept", few_shot_dir(HELD, 1, tmp_path / "few_shot"))
    shutil.rmtree(generated_dir("circle", 1, tmp_path / "generated") / "sample-z0")
    with pytest.raises(InputError, match=rf"^{generated_dir('circle', 1, tmp_path / 'generated')}: no sample-z0 \(the "
                                         r"baselines are built around it\); run `dvc repro generate`$"):
        _evaluate(cfg, root, out, tmp_path, lora)
    assert not (tmp_path / "comparison.csv").exists()


def test_novelty_is_the_nearest_training_distance_over_the_tasks_median_neighbour_distance():
    train = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    own = torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 6.0]])  # nearest-neighbour distances 2, 2, 4: median 2
    got = novelty(torch.tensor([3.0, 5.0]), train, own)
    assert got == pytest.approx({"nn_distance": 1.0, "novelty_ratio": 0.5, "nn_cosine": (9 + 20) / (5 * 34 ** 0.5),
                                 "nearest_index": 1})
    own = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 5.0], [0.0, 9.0]])  # 1, 1, 4, 4: torch's median is the lower, 1
    assert novelty(torch.tensor([6.0, 0.0]), train, own)["novelty_ratio"] == pytest.approx(4.0)
    assert novelty(torch.tensor([6.0, 0.0]), train, torch.tensor([[0.0, 0.0], [0.0, 3.0]]))["novelty_ratio"] == pytest.approx(4 / 3)
    single = novelty(torch.tensor([6.0, 0.0]), train, own[:1])  # one checkpoint: no neighbour distance to divide by
    assert single["nn_distance"] == pytest.approx(4.0) and np.isnan(single["novelty_ratio"])
    same = novelty(torch.tensor([3.0, 4.0]), train, torch.zeros(2, 2))  # the task's checkpoints all equal: no division by 0
    assert same["nn_distance"] == 0 and same["novelty_ratio"] == 0
    far = novelty(torch.tensor([3.0, 9.0]), train, torch.zeros(2, 2))  # 5 away, over a median of 0 taken as 1e-12
    assert far["novelty_ratio"] == pytest.approx(5e12)


def test_evaluate_main_runs_the_stage_and_says_what_it_wrote(tmp_path, capsys, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict()))
    calls = []
    frame = pd.DataFrame({"source": ["base", "trained", "generated", "generated"]})
    monkeypatch.setattr(stage, "evaluate", lambda cfg: calls.append(cfg) or frame)
    assert stage.main(["--params", str(tmp_path / "params.yaml")]) is frame
    (cfg,) = calls
    assert cfg.data.tasks == ["circle", "square", "triangle"]
    assert capsys.readouterr().out.splitlines()[-1] == (
        "evaluate: wrote metrics/comparison.csv (4 rows: 3 sources x 3 tasks x 2 ranks), metrics/cross_task.csv and "
        "metrics/evaluate.json")
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        stage.main(["--help"])
    shown = capsys.readouterr().out
    assert shown.startswith("usage: icmlora evaluate [-h] [--params PARAMS]") and "Stage `evaluate`" in shown
