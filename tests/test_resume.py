"""A killed training run continues from its last saved state (safetensors + JSON) when started again."""

import json

import pytest

import icmlora.lora.train as lora_train
import icmlora.resume as resume


class Killed(Exception):
    pass


@pytest.fixture
def kill_after(monkeypatch):
    """Make save_training_state raise right after it saved the state of a given step/epoch."""
    real = resume.save_training_state

    def arm(key: str, value: int):
        def save_then_die(folder, model, optimizer, scheduler, generator, extra):
            real(folder, model, optimizer, scheduler, generator, extra)
            if extra.get(key) == value:
                raise Killed(f"simulated kill after {key} {value}")

        monkeypatch.setattr(resume, "save_training_state", save_then_die)
        return real

    return arm


def test_killed_lora_run_resumes_from_its_last_state(setting, tmp_path, monkeypatch, kill_after):
    cfg, root, _ = setting
    paths = dict(prepared=root / "prepared", base_dir=root / "base", out_root=tmp_path / "lora",
                 state_root=tmp_path / "state", metrics_dir=tmp_path / "metrics")
    real = kill_after("step", 4)
    with pytest.raises(Killed):
        lora_train.train_lora(cfg, "circle", 1, 0, **paths)
    state = tmp_path / "state" / "circle-r1-s0"
    assert json.loads((state / "train" / "state.json").read_text())["extra"]["step"] == 4
    assert not list((state / "train").glob("*.bin")) and not list((state / "train").glob("*.pkl"))  # no pickles
    assert not (tmp_path / "lora" / "circle-r1-s0").exists()  # nothing half-written in the output

    monkeypatch.setattr(resume, "save_training_state", real)
    results = []
    real_train = lora_train.train
    monkeypatch.setattr(lora_train, "train", lambda *a, **k: results.append(real_train(*a, **k)) or results[-1])
    metrics = lora_train.train_lora(cfg, "circle", 1, 0, **paths)
    assert len(results[0].losses) == cfg.lora.train.steps - 4  # only the steps after the saved state ran
    assert metrics["train_steps"] == cfg.lora.train.steps
    out = tmp_path / "lora" / "circle-r1-s0"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert not state.exists()


def test_state_from_other_params_is_discarded(setting, tmp_path):
    cfg, root, _ = setting
    train_state = tmp_path / "state" / "circle-r1-s0" / "train"
    train_state.mkdir(parents=True)
    (train_state / "state.json").write_text(json.dumps({"extra": {"fingerprint": "other-params", "step": 4}}))
    metrics = lora_train.train_lora(cfg, "circle", 1, 0, root / "prepared", root / "base", tmp_path / "lora",
                                    tmp_path / "state", tmp_path / "metrics")
    assert metrics["train_steps"] == cfg.lora.train.steps
    assert not (tmp_path / "state" / "circle-r1-s0").exists()


def test_killed_cvae_run_resumes(setting, tmp_path, monkeypatch, kill_after):
    import dataclasses

    from icmlora.cvae.train import train_cvae
    from icmlora.params import collect_params
    from icmlora.task_vectors import compute_task_vectors

    cfg, root, _ = setting
    cfg = dataclasses.replace(cfg, cvae=dataclasses.replace(cfg.cvae, epochs=6, checkpoint_every=2))
    collect_params(cfg, 1, root / "lora", tmp_path / "params")
    compute_task_vectors(cfg, root / "prepared", root / "base", root / "lora", tmp_path / "tv.safetensors",
                         tmp_path / "tv.json", tmp_path / "plots")
    args = (cfg, 1, tmp_path / "params", tmp_path / "tv.safetensors", tmp_path / "cvae", tmp_path / "state",
            tmp_path / "metrics")
    real = kill_after("epoch", 4)
    with pytest.raises(Killed):
        train_cvae(*args)
    monkeypatch.setattr(resume, "save_training_state", real)
    out = train_cvae(*args)
    history = (tmp_path / "metrics" / "r1.csv").read_text().splitlines()
    assert len(history) == 1 + 6 and out["final"]["epoch"] == 6
