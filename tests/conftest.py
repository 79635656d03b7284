import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from icmlora.kernels import pin

# The portable kernels, as every stage process runs them (icmlora.kernels), before torch is imported:
# in-process tests then compute what the stages compute, on any host. Variables set in the
# environment win (.ci/run runs the equality tests again under the native kernels that way).
pin([])

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model

from icmlora.artifacts import checkpoint_name, checkpoints_dir
from icmlora.florence.model import build_tiny_model, build_tiny_processor
from icmlora.lora import peft_config

from e2e_helpers import DVC, commit_all, e2e_env as _e2e_env, micro_copy, run
from params_helpers import micro_params

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the network, and never write into the repository's MLflow store.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _outside_the_repository(tmp_path_factory):
    """Session and module fixtures run in a folder of their own too, with a store of their own
    (see _isolated_mlflow): nothing a test runs writes into the repository or its mlflow.db."""
    with pytest.MonkeyPatch.context() as mp:
        cwd = tmp_path_factory.mktemp("cwd")
        mp.chdir(cwd)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cwd / 'mlflow.db'}")
        yield


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    # Stage functions default to the data contract's paths, relative to the working directory (the
    # repository root under `dvc repro`): a test that leaves one at its default (a timing file, say)
    # writes into its own folder, never into the repository's outputs.
    monkeypatch.chdir(tmp_path)
    yield
    import sys

    if "icmlora.tracking" in sys.modules:  # what a stage called in-process logged goes to this test's store
        sys.modules["icmlora.tracking"].finish()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Under `dvc repro` each stage is a process of its own; a test that calls a stage in-process
    must not inherit the Accelerator an earlier test made (Accelerate keeps it in process-wide
    shared state and refuses a second one with other settings, e.g. bf16 then "no")."""
    yield
    import sys

    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def e2e_env() -> dict:
    """Environment for the commands of end-to-end tests (see e2e_helpers.e2e_env)."""
    return _e2e_env()


RERUN_TEST = "test_rerun_from_scratch_reproduces_every_output"


@pytest.fixture(scope="session")
def micro_pipeline(request, tmp_path_factory, repo, e2e_env) -> Path:
    """The micro-profile copy after ONE full `dvc repro`, with dvc.lock and metrics committed on
    top of its first commit (the unreproduced copy). Shared by every end-to-end test of the
    session (test_pipeline.py, test_reproducibility.py): a test may read it, run commands that
    change nothing (`dvc status`, `dvc push`), or clone it; to change it, work in a clone
    (e2e_helpers.clone_sharing_cache).

    When the session holds the determinism test, its second from-scratch run (a clone of the
    first commit, in another folder) runs at the same time, in the background: the two share
    the CPU instead of waiting for each other (the `rerun` fixture collects it)."""
    dest = micro_copy(repo, tmp_path_factory.mktemp("micro") / "repo")
    if any(item.name == RERUN_TEST for item in request.session.items):
        second = tmp_path_factory.mktemp("rerun") / "repo"
        run(["git", "clone", "-q", str(dest), str(second)], dest.parent)
        log = (second.parent / "repro.log").open("w")
        proc = subprocess.Popen([DVC, "repro"], cwd=second, env=e2e_env, stdout=log, stderr=subprocess.STDOUT)
        request.config.stash[RERUN_KEY] = (second, proc, log)

        def stop() -> None:  # a session that ends (fails, -x, Ctrl-C) before collecting it
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()

        request.addfinalizer(stop)
    start = time.monotonic()
    run([DVC, "repro"], dest, e2e_env)
    print(f"micro_pipeline: `dvc repro` took {time.monotonic() - start:.0f} s")
    commit_all(dest, "dvc repro")
    return dest


RERUN_KEY = pytest.StashKey[tuple]()


@pytest.fixture(scope="session")
def micro_rerun(request, micro_pipeline) -> Path:
    """The micro pipeline reproduced a second time from scratch with the same params and code: a
    clone of micro_pipeline's first commit (before its `dvc repro`), in another folder."""
    if RERUN_KEY not in request.config.stash:
        pytest.fail(f"micro_rerun is started by micro_pipeline only for {RERUN_TEST}")
    second, proc, _ = request.config.stash[RERUN_KEY]
    status = proc.wait(timeout=1800)
    log = (second.parent / "repro.log").read_text()
    assert status == 0, f"`dvc repro` of the second run failed ({status}):\n{log[-5000:]}"
    # from scratch: micro_pipeline's first commit, in a folder and DVC cache of its own
    first = run(["git", "rev-list", "--max-parents=0", "HEAD"], micro_pipeline).stdout.strip()
    assert run(["git", "rev-parse", "HEAD"], second).stdout.strip() == first
    assert not (second / ".dvc" / "config.local").exists()
    return second


TASKS = ["circle", "square", "triangle"]


@pytest.fixture(scope="session")
def setting(repo, tmp_path_factory):
    """A micro config, prepared data, a tiny base and stand-in LoRA trajectories (3 per task and rank)."""
    from icmlora.stages.prepare import prepare

    root = tmp_path_factory.mktemp("lp")
    cfg = micro_params()
    prepare(cfg, root / "prepared")
    processor = build_tiny_processor([*TASKS, "object"], 64, cfg.base.tiny)
    base = build_tiny_model(cfg.base.tiny, processor, 64, seed=0)
    base.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    torch.manual_seed(0)
    for rank in (1, 2):
        for ti, task in enumerate(TASKS):
            model = get_peft_model(build_tiny_model(cfg.base.tiny, processor, 64, seed=0), peft_config(cfg.lora, rank))
            for step in (2, 4, 6):
                with torch.no_grad():  # a stand-in trajectory: task-specific drift
                    for name, p in model.named_parameters():
                        if "lora_" in name:
                            p.add_(0.01 * (ti + 1) + 0.05 * torch.randn_like(p))
                model.save_pretrained(checkpoints_dir(task, rank, 0, root / "lora") / checkpoint_name(step))
    return cfg, root, processor


