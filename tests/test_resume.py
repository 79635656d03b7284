"""A killed training run continues from its last saved state (safetensors + JSON) when started
again, running only what was left; a state from other parameters is never resumed."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import icmlora.stages.train_lora as train_lora_stage
from icmlora.resume import TrainingState
from spread import within


class Killed(Exception):
    pass


@pytest.fixture
def kill_after(monkeypatch):
    """Make TrainingState.save raise right after it saved the state of a given step/epoch (its
    ``occurrence``-th such save: later ranks of one train_lora process save the same steps)."""
    real = TrainingState.save

    def arm(key: str, value: int, occurrence: int = 1):
        seen = []

        def save_then_die(self, model, optimizer, scheduler, generator, *generators, **extra):
            real(self, model, optimizer, scheduler, generator, *generators, **extra)
            if extra.get(key) == value:
                seen.append(self.folder)
                if len(seen) == occurrence:
                    raise Killed(f"simulated kill after {key} {value} ({self.folder})")

        monkeypatch.setattr(TrainingState, "save", save_then_die)
        return lambda: monkeypatch.setattr(TrainingState, "save", real)

    return arm


def one_at_a_time(cfg):
    """``runtime.lora_batch: 1``: each rank trained alone, one after the other, each with a state of its own."""
    return cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"lora_batch": 1})})


@pytest.mark.slow
def test_killed_lora_run_keeps_finished_ranks_and_resumes_from_the_last_state(setting, tmp_path, monkeypatch,
                                                                               kill_after):
    cfg, root, _ = setting
    cfg = one_at_a_time(cfg)
    assert cfg.lora.ranks == [1, 2]
    steps = cfg.lora.train.steps
    paths = dict(prepared=root / "prepared", base_dir=root / "base", out_root=tmp_path / "lora",
                 state_root=tmp_path / "state", metrics_dir=tmp_path / "metrics")
    disarm = kill_after("step", 4, occurrence=2)  # rank 2 at step 4, rank 1 finished
    with pytest.raises(Killed):
        train_lora_stage.train_lora(cfg, "circle", 0, **paths)
    done, killed = (tmp_path / "state" / "lora" / f"circle-r{r}-s0" for r in (1, 2))
    assert (done / "trained.json").is_file() and (done / "done" / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((killed / "train" / "state.json").read_text())["extra"]["step"] == 4
    assert not list((killed / "train").glob("*.bin")) and not list((killed / "train").glob("*.pkl"))  # no pickles
    # nothing half-written in the outputs
    assert not (tmp_path / "lora" / "circle-s0").exists() and not (tmp_path / "metrics" / "circle-s0").exists()

    disarm()
    results = []
    real_train = train_lora_stage.train
    monkeypatch.setattr(train_lora_stage, "train", lambda *a, **k: results.append(real_train(*a, **k)) or results[-1])
    metrics = train_lora_stage.train_lora(cfg, "circle", 0, **paths)
    assert len(results) == 1  # rank 1 is not trained again ...
    assert len(results[0].losses) == steps - 4  # ... rank 2 runs only the steps after its saved state
    assert [m["train_steps"] for m in metrics.values()] == [steps, steps]
    for rank in (1, 2):
        out = tmp_path / "lora" / "circle-s0" / f"r{rank}"
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
        assert (out / "final" / "adapter_model.safetensors").is_file()
        assert json.loads((tmp_path / "metrics" / "circle-s0" / f"r{rank}.json").read_text()) == metrics[rank]
    assert not done.exists() and not killed.exists()


@pytest.mark.slow
@pytest.mark.parametrize("lora_batch", [1, 0])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_runs_adapters(setting, tmp_path, kill_after, lora_batch):
    """Killed after step 2, half-way through an epoch (32 images a task, batches of 8), of rank 2
    (rank 1 finished; ``lora_batch: 1``) or of both ranks trained together (``lora_batch: 0``): the
    resumed run draws that epoch's order again and passes over the 2 batches trained, and the
    dropout RNGs (torch's; each adapter's own when trained together) are the saved ones, so every
    checkpoint and final adapter equals, bit for bit, the one an uninterrupted run writes."""
    from safetensors.torch import load_file

    cfg, root, _ = setting
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"lora_batch": lora_batch})})
    assert cfg.lora.dropout > 0 and cfg.lora.checkpoint_every == 2 and cfg.lora.ranks == [1, 2]
    state = "circle-r2-s0" if lora_batch == 1 else "circle-r1+2-s0"

    def run(where: Path, kill: bool):
        paths = dict(prepared=root / "prepared", base_dir=root / "base", out_root=where / "lora",
                     state_root=where / "state", metrics_dir=where / "metrics")
        if kill:
            disarm = kill_after("step", 2, occurrence=2 if lora_batch == 1 else 1)
            with pytest.raises(Killed):
                train_lora_stage.train_lora(cfg, "circle", 0, **paths)
            saved = json.loads((where / "state" / "lora" / state / "train" / "state.json").read_text())
            assert saved["extra"]["step"] == 2 and saved["extra"]["epoch_batches"] == 2  # of 4: mid-epoch
            disarm()
        train_lora_stage.train_lora(cfg, "circle", 0, **paths)
        return {p.relative_to(where).as_posix(): load_file(str(p))
                for p in sorted((where / "lora").rglob("adapter_model.safetensors"))}

    whole, resumed = run(tmp_path / "whole", kill=False), run(tmp_path / "resumed", kill=True)
    assert len(whole) == 2 * (3 + 1) and whole.keys() == resumed.keys()  # 2 ranks: 3 checkpoints + final
    for path, tensors in whole.items():
        assert tensors and tensors.keys() == resumed[path].keys(), path
        for name, value in tensors.items():
            assert torch.equal(value, resumed[path][name]), f"{path}: {name}"


@pytest.mark.slow
def test_state_from_other_params_is_discarded(setting, tmp_path):
    cfg, root, _ = setting
    train_state = tmp_path / "state" / "lora" / "circle-r1-s0" / "train"
    train_state.mkdir(parents=True)
    (train_state / "state.json").write_text(json.dumps({"extra": {"fingerprint": "other-params", "step": 4}}))
    (train_state.parent / "trained.json").write_text(json.dumps({"train_steps": -1}))  # "trained" by other params
    metrics = train_lora_stage.train_lora(cfg, "circle", 0, root / "prepared", root / "base", tmp_path / "lora",
                                          tmp_path / "state", tmp_path / "metrics")
    assert metrics[1]["train_steps"] == cfg.lora.train.steps
    assert not (tmp_path / "state" / "lora" / "circle-r1-s0").exists()


@pytest.mark.slow
def test_a_run_killed_while_writing_its_outputs_writes_them_when_started_again(setting, tmp_path, monkeypatch):
    """The outputs are copied out of the state, which goes last: a run killed between writing the
    metrics and the adapters neither trains nor scores again, and loses nothing."""
    cfg, root, _ = setting
    paths = dict(prepared=root / "prepared", base_dir=root / "base", out_root=tmp_path / "lora",
                 state_root=tmp_path / "state", metrics_dir=tmp_path / "metrics")
    real = train_lora_stage.atomic_dir

    def killed_at_the_adapters(target):
        if Path(target) == tmp_path / "lora" / "circle-s0":
            raise Killed("killed while writing the adapters")
        return real(target)

    monkeypatch.setattr(train_lora_stage, "atomic_dir", killed_at_the_adapters)
    with pytest.raises(Killed):
        train_lora_stage.train_lora(cfg, "circle", 0, **paths)
    written = {r: json.loads((tmp_path / "metrics" / "circle-s0" / f"r{r}.json").read_text()) for r in (1, 2)}
    assert not (tmp_path / "lora" / "circle-s0").exists()

    monkeypatch.setattr(train_lora_stage, "atomic_dir", real)
    calls = []
    monkeypatch.setattr(train_lora_stage, "train", lambda *a, **k: calls.append("train"))

    class CountingScorer:
        def __init__(self, *args, **kwargs):
            calls.append("score")

        def score(self, *args, **kwargs):
            return {"map50": 0.0}

    monkeypatch.setattr(train_lora_stage, "Scorer", CountingScorer)
    assert train_lora_stage.train_lora(cfg, "circle", 0, **paths) == written
    assert calls == ["score"]  # the base's score only: the ranks keep theirs
    for rank in (1, 2):
        out = tmp_path / "lora" / "circle-s0" / f"r{rank}"
        assert (out / "final" / "adapter_model.safetensors").is_file() and len(list((out / "checkpoints").iterdir())) == 3
    assert not (tmp_path / "state" / "lora").exists() or not any((tmp_path / "state" / "lora").iterdir())


@pytest.mark.slow
def test_killed_cvae_run_resumes_with_only_the_remaining_epochs(setting, tmp_path, kill_after):
    from icmlora.stages.collect_params import collect_params
    from icmlora.stages.task_vectors import compute_task_vectors
    from icmlora.stages.train_cvae import train_cvae

    cfg, root, _ = setting
    cfg = cfg.model_copy(update={"cvae": cfg.cvae.model_copy(update={
        "train": cfg.cvae.train.model_copy(update={"epochs": 6, "checkpoint_every": 2})})})
    collect_params(cfg, 1, root / "lora", tmp_path / "matrix")
    compute_task_vectors(cfg, root / "prepared", root / "base", root / "lora", tmp_path / "tv.safetensors",
                         tmp_path / "tv.json", tmp_path / "tv-metrics.json", tmp_path / "plots")
    args = (cfg, 1, tmp_path / "matrix", tmp_path / "tv.safetensors", tmp_path / "cvae", tmp_path / "state",
            tmp_path / "metrics")
    disarm = kill_after("epoch", 4)
    with pytest.raises(Killed):
        train_cvae(*args)
    disarm()
    out = train_cvae(*args)
    assert out["epochs_run"] == 2  # epochs 5 and 6: the first four were restored, not re-run
    history = (tmp_path / "metrics" / "r1.csv").read_text().splitlines()
    assert len(history) == 1 + 6 and out["final"]["epoch"] == 6
    # The same six epochs in one go end at the same weights: the resumed run replayed nothing.
    uninterrupted = train_cvae(cfg, 1, tmp_path / "matrix", tmp_path / "tv.safetensors", tmp_path / "cvae2",
                               tmp_path / "state2", tmp_path / "metrics2")
    assert uninterrupted["epochs_run"] == 6
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "cvae" / "r1" / "model.safetensors")), load_file(str(tmp_path / "cvae2" / "r1" / "model.safetensors"))
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert within("resume.cvae_weights_max_abs", gap, 1e-6), gap


def _tiny_run(scheduler_factory):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, optimizer, scheduler_factory(optimizer), torch.Generator().manual_seed(0)


def test_the_scheduler_is_restored_through_its_own_load_state_dict(tmp_path):
    """A scheduler that nests others (SequentialLR) must come back working, not as dicts."""
    def sequential(opt):
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
        return torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[2])

    model, optimizer, scheduler, gen = _tiny_run(sequential)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = TrainingState(tmp_path / "s", "fp")
    state.save(model, optimizer, scheduler, gen, step=3)
    model2, optimizer2, scheduler2, gen2 = _tiny_run(sequential)
    assert state.load(model2, optimizer2, scheduler2, gen2)["step"] == 3
    for sched, opt in ((scheduler, optimizer), (scheduler2, optimizer2)):
        opt.step()
        sched.step()
    assert scheduler2.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def test_state_that_json_cannot_hold_is_an_error_not_a_null(tmp_path):
    model, optimizer, scheduler, gen = _tiny_run(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    optimizer.step()
    optimizer.param_groups[0]["odd"] = {1, 2}  # a set: JSON has no such type
    with pytest.raises(TypeError, match=r"optimizer.param_groups\[0\].odd is a set"):
        TrainingState(tmp_path / "s", "fp").save(model, optimizer, scheduler, gen, step=1)
    assert not (tmp_path / "s").exists()


def test_a_state_of_other_inputs_is_not_resumed(tmp_path):
    """The fingerprint covers the inputs' bytes: a changed base model or training split starts over."""
    from icmlora.resume import content_digest, fingerprint

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"weights")
    split = tmp_path / "annotations.jsonl"
    split.write_text("a\n")
    before = fingerprint("params", content_digest(tmp_path / "base", split))
    assert before == fingerprint("params", content_digest(tmp_path / "base", split))
    (tmp_path / "base" / "model.safetensors").write_bytes(b"weightz")
    changed_base = fingerprint("params", content_digest(tmp_path / "base", split))
    split.write_text("b\n")
    changed_split = fingerprint("params", content_digest(tmp_path / "base", split))
    assert len({before, changed_base, changed_split}) == 3


