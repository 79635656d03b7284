"""Florence-2 through transformers' native classes: build a tiny one offline, and turn
examples into model inputs. The tiny model and the real one go through the same functions
(``artifacts.base_model`` saves and loads either); nothing downstream knows which it has.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from PIL import Image

from icmlora.config import TinyModelParams
from icmlora.florence.format import NUM_BINS

# The processor replaces "<OD>" by this sentence (Florence2Processor.task_prompts_without_inputs),
# so the tiny tokenizer must be trained on it, not on "<OD>".
OD_SENTENCE = "Locate the objects with category name in the image."
TASK_TOKENS = ["<OD>", "</OD>", "<OCR>", "</OCR>", "<CAPTION>", "</CAPTION>", "<REGION_PROPOSAL>"]
LOC_TOKENS = [f"<loc_{i}>" for i in range(NUM_BINS)]
# Florence2PostProcessor refuses to parse a task that its config does not name.
POST_PROCESSOR_CONFIG = {
    "NUM_BBOX_HEIGHT_BINS": NUM_BINS,
    "NUM_BBOX_WIDTH_BINS": NUM_BINS,
    "PARSE_TASKS": [{"TASK_NAME": "od", "PATTERN": r"([a-zA-Z0-9 ]+)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"}],
    "pure_text": {},
    "description_with_bboxes": {},
    "bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "description_with_bboxes_or_polygons": {},
    "phrase_grounding": {},
    "ocr": {},
}


def num_image_tokens(cfg: TinyModelParams, image_size: int) -> int:
    """The vision tower's output length: one token per cell of the last feature map, plus
    the pooled token the Florence-2 projector prepends."""
    stride = math.prod(cfg.patch_strides)
    if image_size % stride:
        raise ValueError(f"image size {image_size} is not a multiple of the vision stride {stride}")
    return (image_size // stride) ** 2 + 1


def build_tiny_processor(labels: list[str], image_size: int, cfg: TinyModelParams):
    """A Florence2Processor built offline: byte-level BPE trained on the prompt and labels,
    plus <loc_0>..<loc_999> and the Florence task tokens, and a CLIP image processor at
    the data's size."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizer, Florence2Processor
    from transformers.models.clip import CLIPImageProcessorPil

    # Each label also appears without a leading space so it is one token in a suffix.
    corpus = [OD_SENTENCE] + [w for label in labels for w in (label, " " + label)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 8, vocab_size=cfg.vocab_size, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        vocab = json.loads(Path(tmp, "vocab.json").read_text())
        merges = [tuple(line.split()) for line in Path(tmp, "merges.txt").read_text().splitlines()[1:] if line.strip()]
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens(LOC_TOKENS + TASK_TOKENS)
    if cfg.pad_vocab_to:
        if cfg.pad_vocab_to < len(tokenizer):
            raise ValueError(f"base.tiny.pad_vocab_to {cfg.pad_vocab_to} is below the tokenizer's {len(tokenizer)} tokens")
        # The real vocabulary's size (embedding and lm_head rows, a LoRA target's shape): BPE
        # trained on a few labels cannot learn 50k merges, so unused tokens fill the rest.
        tokenizer.add_tokens([f"<unused_{i}>" for i in range(cfg.pad_vocab_to - len(tokenizer))])
    tokens = num_image_tokens(cfg, image_size)
    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=False, image_seq_length=tokens,
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   post_processor_config=POST_PROCESSOR_CONFIG)
    processor.num_image_tokens = tokens
    return processor


def _sinusoid(rows: int, dim: int) -> torch.Tensor:
    pos = torch.arange(rows, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(rows, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


def build_tiny_model(cfg: TinyModelParams, processor, image_size: int, seed: int):
    """A randomly initialised Florence2ForConditionalGeneration from a small config."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    tok = processor.tokenizer
    n = len(cfg.vision_embed_dims)
    text_config = dict(
        model_type="bart", vocab_size=len(tok), d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.attention_heads, decoder_attention_heads=cfg.attention_heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim,
        max_position_embeddings=num_image_tokens(cfg, image_size) + 64 + cfg.max_target_tokens,
        init_std=cfg.init_std, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id,
        scale_embedding=False,
    )
    vision_config = dict(
        depths=cfg.vision_depths, embed_dim=cfg.vision_embed_dims, num_heads=cfg.vision_heads,
        num_groups=cfg.vision_groups, patch_size=cfg.patch_sizes, patch_stride=cfg.patch_strides,
        patch_padding=cfg.patch_padding, patch_prenorm=[False] + [True] * (n - 1),
        projection_dim=cfg.d_model, window_size=cfg.window_size, drop_path_rate=0.0,
        max_position_embeddings=max(50, image_size),
    )
    config = Florence2Config(text_config=text_config, vision_config=vision_config, image_token_id=tok.image_token_id)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config)
    # A 2-D sinusoidal start for the image position table: random rows/columns make the
    # decoder learn where things are from scratch, which a tiny model does slowly.
    pos = model.model.multi_modal_projector.image_position_embed
    with torch.no_grad():
        pos.row_embeddings.weight.copy_(_sinusoid(*pos.row_embeddings.weight.shape))
        pos.column_embeddings.weight.copy_(_sinusoid(*pos.column_embeddings.weight.shape))
    model.generation_config.decoder_start_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.forced_eos_token_id = None
    model.generation_config.max_length = None
    return model


def encode(processor, images: list[Image.Image], prompts: list[str], targets: list[str] | None = None) -> dict:
    """Processor inputs, plus ``labels`` (padding = -100) when targets are given. The model
    shifts labels right itself (decoder start </s>), so they are not shifted here."""
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    if targets is not None:
        labels = processor.tokenizer(targets, return_tensors="pt", padding=True, add_special_tokens=True).input_ids
        labels[labels == processor.tokenizer.pad_token_id] = -100
        inputs["labels"] = labels
    return dict(inputs)

