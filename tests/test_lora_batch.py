"""``runtime.lora_batch``: several LoRAs trained in one forward and backward pass a step.

Each adapter must train as it would alone: its loss from its own rows of the joined batch only, its
gradient that of its loss alone, its own learning rate and clipping. Tolerance: the joined pass runs
the base's layers over K times the rows, and a matrix product over more rows may block its sums
otherwise, so the gradients agree to float rounding, not bit for bit (when every adapter gets the
same batch, as in train_lora, they came out bit for bit). Measured as the largest difference over a
gradient tensor's spread (std) on a 2-core AMD EPYC (AVX-512), fast tests, four dispatch settings:
3.6e-5 with the portable pin and with MKL and oneDNN capped at AVX2, 7.6e-5 with the native paths
and with ATen capped at AVX2. TOLERANCE, 1e-3, is 13 times the largest; one row of an adapter's
batch sent through another adapter gives 0.64, a rotated batch 1 to 12.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from icmlora.florence.format import Box, encode_suffix
from icmlora.florence.model import build_tiny_model, build_tiny_processor, encode
from icmlora.lora import peft_config
from icmlora.training import Collate, adapter_losses, adapter_parameters, route_adapters

from params_helpers import micro_params
from spread import within

RANKS = [1, 2, 4]
TOLERANCE = 1e-3  # of each gradient tensor's spread: the measured worst is in the module's docstring
LEAK = 0.05  # a gradient from other rows differs from the adapter's own by more than this (measured ~1)


def _batches(processor, seed: int, count: int, size: int):
    """``count`` batches of ``size`` plain-colour images, each with its own random boxes and prompt
    length (so joining pads them)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        images, suffixes = [], []
        for _ in range(size):
            colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=gen))
            images.append(Image.new("RGB", (64, 64), colour))
            n = int(torch.randint(0, 3, (1,), generator=gen))
            boxes = []
            for _ in range(n):
                x, y = (int(v) for v in torch.randint(0, 40, (2,), generator=gen))
                boxes.append(Box("circle" if x % 2 else "square", x, y, x + 20, y + 20))
            suffixes.append(encode_suffix(boxes, 64, 64))
        out.append(encode(processor, images, ["<OD>"] * size, suffixes))
    return out


@pytest.fixture(scope="module")
def parts():
    cfg = micro_params()
    lora = cfg.lora.model_copy(update={"dropout": 0.0})  # no random masks: the two ways must see the same net
    processor = build_tiny_processor(["circle", "square", "object"], 64, cfg.base.tiny)
    return cfg, lora, processor


def _model(cfg, lora, processor, ranks: list[int], names: list[str]):
    """The tiny model with one LoRA per rank, B drawn non-zero (so A's gradients are too), fixed seeds."""
    from peft import get_peft_model

    model = None
    for rank, name in zip(ranks, names):
        base = build_tiny_model(cfg.base.tiny, processor, 64, seed=0) if model is None else None
        if model is None:
            model = get_peft_model(base, peft_config(lora, rank), adapter_name=name)
        else:
            model.add_adapter(name, peft_config(lora, rank))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.normal_(0, 0.2)
    model.base_model.set_adapter(names)
    return model