@pytest.mark.slow
def test_a_killed_lora_run_on_another_base_model_starts_over(setting, tmp_path, monkeypatch, kill_after):
    """A run killed with rank 1 trained and rank 2 at step 4, started again on a base model whose
    weights differ (same folder layout, same params): neither rank's state is resumed, both train
    every step from the start."""
    import shutil

    from safetensors.torch import load_file, save_file

    cfg, root, _ = setting
    cfg = one_at_a_time(cfg)
    steps = cfg.lora.train.steps
    paths = dict(prepared=root / "prepared", out_root=tmp_path / "lora", state_root=tmp_path / "state",
                 metrics_dir=tmp_path / "metrics")
    disarm = kill_after("step", 4, occurrence=2)
    with pytest.raises(Killed):
        train_lora_stage.train_lora(cfg, "circle", 0, base_dir=root / "base", **paths)
    disarm()
    assert (tmp_path / "state" / "lora" / "circle-r1-s0" / "trained.json").is_file()

    other = tmp_path / "other-base"
    shutil.copytree(root / "base", other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(n for n in sorted(weights) if weights[n].is_floating_point())
    save_file({**weights, name: weights[name] + 0.01}, str(other / "model.safetensors"), metadata={"format": "pt"})

    results = []
    real_train = train_lora_stage.train
    monkeypatch.setattr(train_lora_stage, "train", lambda *a, **k: results.append(real_train(*a, **k)) or results[-1])
    metrics = train_lora_stage.train_lora(cfg, "circle", 0, base_dir=other, **paths)
    assert [len(r.losses) for r in results] == [steps, steps]  # both ranks, every step: nothing resumed
    assert [m["train_steps"] for m in metrics.values()] == [steps, steps]


class _Wrapper:
    """Accelerate's way: AcceleratedOptimizer / AcceleratedScheduler keep the torch object in
    ``.optimizer`` / ``.scheduler``. This one offers nothing else: the state must come from inside."""

    def __init__(self, **inner):
        self.__dict__.update(inner)


def _same(a, b, where="state") -> None:
    """Equal values of equal types, tensors element for element with the same dtype."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{where}[{i}]")
    else:
        assert a == b, where


def _adamw_run(seed: int):
    torch.manual_seed(seed)
    # A frozen tensor (not saved), a one-element one (its moments are tensors of one value).
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler, torch.Generator().manual_seed(seed)


def _train_step(model, optimizer, scheduler, loader) -> None:
    x = torch.randn(4, 3, generator=loader)  # the data loader's draw
    noise = torch.randn(1)  # torch's global RNG (dropout, sampling)
    (model(x).pow(2).sum() + noise * model[1].bias.sum()).backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_a_resumed_run_continues_bit_for_bit_through_accelerate_style_wrappers(tmp_path):
    """Saved after 3 steps and loaded into a fresh run (other initial weights, other RNG states):
    parameters, AdamW's moments and step counts (float32 tensors, as torch keeps them), the betas
    (a tuple), the scheduler and both RNG streams are back, so 3 more steps give the very weights
    the uninterrupted run reaches."""
    model, optimizer, scheduler, loader = _adamw_run(0)
    for _ in range(3):
        _train_step(model, optimizer, scheduler, loader)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_scheduler = scheduler.state_dict()
    state = TrainingState(tmp_path / "s", "fp")
    state.save(model, _Wrapper(optimizer=optimizer), _Wrapper(scheduler=scheduler, optimizer=optimizer), loader,
               step=3, losses=torch.tensor([0.5, 0.25]), lr=torch.tensor([0.125]), note="x")
    for _ in range(3):
        _train_step(model, optimizer, scheduler, loader)

    model2, optimizer2, scheduler2, loader2 = _adamw_run(1)
    with torch.no_grad():
        model2[0].bias.copy_(model[0].bias)  # the frozen base is the same in both runs, and never saved
    assert sorted(load_file(str(tmp_path / "s" / "state.safetensors"))) == [
        "optim/0/exp_avg", "optim/0/exp_avg_sq", "optim/0/step", "optim/1/exp_avg", "optim/1/exp_avg_sq",
        "optim/1/step", "optim/2/exp_avg", "optim/2/exp_avg_sq", "optim/2/step", "param/0.weight", "param/1.bias",
        "param/1.weight", "rng/loader", "rng/torch"]
    torch.manual_seed(123)
    extra = state.load(model2, _Wrapper(optimizer=optimizer2), _Wrapper(scheduler=scheduler2, optimizer=optimizer2),
                       loader2)
    assert extra == {"step": 3, "losses": [0.5, 0.25], "lr": 0.125, "note": "x", "fingerprint": "fp"}
    _same(optimizer2.state_dict(), saved_optimizer, "optimizer")
    _same(scheduler2.state_dict(), saved_scheduler, "scheduler")
    assert optimizer2.state_dict()["param_groups"][0]["betas"] == (0.8, 0.95)
    assert optimizer2.state[model2[1].bias]["exp_avg"].shape == (1,)
    for _ in range(3):
        _train_step(model2, optimizer2, scheduler2, loader2)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        if p.requires_grad:
            assert torch.equal(p, p2), name
    assert scheduler2.get_last_lr() == scheduler.get_last_lr() == [0.05 * 0.5 ** 3]


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.AdamW(params, lr=0.1, amsgrad=True),
], ids=["sgd-momentum", "adamw-amsgrad"])
def test_optimizer_buffers_come_back_as_tensors_and_training_goes_on(tmp_path, make):
    """Another torch optimizer's state (SGD's momentum, AdamW amsgrad's max_exp_avg_sq: not only
    AdamW's exp_avg*) comes back as tensors, of the weight's three values and of the one-output
    bias's one value (not a float), so the next step runs and gives the weights the uninterrupted
    run reaches."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = make(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    x = torch.arange(6.0).reshape(2, 3)

    def step(m, opt):
        m(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()

    step(model, optimizer)
    state = TrainingState(tmp_path / "s", "fp")
    state.save(model, optimizer, scheduler, torch.Generator())
    model2 = torch.nn.Linear(3, 1)
    optimizer2 = make(model2.parameters())
    state.load(model2, optimizer2, torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda s: 1.0), torch.Generator())
    _same(optimizer2.state_dict(), optimizer.state_dict(), "optimizer")
    step(model, optimizer)
    step(model2, optimizer2)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)


