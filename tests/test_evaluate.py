"""Stage evaluate (``icmlora.stages.evaluate``) in-process on the micro setting, with conftest's
``generators`` (a flow of random weights per rank) and stand-in trained and few-shot adapters (the
setting's checkpoints): every source and baseline is the adapter its definition says, scored on its
task. No box the tiny base writes matches, so every score is 0; what is checked is which weights
each score was computed with (a spy on ``Scorer.predictions``), the rows and their labels, and the
files and runs evaluate writes."""

import os
import shutil

import mlflow
import pandas as pd
import pytest
import torch

from icmlora.artifacts import checkpoint_name, checkpoints_dir, few_shot_dir, final_adapter_dir, generated_dir, sample_dir
from icmlora.artifacts.adapters import adapter_bytes, read_adapter, trajectory
from icmlora.artifacts.generators import read_generator
from icmlora.artifacts.lora_matrix import flatten, read_lora_matrix
from icmlora.artifacts.task_vectors import read_task_vectors
from icmlora.errors import InputError
from icmlora.files import read_json, write_json
from icmlora.generators.ridge import fit_training_tasks
from icmlora.scoring import Scorer
from icmlora.stages.evaluate import evaluate, novelty, retrieval_weights
from icmlora.stages.generate import generate_all

# A whole evaluate run in-process (about 30 s): in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

HELD = "triangle"  # micro's held-out task
FEW_SHOT = {"lr": 0.005, "steps": 4}


def _inputs(cfg, out, work, final_adapters):
    """Final adapters (each task's last checkpoint), generated samples and few-shot adapters (the
    held-out task's first checkpoint) beside the generators' outputs."""
    lora = final_adapters(work / "lora", cfg.lora.ranks)
    generate_all(cfg, out / "gen", out / "matrix", out / "tv.safetensors", work / "generated", work / "g.json", work / "gt.json")
    for rank in cfg.lora.ranks:
        shutil.copytree(checkpoints_dir(HELD, rank, 0, lora) / checkpoint_name(2), few_shot_dir(HELD, rank, work / "few_shot"))
    write_json(work / "few_shot.json", {"tasks": {HELD: {f"r{rank}": FEW_SHOT for rank in cfg.lora.ranks}}})
    return lora


def _evaluate(cfg, root, out, work, lora, **changes):
    paths = dict(out_csv=work / "comparison.csv", cross_csv=work / "cross.csv", bootstrap_csv=work / "bootstrap.csv",
                 out_json=work / "evaluate.json", timing=work / "timing.json", few_shot_root=work / "few_shot",
                 few_shot_json=work / "few_shot.json")
    return evaluate(cfg, root / "prepared", root / "base", lora, out / "matrix", out / "gen", work / "generated",
                    out / "tv.safetensors", **{**paths, **changes})


@pytest.fixture(scope="module")
def evaluated(generators, final_adapters, tmp_path_factory):
    cfg, root, out = generators
    work = tmp_path_factory.mktemp("evaluate")
    lora = _inputs(cfg, out, work, final_adapters)
    scored = []  # (task, the flattened adapter weights loaded for the score or None, disable_adapter)
    real = Scorer.predictions

    def spy(self, task, weights=None, *, disable_adapter=False, desc=None):
        scored.append((task, None if weights is None else flatten(weights, sorted(weights)).clone(), disable_adapter))
        return real(self, task, weights, disable_adapter=disable_adapter, desc=desc)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Scorer, "predictions", spy)
        frame = _evaluate(cfg, root, out, work, lora)
    return cfg, root, out, work, lora, frame, scored, os.environ["MLFLOW_TRACKING_URI"]


def _was_scored(scored, task, vector) -> bool:
    return any(t == task and w is not None and w.shape == vector.shape and torch.allclose(w, vector, atol=1e-5)
               for t, w, _ in scored)


def test_every_source_has_its_rows_and_labels(evaluated):
    cfg, _, _, work, _, frame, _, _ = evaluated
    tasks, samples = cfg.data.tasks, cfg.generate.samples
    saved = pd.read_csv(work / "comparison.csv")
    assert list(saved.columns) == list(frame.columns) and len(saved) == len(frame)
    assert (saved["map50"] == 0).all()  # no box of the tiny base's matches: every score 0 (the oracle's tie below)
    every = ["base", "trained", "avg_checkpoint", "generated", "noise", "wrong_task", "random_condition"]
    held_only = ["nearest_task", "oracle_single", "few_shot_lora", "retrieval_mix", "mean_training", "ridge"]
    for rank in cfg.lora.ranks:
        for ti, task in enumerate(tasks):
            rows = frame[(frame["rank"] == rank) & (frame["task"] == task)]
            expected = every + (held_only if task == HELD else [])
            assert sorted(rows["source"].unique()) == sorted(expected), (rank, task)
            assert (rows["heldout"] == (task == HELD)).all()
            generated = rows[rows["source"] == "generated"]
            assert sorted(generated["sample"]) == sorted(["z0", *map(str, range(samples))])
            assert len(rows) == len(expected) - 1 + samples + 1  # one row a source, samples + 1 generated
            assert rows.loc[rows["source"] == "wrong_task", "sample"].item() == tasks[(ti + 1) % len(tasks)]
            if task == HELD:
                assert rows.loc[rows["source"] == "few_shot_lora", "sample"].item() == "lr=0.005,steps=4"
                assert set(generated["best_of_n"]) == {True, False} and generated["best_of_n"].sum() == 1
                assert generated.loc[generated["best_of_n"], "sample"].item() == "z0"  # ties: z0 first
                assert (generated["support_map50"] == 0).all()
            else:
                assert generated["support_map50"].isna().all()


