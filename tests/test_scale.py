"""The real setting's shape, checked cheaply: Florence-2-base's architecture from profiles/scale.yaml
built on the meta device (no weights), the reference code's LoRA targets and the paper's D, and a
synthetic VOC2012 folder imported through the VOC path. `make scale` runs the whole pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from params_helpers import params_dict, with_changes
from PIL import Image

from icmlora.cvae import PAPER_CHANNELS, architecture
from icmlora.data.importers import load_voc
from icmlora.data.voc_writer import VOC_SIZES, write_voc
from icmlora.errors import InputError
from icmlora.florence.model import build_tiny_model, build_tiny_processor
from icmlora.lora import TARGET_PRESETS, peft_config

PAPER_D = 1_929_928  # the ICM-LoRA paper's flattened rank-8 adapter of Florence-2-base


@pytest.fixture(scope="module")
def scale():
    cfg = with_changes(params_dict(profile="scale"), {})
    processor = build_tiny_processor(["dog", "cat", "object"], cfg.base.tiny.image_size, cfg.base.tiny)
    return cfg, processor


def lora_values(cfg, processor, targets, rank: int) -> tuple[int, list[str]]:
    from peft import get_peft_model

    with torch.device("meta"):
        model = build_tiny_model(cfg.base.tiny, processor, cfg.base.tiny.image_size, seed=0)
    lora = cfg.lora.model_copy(update={"target_modules": targets})
    peft = get_peft_model(model, peft_config(lora, rank))
    named = [(n, p) for n, p in peft.named_parameters() if "lora_" in n]
    return sum(p.numel() for _, p in named), sorted({n.split(".lora_")[0] for n, _ in named})


def test_scale_profile_is_florence2_base(scale):
    cfg, processor = scale
    assert len(processor.tokenizer) == 51_289  # the real vocabulary's size
    assert processor.num_image_tokens == 577  # 768 / 32 = 24, 24 x 24 + 1
    with torch.device("meta"):
        model = build_tiny_model(cfg.base.tiny, processor, 768, seed=0)
    assert model.lm_head.weight.shape == (51_289, 768)
    assert model.config.vision_config.window_size == 12
    assert 230e6 < sum(p.numel() for p in model.parameters()) < 235e6  # Florence-2-base: 0.23 B


def test_reference_targets_give_the_papers_dimension(scale):
    cfg, processor = scale
    dim, modules = lora_values(cfg, processor, "reference", 8)
    assert dim == PAPER_D
    # q/k/v of 6 encoder (self) and 6 decoder (self + cross) layers, lm_head, 6 + 6 BART fc2 and
    # 2 per DaViT block (1 + 1 + 9 + 1 blocks): 18 + 36 + 1 + 12 + 24 = 91 modules.
    assert len(modules) == 91 and any(m.endswith("lm_head") for m in modules)
    assert not any(m.endswith(("o_proj", "out_proj", "fc1")) for m in modules)
    assert sum(".vision_tower." in m for m in modules) == 24
    # D is linear in the rank: r * (in + out) per module.
    assert lora_values(cfg, processor, list(TARGET_PRESETS["reference"]), 1)[0] * 8 == PAPER_D


def test_the_real_dimension_gets_the_papers_cvae_read_in_patches(scale):
    cfg, _ = scale
    arch = architecture(cfg.cvae, PAPER_D, 768)
    assert arch.channels == PAPER_CHANNELS and arch.latent_dim == 256 and arch.patch == 16
    assert arch.padded_dim % 65536 == 0 and arch.padded_dim - PAPER_D < 65536


def test_pad_vocab_below_the_tokenizer_is_an_error(scale):
    cfg, _ = scale
    small = cfg.base.tiny.model_copy(update={"pad_vocab_to": 500})
    with pytest.raises(ValueError, match="pad_vocab_to 500 is below the tokenizer's"):
        build_tiny_processor(["dog"], 768, small)


def test_synth_voc_writes_a_folder_the_voc_importer_reads(tmp_path):
    root = tmp_path / "VOC2012"
    assert write_voc(root, ["dog", "cat"], train=4, valid=2, seed=3) == {"train": 4, "val": 2}
    assert sorted(p.name for p in root.iterdir()) == ["Annotations", "ImageSets", "JPEGImages"]
    source = load_voc(root, ["dog", "cat"])
    images = source["train"] + source["valid"]
    assert len(images) == 6
    for im in images:
        assert (im.width, im.height) in VOC_SIZES and im.path.suffix == ".jpg"
        with Image.open(im.path) as pil:
            assert pil.format == "JPEG" and pil.size == (im.width, im.height)
            pixels = np.asarray(pil.convert("RGB"), dtype=np.float32)
        for box in im.boxes:
            x1, y1, x2, y2 = (int(round(v)) for v in box.xyxy)
            assert 0 <= x1 < x2 <= im.width and 0 <= y1 < y2 <= im.height and box.label in ("dog", "cat")
            # the box holds a bright shape on the dark background (JPEG blurs edges: look inside)
            assert pixels[y1:y2, x1:x2].max() > 140
    first = sorted((root / "Annotations").iterdir())[0].read_bytes()
    write_voc(root, ["dog", "cat"], train=4, valid=2, seed=3)  # replaced whole, same bytes
    assert sorted((root / "Annotations").iterdir())[0].read_bytes() == first


def test_synth_voc_rejects_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="--tasks needs 1 to 8 distinct names"):
        write_voc(tmp_path / "v", ["dog", "dog"], 2, 1)
    with pytest.raises(InputError, match="--train and --valid must be at least 1"):
        write_voc(tmp_path / "v", ["dog"], 0, 1)
    assert not (tmp_path / "v").exists()