def test_a_state_written_with_step_counts_as_numbers_still_loads(tmp_path):
    """States written before step counts were saved as tensors keep them in the JSON, as numbers:
    they load as float32 tensors, as torch keeps them."""
    from safetensors.torch import save_file

    model, optimizer, scheduler, loader = _adamw_run(0)
    _train_step(model, optimizer, scheduler, loader)
    state = TrainingState(tmp_path / "s", "fp")
    state.save(model, optimizer, scheduler, loader)
    tensors = load_file(str(tmp_path / "s" / "state.safetensors"))
    meta = json.loads((tmp_path / "s" / "state.json").read_text())
    for key in [k for k in tensors if k.endswith("/step")]:
        meta["optimizer_scalars"][key.removeprefix("optim/")] = tensors.pop(key).item()
    save_file(tensors, str(tmp_path / "s" / "state.safetensors"))
    (tmp_path / "s" / "state.json").write_text(json.dumps(meta))
    model2, optimizer2, scheduler2, loader2 = _adamw_run(1)
    state.load(model2, optimizer2, scheduler2, loader2)
    _same(optimizer2.state_dict(), optimizer.state_dict(), "optimizer")


def test_a_state_is_resumable_only_with_its_own_fingerprint(tmp_path):
    model, optimizer, scheduler, loader = _adamw_run(0)
    folder = tmp_path / "s"
    assert TrainingState(folder, "fp").saved_fingerprint() is None and not TrainingState(folder, "fp").resumable()
    TrainingState(folder, "fp").save(model, optimizer, scheduler, loader, step=0)
    assert json.loads((folder / "state.json").read_text())["extra"] == {"step": 0, "fingerprint": "fp"}
    assert TrainingState(folder, "fp").resumable() and not TrainingState(folder, "other").resumable()
    (folder / "state.json").write_text("[1]")  # not the layout save writes
    assert TrainingState(folder, "fp").saved_fingerprint() is None
    TrainingState(folder, "fp").clear()
    assert not folder.exists()