def test_every_baseline_scores_the_adapter_its_definition_names(evaluated):
    cfg, root, out, work, lora, frame, scored, _ = evaluated
    tasks = cfg.data.tasks
    vectors = read_task_vectors(out / "tv.safetensors")
    train_tasks = [t for t in tasks if t != HELD]
    g = torch.Generator().manual_seed(cfg.seed + cfg.evaluate.noise_seed)  # the noise baselines' draws, in order
    mean_norm = torch.stack([vectors[t] for t in tasks]).norm(dim=1).mean()
    assert [t for t, w, off in scored if off] == tasks and all(w is None for _, w, off in scored if off)  # base: once
    for rank in cfg.lora.ranks:
        matrix, gen = read_lora_matrix(rank, out / "matrix"), read_generator(rank, out / "gen")
        names, raw = matrix.manifest.names, torch.stack([matrix.raw(i) for i in range(len(matrix.rows))])
        train = torch.tensor([tasks[int(i)] != HELD for i in matrix.task_index])
        finals = {t: flatten(read_adapter(final_adapter_dir(t, rank, 0, lora))[0], names) for t in tasks}
        z0 = torch.zeros(1, gen.model.config.latent_dim)
        for ti, task in enumerate(tasks):
            rows = frame[(frame["rank"] == rank) & (frame["task"] == task)]
            stats = matrix.task_stats(task)
            own = raw[matrix.task_index == ti]
            assert _was_scored(scored, task, finals[task]), ("trained", rank, task)
            assert _was_scored(scored, task, own.mean(0)), ("avg_checkpoint", rank, task)
            samples = {}
            for name in ["z0", *map(str, range(cfg.generate.samples))]:
                samples[name] = flatten(read_adapter(sample_dir(generated_dir(task, rank, work / "generated"), name))[0], names)
                assert _was_scored(scored, task, samples[name]), ("generated", rank, task, name)
                nov = novelty(samples[name], raw[train], own)
                row = rows[(rows["source"] == "generated") & (rows["sample"] == name)]
                assert row["novelty_ratio"].item() == pytest.approx(nov["novelty_ratio"], rel=1e-4)
                assert row["nn_cosine"].item() == pytest.approx(nov["nn_cosine"], abs=1e-5)
            nov = novelty(samples["z0"], raw[train], own)
            nearest = raw[train][nov["nearest_index"]]
            noise = torch.randn(nearest.shape, generator=g)
            assert _was_scored(scored, task, nearest + noise / noise.norm() * nov["nn_distance"]), ("noise", rank, task)
            nearest_task = tasks[int(matrix.task_index[train.nonzero()[:, 0][nov["nearest_index"]]])]
            assert rows.loc[rows["source"] == "noise", "nearest_task"].item() == nearest_task
            other = tasks[(ti + 1) % len(tasks)]
            wrong = matrix.manifest.denormalize(gen.sample(vectors[other], z0)[0], stats)
            assert _was_scored(scored, task, wrong), ("wrong_task", rank, task)
            rnd = torch.randn(vectors[task].shape, generator=g)
            random = matrix.manifest.denormalize(gen.sample(rnd / rnd.norm() * mean_norm, z0)[0], stats)
            assert _was_scored(scored, task, random), ("random_condition", rank, task)
            if task != HELD:
                continue
            sims = torch.stack([torch.nn.functional.cosine_similarity(vectors[task], vectors[t], dim=0) for t in train_tasks])
            near = train_tasks[int(sims.argmax())]
            assert rows.loc[rows["source"] == "nearest_task", "sample"].item() == near
            assert rows.loc[rows["source"] == "oracle_single", "sample"].item() == train_tasks[0]  # every score 0: the first
            assert all(_was_scored(scored, task, finals[t]) for t in train_tasks), ("single", rank)
            mix = retrieval_weights(sims, cfg.evaluate.retrieval_k, cfg.evaluate.retrieval_temperature)
            assert rows.loc[rows["source"] == "retrieval_mix", "sample"].item() == "+".join(
                f"{train_tasks[i]}:{w:.2f}" for i, w in mix.items())
            assert _was_scored(scored, task, sum(w * finals[train_tasks[i]] for i, w in mix.items())), ("mix", rank)
            assert _was_scored(scored, task, torch.stack([finals[t] for t in train_tasks]).mean(0)), ("mean", rank)
            few = flatten(read_adapter(few_shot_dir(task, rank, work / "few_shot"))[0], names)
            assert _was_scored(scored, task, few), ("few_shot_lora", rank)
            ridge, scores = fit_training_tasks(matrix.rows, matrix.task_index, tasks, vectors, {HELD})
            assert rows.loc[rows["source"] == "ridge", "sample"].item() == f"lam={ridge.lam:.3g}"
            assert _was_scored(scored, task, matrix.manifest.denormalize(ridge.predict(vectors[task]), stats)), ("ridge", rank)
            assert read_json(work / "evaluate.json")["ridge"][str(rank)] == {
                "lam": ridge.lam, "loto_cosine": {f"{c:.3g}": round(v, 6) for c, v in scores.items()}}
        if rank in cfg.evaluate.cross_task_ranks:
            cross = pd.read_csv(work / "cross.csv")
            pairs = sorted(zip(cross["adapter_task"], cross["eval_task"]))
            assert pairs == sorted((a, b) for a in tasks for b in tasks if a != b) and (cross["rank"] == rank).all()
            for task in tasks:
                z0_weights = flatten(read_adapter(sample_dir(generated_dir(task, rank, work / "generated"), "z0"))[0], names)
                assert all(_was_scored(scored, other, z0_weights) for other in tasks if other != task)