@pytest.fixture(scope="session")
def generators(setting, tmp_path_factory):
    """The setting's LoRA matrices (collect_params), random task vectors and, per rank, a generator
    written directly: a flow of random weights (its samples differ by z), so the stages downstream of
    train_cvae can be tested without training one."""
    from icmlora.artifacts.generators import write_generator
    from icmlora.artifacts.lora_matrix import read_manifest
    from icmlora.artifacts.task_vectors import write_task_vectors
    from icmlora.cvae import Generator
    from icmlora.generators.flow import Flow, FlowArchitecture
    from icmlora.stages.collect_params import collect_params

    cfg, root, _ = setting
    cfg = cfg.model_copy(update={"cvae": cfg.cvae.model_copy(update={"kind": "flow"})})  # the kind written below
    out = tmp_path_factory.mktemp("generators")
    tasks, d = cfg.data.tasks, cfg.base.tiny.d_model
    vectors = torch.randn(len(tasks), d, generator=torch.Generator().manual_seed(0))
    write_task_vectors(tasks, vectors, {}, {"method": "icl", "pooling": "match"}, out / "tv.safetensors", out / "tv.json")
    for rank in cfg.lora.ranks:
        collect_params(cfg, rank, root / "lora", out / "matrix")
        torch.manual_seed(rank)
        model = Flow(FlowArchitecture(read_manifest(rank, out / "matrix").dim, d, 16, 1, 4))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        meta = {"rank": rank, "kind": "flow", "model": model.config.to_json(), "tasks": tasks, "task_vector_method": "icl"}
        write_generator(rank, Generator(model, *Generator.standardization(vectors), meta), out / "gen")
    return cfg, root, out


@pytest.fixture(scope="session")
def final_adapters(setting):
    """A factory: ``make(dest, ranks, missing=())`` copies the setting's LoRAs to ``dest`` with each task's
    last checkpoint standing in for its final adapter at ``ranks`` (the setting has trajectories only),
    except the tasks in ``missing``; returns ``dest``."""
    import shutil

    from icmlora.artifacts import final_adapter_dir

    _, root, _ = setting

    def make(dest: Path, ranks, missing=()) -> Path:
        shutil.copytree(root / "lora", dest)
        for task in TASKS:
            for rank in ranks:
                if task not in missing:
                    shutil.copytree(checkpoints_dir(task, rank, 0, dest) / checkpoint_name(6), final_adapter_dir(task, rank, 0, dest))
        return dest

    return make


@dataclass
class Boxer:
    """A tiny Florence-2 that writes boxes (a random one writes none that parse, so any comparison of
    its boxes compares empty lists): trained until it writes, for each of four plain-colour images,
    exactly that image's boxes (one, two, one, none)."""

    model: torch.nn.Module
    processor: object
    images: list
    targets: list

    def dataset(self, folder: Path) -> Path:
        """The images as PNG files and their boxes as Florence JSONL; returns the annotations file."""
        from icmlora.florence.format import Example, write_annotations

        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(self.images):
            image.save(folder / f"{i}.png")
        write_annotations(folder / "annotations.jsonl", [Example(f"{i}.png", 64, 64, list(boxes))
                                                         for i, boxes in enumerate(self.targets)])
        return folder / "annotations.jsonl"


@pytest.fixture(scope="session")
def boxer() -> Boxer:
    """See Boxer. About 20 AdamW steps on one batch (a few seconds); fails loudly if it does not learn.
    Session-wide: tests that change the model (a PEFT wrap) work on a copy."""
    from PIL import Image

    from icmlora.config import PredictParams
    from icmlora.florence.format import Box, encode_suffix
    from icmlora.florence.model import encode
    from icmlora.florence.predict import predict

    cfg = micro_params().base.tiny
    processor = build_tiny_processor(["circle", "square", "object"], 64, cfg)
    model = build_tiny_model(cfg, processor, 64, seed=0)
    images = [Image.new("RGB", (64, 64), c) for c in ((220, 30, 30), (30, 30, 220), (30, 200, 30), (200, 200, 30))]
    targets = [[Box("circle", 4, 4, 30, 30)], [Box("square", 34, 30, 60, 60), Box("circle", 2, 40, 20, 60)],
               [Box("square", 10, 10, 50, 50)], []]
    batch = encode(processor, images, ["<OD>"] * len(images), [encode_suffix(b, 64, 64) for b in targets])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    params = PredictParams(batch_size=4, max_new_tokens=14, num_beams=1, image_cache_mb=0)
    for step in range(1, 121):
        model.train()
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            got = predict(model, processor, images, params)
            if [[b.label for b in boxes] for boxes in got] == [[b.label for b in boxes] for boxes in targets]:
                break
    else:
        raise AssertionError(f"the boxer did not learn its boxes in {step} steps (loss {loss.item():.3f}): {got}")
    return Boxer(model.eval(), processor, images, targets)