def test_fingerprints_ignore_key_order_and_digests_cover_names_and_places(tmp_path):
    from icmlora.resume import content_digest, fingerprint

    assert fingerprint({"a": 1, "b": [2, 3]}, "x") == fingerprint({"b": [2, 3], "a": 1}, "x")
    assert fingerprint({"a": 1}) != fingerprint({"a": 2}) and len(fingerprint({"a": 1})) == 16
    # Same bytes under another name (a file given alone), or in another subfolder: another digest.
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.bin").write_bytes(b"w")
    (tmp_path / "one" / "y.bin").write_bytes(b"w")
    assert content_digest(tmp_path / "one" / "x.bin") != content_digest(tmp_path / "one" / "y.bin")
    assert len(content_digest(tmp_path / "one")) == 16
    for sub in ("a", "b"):
        (tmp_path / sub / sub).mkdir(parents=True)
        (tmp_path / sub / sub / "w.bin").write_bytes(b"w")
    assert content_digest(tmp_path / "a") != content_digest(tmp_path / "b")
    before = content_digest(tmp_path / "one")
    (tmp_path / "one" / "y.bin").rename(tmp_path / "one" / "z.bin")
    assert content_digest(tmp_path / "one") != before


@pytest.mark.parametrize("where", ["optimizer.state.0.odd", "scheduler.odd", "extra.odd"])
def test_a_value_json_cannot_hold_is_named_by_where_it_is(tmp_path, where):
    model, optimizer, scheduler, gen = _tiny_run(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    extra = {}
    if where.startswith("optimizer"):
        optimizer.state[model.weight]["odd"] = {1}
    elif where.startswith("scheduler"):
        scheduler.odd = {1}
    else:
        extra["odd"] = {1}
    with pytest.raises(TypeError) as err:
        TrainingState(tmp_path / "s", "fp").save(model, optimizer, scheduler, gen, **extra)
    assert str(err.value) == f"training state: {where} is a set, which cannot be saved as JSON"
