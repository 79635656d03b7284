import pytest
import torch
from PIL import Image
from params_helpers import category_params, micro_params
from spread import within

from icmlora.artifacts.base_model import read_base_model, write_base_model
from icmlora.config import PredictParams
from icmlora.florence.format import Box, encode_suffix
from icmlora.florence.model import build_tiny_model, build_tiny_processor, encode, num_image_tokens
from icmlora.florence.predict import TokenReader, predict

TINY = micro_params().base.tiny


@pytest.fixture(scope="module")
def tiny():
    processor = build_tiny_processor(["circle", "square", "object"], 64, TINY)
    model = build_tiny_model(TINY, processor, 64, seed=0)
    return model, processor


def test_image_token_count_matches_the_vision_tower(tiny):
    model, processor = tiny
    assert processor.num_image_tokens == num_image_tokens(TINY, 64) == 65
    inputs = encode(processor, [Image.new("RGB", (64, 64))] * 2, ["<OD>"] * 2, ["circle<loc_1><loc_2><loc_3><loc_4>"] * 2)
    out = model(**inputs)
    assert torch.isfinite(out.loss)


def test_labels_are_single_tokens(tiny):
    _, processor = tiny
    ids = processor.tokenizer("circle<loc_1><loc_2><loc_3><loc_4>square<loc_5><loc_6><loc_7><loc_8>").input_ids
    assert len(ids) == 2 + 2 * 5


def test_save_and_load_round_trip(tiny, tmp_path):
    model, processor = tiny
    write_base_model(model, processor, tmp_path / "base")
    model2, processor2 = read_base_model(tmp_path / "base")
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    a = encode(processor, [image], ["<OD>"], ["square<loc_1><loc_2><loc_3><loc_4>"])
    b = encode(processor2, [image], ["<OD>"], ["square<loc_1><loc_2><loc_3><loc_4>"])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    model.eval(), model2.eval()
    assert torch.allclose(model(**a).logits, model2(**b).logits)


def test_token_parser_agrees_with_the_transformers_post_processor(tiny):
    _, processor = tiny
    boxes = [Box("circle", 3.2, 4.9, 40.0, 50.5), Box("square", 10, 10, 63.9, 20), Box("circle", 0, 0, 8, 8)]
    text = "</s><s>" + encode_suffix(boxes, 64, 64) + "</s><pad><pad>"
    # predict() drops the decoder start token (</s>) before parsing, as here.
    ids = processor.tokenizer(text, add_special_tokens=False).input_ids[1:]
    probs = [0.5] * len(ids)
    ours = TokenReader(processor.tokenizer).boxes(ids, probs, 64, 64)
    theirs = processor.post_process_generation(text, task="<OD>", image_size=(64, 64))["<OD>"]
    assert [b.label for b in ours] == theirs["labels"]
    assert [[int(v) for v in b.xyxy] for b in ours] == theirs["bboxes"]  # transformers truncates to ints
    assert all(b.score == pytest.approx(0.5) for b in ours)