def _alone(cfg, lora, processor, joint, name: str, rank: int, batch) -> dict[str, torch.Tensor]:
    """The gradient of adapter ``name``'s weights when it is the model's only adapter, on ``batch``."""
    from peft import get_peft_model

    model = get_peft_model(build_tiny_model(cfg.base.tiny, processor, 64, seed=0), peft_config(lora, rank))
    mine = {n.replace(f".{name}.", ".default."): p for n, p in joint.named_parameters() if f".{name}." in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(mine[n])
    model.train()
    model(**batch).loss.backward()
    return {n.replace(".default.", f".{name}."): p.grad for n, p in model.named_parameters() if "lora_" in n}


def _worst(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys() and got
    return max(((got[n] - want[n]).abs().max() / want[n].std()).item() for n in want)


def test_one_pass_gives_each_adapter_the_gradient_of_its_own_rows_alone(parts):
    cfg, lora, processor = parts
    names = [f"r{r}" for r in RANKS]
    model = _model(cfg, lora, processor, RANKS, names)
    model.train()
    batches = _batches(processor, seed=0, count=len(RANKS), size=3)
    assert len({b["input_ids"].shape[1] for b in batches} | {b["labels"].shape[1] for b in batches}) > 1  # padded
    losses, tokens = adapter_losses(model, batches, names, Collate(processor), model.get_base_model().model)
    torch.stack(losses).sum().backward()
    assert [int(t) for t in tokens] == [int((b["labels"] != -100).sum()) for b in batches]
    for k, (name, rank) in enumerate(zip(names, RANKS)):
        joint = {n: p.grad for n, p in model.named_parameters() if f".{name}." in n}
        alone = _alone(cfg, lora, processor, model, name, rank, batches[k])
        worst = _worst(joint, alone)
        assert within("lora_batch: gradient, one pass vs alone (of its spread)", worst, TOLERANCE), (name, worst)
        # what a leak would look like: the same adapter's gradient on another adapter's rows
        other = _alone(cfg, lora, processor, model, name, rank, batches[(k + 1) % len(RANKS)])
        assert _worst(other, alone) > LEAK, name


def test_every_row_goes_through_its_own_adapter_only(parts):
    """Row routing, seen from the outputs: a joined batch's logits are, row for row, those of each
    adapter alone; and routing lasts only for the block."""
    cfg, lora, processor = parts
    names = [f"r{r}" for r in RANKS]
    model = _model(cfg, lora, processor, RANKS, names).eval()
    batch = _batches(processor, seed=1, count=1, size=2)[0]
    joined = Collate(processor).join([batch] * len(names))
    with torch.no_grad(), route_adapters(model, names, [2] * len(names)):
        logits = model(**joined).logits
    for k, name in enumerate(names):
        model.base_model.set_adapter(name)
        with torch.no_grad():
            alone = model(**batch).logits
        worst = ((logits[2 * k: 2 * k + 2] - alone).abs().max() / alone.std()).item()
        assert within("lora_batch: logits, one pass vs alone (of their spread)", worst, TOLERANCE), (name, worst)
    assert not any("forward" in vars(m) for m in model.modules())  # PEFT's own forward again after the block


def test_adapters_trained_together_must_agree_on_all_but_lr(parts):
    from icmlora.training import train

    cfg, lora, processor = parts
    model = _model(cfg, lora, processor, [1, 2], ["r1", "r2"])
    optim = cfg.lora.train
    with pytest.raises(ValueError, match="differ only in lr"):
        train(model, processor, [], optim, cfg.runtime, 0,
              adapters=[("r1", optim), ("r2", optim.model_copy(update={"steps": optim.steps + 1}))])
    with pytest.raises(ValueError, match="no adapter named 'r3'"):
        adapter_parameters(model, "r3")


@pytest.mark.slow
@pytest.mark.long  # (about 45 s: in make test-long, so make test's time does not grow)
def test_ranks_trained_together_train_as_each_would_alone(setting, tmp_path):
    """The stage end to end, LoRA dropout on: lora_batch 0 (every rank in one pass, each adapter's
    dropout from its own generator) against lora_batch 1 (one after the other, each alone, dropout
    from torch's generator): the same files (PEFT folders, metrics JSON but timings), every
    checkpoint and final adapter within TOLERANCE of its spread (measured: 0, bit for bit)."""
    from safetensors.torch import load_file

    from icmlora.stages.train_lora import train_lora

    cfg, root, _ = setting
    assert cfg.lora.ranks == [1, 2] and cfg.lora.lr_by_rank and cfg.lora.dropout > 0  # ranks with their own lr
    out = {}
    for batch in (1, 0):
        run = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"lora_batch": batch})})
        where = tmp_path / f"batch-{batch}"
        metrics = train_lora(run, "circle", 0, root / "prepared", root / "base", where / "lora", where / "state",
                             where / "metrics")
        assert not (where / "state" / "lora").exists() or not any((where / "state" / "lora").iterdir())
        out[batch] = (where, metrics)
    (alone, m1), (joint, m0) = out[1], out[0]
    files = sorted(p.relative_to(alone / "lora").as_posix() for p in (alone / "lora").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(joint / "lora").as_posix() for p in (joint / "lora").rglob("*") if p.is_file())
    assert any(f.endswith("final/adapter_model.safetensors") for f in files)
    for name in files:
        a, b = alone / "lora" / name, joint / "lora" / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(str(a)), load_file(str(b))
            assert ta.keys() == tb.keys(), name
            for key in ta:
                worst = ((ta[key] - tb[key]).abs().max() / ta[key].std()).item() if ta[key].std() > 0 else 0.0
                assert within("lora_batch: trained adapter, one pass vs alone (of its spread)", worst, TOLERANCE), \
                    (name, key, worst)
        else:
            assert a.read_bytes() == b.read_bytes(), name  # adapter_config.json, README.md
    timing = ("train_seconds", "eval_seconds", "pass_seconds", "trained_with")
    for rank in (1, 2):
        assert {k: v for k, v in m1[rank].items() if k not in timing} == {k: v for k, v in m0[rank].items()
                                                                          if k not in timing}
    assert [m1[r]["trained_with"] for r in (1, 2)] == [[1], [2]]
    assert [m0[r]["trained_with"] for r in (1, 2)] == [[1, 2]] * 2


