import os
from pathlib import Path

import pytest
import torch
import yaml
from peft import get_peft_model

from icmlora.config import config_from_dict
from icmlora.data.prepare import prepare
from icmlora.florence import build_tiny_model, build_tiny_processor
from icmlora.lora.train import adapter_name, peft_config

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the network, and never write into the repository's MLflow store.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


TASKS = ["circle", "square", "triangle"]


@pytest.fixture(scope="session")
def setting(repo, tmp_path_factory):
    """A micro config, prepared data, a tiny base and stand-in LoRA trajectories (3 per task and rank)."""
    root = tmp_path_factory.mktemp("lp")
    data = yaml.safe_load((repo / "params.yaml").read_text())
    micro = yaml.safe_load((repo / "profiles" / "micro.yaml").read_text())
    from icmlora.profile import deep_merge

    cfg = config_from_dict(deep_merge(data, micro))
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
                model.save_pretrained(root / "lora" / adapter_name(task, rank, 0) / "checkpoints" / f"step-{step}")
    return cfg, root, processor