def test_token_parser_scores_from_probabilities(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    ids = tok("circle<loc_1><loc_2><loc_3><loc_4><loc_10><loc_20><loc_30><loc_40>", add_special_tokens=False).input_ids
    probs = [0.9, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2, 0.2, 0.2]
    first, second = TokenReader(tok).boxes(ids + [tok.eos_token_id], probs + [1.0], 64, 64)
    assert first.score == pytest.approx((0.9 + 4.0) / 5)
    assert second.score == pytest.approx((0.9 + 0.8) / 5)
    assert first.x1 == pytest.approx(1.5 * 64 / 1000)  # bin centre, not truncated


def test_predict_returns_scored_boxes_per_image(boxer):
    """Each image's boxes, in its order, in pixels (a location token is its bin's centre: within
    one bin, 64 / 1000 px, of the box it encodes), each scored in (0, 1]; batches split anywhere."""
    out = predict(boxer.model, boxer.processor, boxer.images,
                  PredictParams(batch_size=3, max_new_tokens=14, num_beams=1, image_cache_mb=0))
    assert len(out) == len(boxer.targets) == 4 and sum(map(len, out)) == 4
    for boxes, targets in zip(out, boxer.targets):
        assert [b.label for b in boxes] == [t.label for t in targets]
        for b, t in zip(boxes, targets):
            assert b.xyxy == pytest.approx(t.xyxy, abs=0.064)
            assert 0.0 < b.score <= 1.0


def test_base_model_from_a_local_folder(repo, tiny, tmp_path):
    """base.model = a local path: copied into models/base, evaluated, no training, no network."""
    from icmlora.stages.base_model import build_base_model
    from icmlora.stages.prepare import prepare

    model, processor = tiny
    source = tmp_path / "florence-local"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    cfg = category_params(**{"data.tasks": ["circle", "square"], "heldout_tasks": ["square"],
                            "data.synthetic.train_images": 16, "data.synthetic.valid_images": 8,
                            "base.model": str(source), "predict.batch_size": 8, "predict.max_new_tokens": 6})
    prepare(cfg, tmp_path / "prepared")
    metrics = build_base_model(cfg, tmp_path / "prepared", tmp_path / "base", tmp_path / "m.json", tmp_path / "loss.csv")
    assert metrics["train_steps"] == 0 and metrics["num_images"] == 8
    assert {"map50", "map50_95", "train_seconds"} <= set(metrics)
    reloaded, _ = read_base_model(tmp_path / "base")
    original, copied = model.state_dict(), reloaded.state_dict()
    assert sorted(copied) == sorted(original) and len(original) > 0
    for name, value in original.items():
        assert torch.equal(copied[name], value), name


def _toy_examples(tmp_path, n=6):
    """Small RGB images with 1-3 boxes each (targets of different lengths), written into tmp_path."""
    from icmlora.florence.format import Example

    examples = []
    for i in range(n):
        Image.new("RGB", (64, 64), (40 * i, 200 - 30 * i, 90)).save(tmp_path / f"{i}.png")
        boxes = [Box("circle" if j % 2 else "square", 2 + j, 3, 20 + 5 * j, 30) for j in range(1 + i % 3)]
        examples.append(Example(image=f"{i}.png", width=64, height=64, boxes=boxes))
    return examples


@pytest.mark.parametrize("cached_images", [0, 2, 5])
def test_cached_encodings_batch_exactly_as_the_processor_encodes_a_batch(tiny, tmp_path, cached_images):
    """Training decodes and preprocesses each image once (DetectionDataset's cache): its batches
    equal the processor's own batch encoding bit for bit, targets of different lengths padded
    the same way, with the cache on, off, or full after a few images."""
    from icmlora.training import Collate, DetectionDataset

    _, processor = tiny
    examples = _toy_examples(tmp_path, 5)
    dataset = DetectionDataset(examples, tmp_path, processor, cache_mb=1)
    dataset.cache_bytes = cached_images * 3 * 64 * 64 * 4  # room for this many images' pixels
    expected = encode(processor, [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(5)],
                      [e.prefix for e in examples], [e.suffix for e in examples])
    for _ in range(2):  # the second pass reads what the first cached
        batch = Collate(processor)([dataset[i] for i in range(5)])
        assert batch.keys() == expected.keys()
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key
    assert sorted(dataset.cache) == list(range(cached_images))


def test_examples_encoded_many_at_once_equal_each_encoded_alone(tiny, tmp_path):
    """The image features' cache encodes a batch of examples in one processor call and unpads the
    rows: each equals, bit for bit and shape for shape, the example encoded alone (targets of 1-3
    boxes: rows of different lengths), on either padding side."""
    from icmlora.training import DetectionDataset

    _, processor = tiny
    examples = _toy_examples(tmp_path, 6)
    dataset = DetectionDataset(examples, tmp_path, processor)
    for side in ("right", "left"):
        processor.tokenizer.padding_side = side
        try:
            many, alone = dataset.encode_many(range(6)), [dataset.encode(i) for i in range(6)]
        finally:
            processor.tokenizer.padding_side = "right"
        assert len({len(a["labels"]) for a in alone}) > 1  # padded in the joint call
        for got, want in zip(many, alone):
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].shape == want[key].shape and torch.equal(got[key], want[key]), (side, key)