def _intel() -> bool:
    try:
        return "GenuineIntel" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def test_adapter_dropout_draws_the_same_masks_on_every_cpu():
    """AdapterDropout's masks are uniform draws from its own generator below 1 - p, which no CPU
    dispatch changes; on a CPU that is not Intel's they are torch's own dropout's, bit for bit (the
    masks the committed adapters were trained with: torch's bernoulli_ takes MKL's own stream on an
    Intel CPU, which is why the LoRAs use AdapterDropout)."""
    import torch.nn.functional as F

    from icmlora.training import AdapterDropout

    x = torch.randn(4, 9, 32)
    drop = AdapterDropout(0.25, torch.Generator().manual_seed(11)).train()
    got = [drop(x), drop(x[:2])]
    gen = torch.Generator().manual_seed(11)
    for out, rows in zip(got, (x, x[:2])):
        kept = torch.empty(rows.shape, dtype=torch.float64).uniform_(0, 1, generator=gen) < 0.75
        assert torch.equal(out, rows * (kept.float() / 0.75))
        assert 0.6 < kept.float().mean() < 0.9
    assert torch.equal(drop.eval()(x), x)
    if not _intel():
        torch.manual_seed(11)
        assert torch.equal(got[0], F.dropout(x, 0.25, True)) and torch.equal(got[1], F.dropout(x[:2], 0.25, True))


def test_adapters_on_the_vision_tower_train_together_too(parts):
    """LoRAs in the vision tower (the reference targets of profiles real and scale reach its fc2; here
    its attention's qkv too, whose window attention sees each example's windows as rows of their
    own): split in proportion, each adapter's gradient is still that of its own examples alone
    (within TOLERANCE; a leak is far beyond)."""
    cfg, lora, processor = parts
    lora = lora.model_copy(update={"target_modules": ["qkv", "fc2", "lm_head"]})
    names, ranks = ["r1", "r2"], [1, 2]
    model = _model(cfg, lora, processor, ranks, names).train()
    assert any("window_attn.qkv.lora_A" in n for n, _ in model.named_parameters())
    batches = _batches(processor, seed=2, count=2, size=2)
    losses, _ = adapter_losses(model, batches, names, Collate(processor), model.get_base_model().model)
    torch.stack(losses).sum().backward()
    for k, (name, rank) in enumerate(zip(names, ranks)):
        joint = {n: p.grad for n, p in model.named_parameters() if f".{name}." in n}
        alone = _alone(cfg, lora, processor, model, name, rank, batches[k])
        assert within("lora_batch: gradient, one pass vs alone (of its spread)", _worst(joint, alone), TOLERANCE), name
        assert _worst(_alone(cfg, lora, processor, model, name, rank, batches[1 - k]), alone) > LEAK, name