def test_evaluate_writes_its_files_and_one_mlflow_run_per_row(evaluated):
    cfg, _, out, work, lora, frame, _, uri = evaluated
    tasks = cfg.data.tasks
    data = read_json(work / "evaluate.json")
    cross = pd.read_csv(work / "cross.csv")
    assert data["generator_kind"] == "flow" and data["evaluations"] == len(frame) + len(cross)
    for rank in cfg.lora.ranks:
        assert data["storage"][str(rank)] == {
            "generator_bytes": (out / "gen" / f"r{rank}" / "model.safetensors").stat().st_size,
            "checkpoint_bytes": sum(adapter_bytes(f) for t in tasks if t != HELD for _, f in trajectory(t, rank, 0, lora)),
            "final_adapter_bytes": sum(adapter_bytes(final_adapter_dir(t, rank, 0, lora)) for t in tasks)}
    boot = pd.read_csv(work / "bootstrap.csv")
    assert set(boot["rank"]) == set(cfg.lora.ranks) and len(boot) > 0
    assert (boot["resamples"] == cfg.evaluate.bootstrap_resamples).all() and (boot["confidence"] == cfg.evaluate.confidence).all()
    timing = read_json(work / "timing.json")
    assert set(timing) == {"seconds", "heldout_adapter_seconds"} and 0 < timing["seconds"] < 600
    held = timing["heldout_adapter_seconds"]
    assert list(held) == [HELD] and held[HELD]["task_vector"] > 0
    assert sorted(held[HELD]["generate"]) == sorted(str(r) for r in cfg.lora.ranks)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["icmlora"], filter_string="tags.stage = 'evaluate'", output_format="list")
    assert len(runs) == len(frame)
    got = sorted((r.data.tags["task"], r.data.tags["rank"], r.data.tags["source"], r.data.tags["sample"], r.data.tags["heldout"],
                  r.data.tags["generator_kind"]) for r in runs)
    assert got == sorted((r.task, str(r.rank), r.source, str(r.sample), "true" if r.heldout else "false", "flow")
                         for r in frame.itertuples())
    one = next(r for r in runs if r.data.tags["source"] == "generated")
    assert {"map50", "map50_95", "novelty_ratio", "nn_cosine"} <= set(one.data.metrics)
    assert one.info.run_name == f"{one.data.tags['task']}-r{one.data.tags['rank']}-generated-{one.data.tags['sample']}"


def test_evaluate_refuses_a_task_without_its_z0_sample_or_its_few_shot_adapter(generators, final_adapters, tmp_path):
    """The baselines are built around each task's z = 0 sample: without it evaluate stops and says which
    folder lacks it (not reusing the previous task's sample); a held-out task needs its few-shot adapter."""
    cfg, root, out = generators
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"ranks": [1]}),
                                 "evaluate": cfg.evaluate.model_copy(update={"cross_task_ranks": []})})
    lora = _inputs(cfg, out, tmp_path, final_adapters)
    shutil.move(tmp_path / "few_shot.json", tmp_path / "kept.json")
    with pytest.raises(InputError, match=rf"^{few_shot_dir(HELD, 1, tmp_path / 'few_shot')}: no few_shot_lora adapter of "
                                         rf"held-out task {HELD} at rank 1 \(or none in {tmp_path / 'few_shot.json'}\); "
                                         r"run `dvc repro few_shot`$"):
        _evaluate(cfg, root, out, tmp_path, lora)
    shutil.move(tmp_path / "kept.json", tmp_path / "few_shot.json")
    shutil.rmtree(generated_dir("square", 1, tmp_path / "generated") / "sample-z0")  # the second task
    with pytest.raises(InputError, match=rf"^{generated_dir('square', 1, tmp_path / 'generated')}: no sample-z0 \(the "
                                         r"baselines are built around it\); run `dvc repro generate`$"):
        _evaluate(cfg, root, out, tmp_path, lora)
    assert not (tmp_path / "comparison.csv").exists()