def test_lora_training_on_cached_image_features_equals_training_on_pixels(tiny, tmp_path):
    """A LoRA on the language model leaves the image features as they are, so training runs the
    vision tower once per image, not once per step: a batch of cached features gives the model the
    loss and gradients the pixels give, training uses them, and a second adapter on the same base
    reuses them. (Whole runs agree only approximately: the vision tower's float sums depend on
    which images share its batch, and Adam turns near-zero gradients' noise into full steps.)"""
    import copy

    from peft import get_peft_model

    from icmlora.lora import peft_config
    from icmlora.runtime import make_accelerator
    from icmlora.training import Collate, DetectionDataset, _embed_inputs, _florence, frozen_image_features, train

    model, processor = tiny
    cfg = micro_params()
    accelerator = make_accelerator(cfg.runtime)
    examples = _toy_examples(tmp_path)
    lora = _with_random_lora(model, cfg.lora, 2, std=0.05).train()
    assert frozen_image_features(lora)
    pixels = DetectionDataset(examples, tmp_path, processor, cache_mb=0)
    cached = DetectionDataset(examples, tmp_path, processor, cache_mb=1)
    for i in range(3):
        cached[i]  # pixels cached, as by an earlier epoch
    assert sorted(cached.cache) == [0, 1, 2] and cached.cached_bytes > 0
    assert cached.cache_image_features(lora, 4, accelerator)
    assert cached.features.shape == (len(examples), num_image_tokens(TINY, 64), TINY.d_model)
    assert not cached.cache and cached.cached_bytes == 0  # the features replace the pixels
    order = [4, 1, 5]
    grads = []
    for dataset in (pixels, cached):
        batch = Collate(processor)([dataset[i] for i in order])
        if dataset is cached:
            assert "pixel_values" not in batch
            batch = _embed_inputs(_florence(lora), batch)
        lora.zero_grad()
        loss = lora(**batch).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}))
    loss_gap = abs(float(grads[1][0]) - float(grads[0][0])) / abs(float(grads[0][0]))
    assert within("cached_features.loss_relative", loss_gap, 1e-5), loss_gap
    # Each gradient within 1e-4 of its own largest value: cached features and the vision tower's
    # output agree to float rounding, not bit for bit.
    grad_gap = max(float((grads[1][1][n] - g).abs().max()) / max(float(g.abs().max()), 1e-12)
                   for n, g in grads[0][1].items())
    assert within("cached_features.grad_over_max", grad_gap, 1e-4), grad_gap

    optim = cfg.lora.train.model_copy(update={"steps": 4, "batch_size": 3, "warmup_steps": 1})
    features = cached.features
    for rank in (1, 2):
        adapter = get_peft_model(copy.deepcopy(model), peft_config(cfg.lora, rank))
        result = train(adapter, processor, cached, optim, cfg.runtime, seed=3, accelerator=accelerator)
        assert cached.features is features  # same base weights: computed once, reused
        assert result.losses[-1] < result.losses[0]
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.model.vision_tower.parameters()).add_(0.1)
    train(get_peft_model(other, peft_config(cfg.lora, 1)), processor, cached, optim, cfg.runtime, seed=3,
          accelerator=accelerator)
    assert cached.features is not features and not torch.equal(cached.features, features)  # another base

    # Full training can change the features: the dataset serves pixels again, whatever it kept.
    full = copy.deepcopy(model)
    train(full, processor, cached, optim, cfg.runtime, seed=3, accelerator=accelerator)
    assert cached.features is None and "pixel_values" in cached[0]


def test_image_features_that_do_not_fit_the_cache_leave_the_pixels_served(tiny, tmp_path):
    """Features larger than runtime.image_cache_mb are not kept: the dataset serves pixels (and
    their cache) as before, and the next adapter on the same base does not try again."""
    import copy

    from peft import get_peft_model

    from icmlora.lora import peft_config
    from icmlora.runtime import make_accelerator
    from icmlora.training import DetectionDataset

    model, processor = tiny
    cfg = micro_params()
    accelerator = make_accelerator(cfg.runtime)
    dataset = DetectionDataset(_toy_examples(tmp_path), tmp_path, processor, cache_mb=1)
    dataset[0]
    dataset.cache_bytes = 5 * num_image_tokens(TINY, 64) * TINY.d_model * 4  # 5 of the 6 examples' features
    lora = get_peft_model(copy.deepcopy(model), peft_config(cfg.lora, 2))
    assert not dataset.cache_image_features(lora, 4, accelerator)
    assert dataset.features is None and dataset.text == [] and list(dataset.cache) == [0]
    assert "pixel_values" in dataset[1]
    calls = []
    dataset.encode = lambda i: calls.append(i)  # a second try would encode the first batch again
    assert not dataset.cache_image_features(lora, 4, accelerator) and not calls


