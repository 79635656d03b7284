"""The LoRA every stage builds: params.yaml's ``lora`` section as a PEFT ``LoraConfig``."""

from __future__ import annotations

from icmlora.config import LoraParams

# Named target sets for ``lora.target_modules``. ``reference``: the ICM-LoRA reference code's list,
# matched as PEFT matches names (a module whose name ends in one of them). On transformers'
# native Florence-2 that is the BART q/k/v projections (self- and cross-attention), every fc2
# (BART's and the DaViT blocks') and lm_head; o_proj, linear and Conv2d match nothing. On
# Florence-2-base at rank 8 it gives the paper's D = 1,929,928.
TARGET_PRESETS = {
    "reference": ["q_proj", "o_proj", "k_proj", "v_proj", "linear", "Conv2d", "lm_head", "fc2"],
}


def target_modules(lora: LoraParams) -> str | list[str]:
    """``lora.target_modules`` as PEFT takes it: a preset's list, or the regex / suffix list as given."""
    value = lora.target_modules
    return list(TARGET_PRESETS[value]) if isinstance(value, str) and value in TARGET_PRESETS else value


def peft_config(lora: LoraParams, rank: int):
    """PEFT's LoraConfig for one rank: rsLoRA scaling alpha / sqrt(r), Gaussian init (the paper)
    or PEFT's Kaiming default, on ``lora.target_modules`` (a preset name, a regex or name suffixes)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
        init_lora_weights="gaussian" if lora.init == "gaussian" else True,
        target_modules=target_modules(lora), bias="none",
    )
