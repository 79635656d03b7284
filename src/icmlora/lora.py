"""The LoRA every stage builds: params.yaml's ``lora`` section as a PEFT ``LoraConfig``."""

from __future__ import annotations

from icmlora.config import LoraParams


def peft_config(lora: LoraParams, rank: int):
    """PEFT's LoraConfig for one rank: rsLoRA scaling alpha / sqrt(r), Gaussian init (the paper)
    or PEFT's Kaiming default, on ``lora.target_modules``."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
        init_lora_weights="gaussian" if lora.init == "gaussian" else True,
        target_modules=lora.target_modules, bias="none",
    )