def test_image_features_are_computed_every_step_when_training_can_change_them(tiny):
    """Full training, a LoRA on a vision-tower layer, and a vision tower with drop path (Florence-2-
    base's 0.1) all change the image features during training: no features cache for them."""
    import copy

    from peft import get_peft_model

    from icmlora.lora import peft_config
    from icmlora.training import frozen_image_features

    model, _ = tiny
    cfg = micro_params()
    assert not frozen_image_features(model)  # every parameter trains
    # A LoRA on the token embeddings: their weight stays frozen, lora_embedding_A/B train.
    embeddings = cfg.lora.model_copy(update={"target_modules": r".*language_model\.shared"})
    assert not frozen_image_features(get_peft_model(copy.deepcopy(model), peft_config(embeddings, 2)))
    vision = cfg.lora.model_copy(update={"target_modules": "reference"})  # includes the DaViT fc2 layers
    assert not frozen_image_features(get_peft_model(copy.deepcopy(model), peft_config(vision, 2)))
    dropping = copy.deepcopy(model)
    from transformers.models.florence2.modeling_florence2 import Florence2DropPath

    block = next(m for m in dropping.model.vision_tower.modules() if hasattr(m, "drop_path1"))
    block.drop_path1 = Florence2DropPath(0.1)  # what drop_path_rate 0.1 builds
    assert not frozen_image_features(get_peft_model(dropping, peft_config(cfg.lora, 2)))


def _with_random_lora(model, lora_params, rank, target_modules=None, std=0.5):
    """A PEFT copy of ``model`` (in eval mode, no dropout) whose LoRA B matrices are random (B = 0 at
    init adds nothing)."""
    import copy

    from peft import get_peft_model

    from icmlora.lora import peft_config

    update = {"dropout": 0.0} if target_modules is None else {"dropout": 0.0, "target_modules": target_modules}
    lora = get_peft_model(copy.deepcopy(model), peft_config(lora_params.model_copy(update=update), rank))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std, generator=torch.Generator().manual_seed(len(name)))
    return lora.eval()


def test_generation_from_encoded_images_equals_generation_from_pixels(tiny):
    """``encode_images`` + ``mm_encoder_outputs`` is what ``generate`` computes from pixels: the same
    tokens and the same scores, bit for bit, greedy and with beams."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from icmlora.florence.format import OD_PROMPT
    from icmlora.florence.predict import encode_images

    model, processor = tiny
    lora = _with_random_lora(model, micro_params().lora, 2)
    images = [Image.new("RGB", (64, 64), (i * 50, 90, 200 - i * 40)) for i in range(5)]
    params = PredictParams(batch_size=3, max_new_tokens=9, num_beams=1, image_cache_mb=1)
    encoded = list(encode_images(lora, processor, images, params))
    assert [len(b["input_ids"]) for b in encoded] == [3, 2] and "pixel_values" not in encoded[0]
    for beams in (1, 2):
        for start, batch in zip((0, 3), encoded):
            pixels = processor(text=[OD_PROMPT] * len(batch["input_ids"]), images=images[start : start + 3],
                               return_tensors="pt")
            kwargs = dict(max_new_tokens=9, num_beams=beams, do_sample=False, return_dict_in_generate=True,
                          output_scores=True)
            with torch.no_grad():
                expected = lora.generate(**pixels, **kwargs)
                image = BaseModelOutputWithPooling(pooler_output=batch["image_features"])
                got = lora.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    mm_encoder_outputs={"image": image}, **kwargs)
            assert torch.equal(got.sequences, expected.sequences)
            for a, b in zip(got.scores, expected.scores, strict=True):
                assert torch.equal(a, b)


def test_scorer_encodes_a_tasks_images_once_for_every_adapter(boxer, tmp_path, monkeypatch):
    """Scoring many language-model adapters on a task runs the image processor and the vision tower
    once (within predict.image_cache_mb), with the boxes scoring without the cache gives; a model
    with an adapter in the vision tower, a plain model, or features over the budget are not cached."""
    from icmlora import scoring
    from icmlora.florence.predict import image_features_fixed

    model, processor = boxer.model, boxer.processor
    task = boxer.dataset(tmp_path / "task")  # 4 images: 2 batches
    calls = []
    real = scoring.encode_images
    monkeypatch.setattr(scoring, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    lora_params = micro_params().lora
    params = PredictParams(batch_size=2, max_new_tokens=9, num_beams=1, image_cache_mb=1)
    lora = _with_random_lora(model, lora_params, 2, std=0.03)
    assert image_features_fixed(lora) and not image_features_fixed(model)
    # B x 0: the boxer's own boxes, so the equalities below compare boxes, not empty lists
    weights = [{n: p.detach() * s for n, p in lora.named_parameters() if "lora_" in n} for s in (1.0, -0.5, 0.0)]

    # The boxes, and the generated tokens themselves.
    generated: list[torch.Tensor] = []
    generate = lora.generate

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        generated.append(out.sequences)
        return out

    monkeypatch.setattr(lora, "generate", recording)

    def tokens(scorer, **kwargs):
        generated.clear()
        boxes = scorer.predictions(task, **kwargs)
        return boxes, torch.cat([g[:, 1:].flatten() for g in generated])

    vision_runs = []
    hook = lora.get_base_model().model.vision_tower.register_forward_hook(lambda *_: vision_runs.append(1))
    cached = scoring.Scorer(lora, processor, params, 0)
    plain = scoring.Scorer(lora, processor, params.model_copy(update={"image_cache_mb": 0}), 0)
    seen, boxes = [], []
    for kwargs in [{"weights": w} for w in weights] + [{"disable_adapter": True}]:
        vision_runs.clear()
        got = tokens(cached, **kwargs)
        assert len(vision_runs) == (2 if not seen else 0)  # 2 batches encoded once, then never again
        expected = tokens(plain, **kwargs)
        assert len(vision_runs) == (4 if not seen else 2)  # without the cache: every batch, every time
        assert got[0] == expected[0] and torch.equal(got[1], expected[1])
        seen.append(got[1])
        boxes.append(got[0])
    hook.remove()
    assert boxes[2] == boxes[3] and sum(map(len, boxes[3])) >= 3  # B = 0 is the base: the boxer's boxes
    assert len(calls) == 1 and cached.encoded(task) is not None and 0 < cached.cached_bytes <= 2**20
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[-1])  # the adapters matter

    calls.clear()
    vision = _with_random_lora(model, lora_params, 2, r".*vision_tower\..*\.fc1")
    assert not image_features_fixed(vision)
    for m in (vision, model):
        scorer = scoring.Scorer(m, processor, params, 0)
        scorer.predictions(task)
        assert scorer.encoded(task) is None and scorer.cached_bytes == 0
    assert not calls

    small = scoring.Scorer(lora, processor, params, 0)
    small.cache_bytes = cached.cached_bytes - 1  # the task's features do not fit
    assert small.predictions(task, weights[2]) == plain.predictions(task, weights[2]) == boxes[2]
    assert small.encoded(task) is None and small.cached_bytes == 0 and len(calls) == 1

    # Weights that reach the image path themselves (not through an adapter layer) end the cache.
    name, value = next((n, p.clone()) for n, p in lora.state_dict().items() if "vision_tower." in n and n.endswith("weight"))
    cached.predictions(task, {**weights[0], name: value + 0.5})
    assert cached.cache_bytes == 0 and cached.encoded(task) is None
    assert torch.equal(lora.state_dict()[name], value + 0.5)  # loaded: the kept features would have been stale
    assert tokens(cached, weights=weights[1])[1].equal(tokens(plain, weights=weights[1])[1])


def test_predict_refuses_encodings_of_other_batches(tiny):
    from icmlora.florence.predict import encode_images

    model, processor = tiny
    lora = _with_random_lora(model, micro_params().lora, 1)
    images = [Image.new("RGB", (64, 64), (i * 60, 0, 0)) for i in range(3)]
    params = PredictParams(batch_size=2, max_new_tokens=4, num_beams=1, image_cache_mb=1)
    encoded = list(encode_images(lora, processor, images, params))
    assert len(predict(lora, processor, images, params, encoded=encoded)) == 3
    with pytest.raises(ValueError, match=r"batches of \[2, 1\].*batches of \[3\]"):
        predict(lora, processor, images, params.model_copy(update={"batch_size": 3}), encoded=encoded)
    with pytest.raises(ValueError, match="same images and batch size"):
        predict(lora, processor, images[:2], params, encoded=encoded)
