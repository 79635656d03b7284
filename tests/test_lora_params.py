"""Adapter I/O, collect_params (flatten, normalize, round trip, bad input) and task vectors."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from icmlora.config import config_from_dict
from icmlora.errors import InputError
from icmlora.florence import build_tiny_model, encode, load_images
from icmlora.lora.adapters import flatten, read_adapter, unflatten
from icmlora.lora.train import adapter_name
from icmlora.params import Manifest, collect_params, load_params




def test_flatten_unflatten_round_trip():
    tensors = {"b": torch.randn(3, 4), "a": torch.randn(2), "c": torch.randn(1, 1, 5)}
    names = sorted(tensors)
    vec = flatten(tensors, names)
    assert vec.shape == (2 + 12 + 5,)
    back = unflatten(vec, names, [list(tensors[n].shape) for n in names])
    assert all(torch.equal(back[n], tensors[n]) for n in names)
    with pytest.raises(ValueError, match="manifest describes"):
        unflatten(torch.zeros(3), names, [list(tensors[n].shape) for n in names])


def test_collect_params_manifest_and_train_task_statistics(setting, tmp_path):
    cfg, root, _ = setting
    manifest = collect_params(cfg, 2, root / "lora", tmp_path)
    tensors, loaded = load_params(2, tmp_path)
    assert manifest == loaded.data
    assert tensors["params"].shape == (9, manifest["dim"]) and tensors["params"].dtype == torch.float32
    assert tensors["task_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert tensors["step"].tolist() == [2, 4, 6] * 3
    assert manifest["offsets"][0] == 0 and manifest["names"] == sorted(manifest["names"])
    # Statistics come from the training tasks only: the held-out task's rows are not z-scored to 0/1.
    holdout = cfg.data.tasks.index(cfg.generator.holdout[0])
    train_rows = tensors["params"][tensors["task_index"] != holdout]
    first = train_rows[:, : manifest["offsets"][1]]
    assert first.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert first.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_row_to_adapter_round_trip_gives_the_same_outputs(setting, tmp_path):
    cfg, root, processor = setting
    collect_params(cfg, 1, root / "lora", tmp_path)
    tensors, manifest = load_params(1, tmp_path)
    row = 4  # square, step 4
    original = root / "lora" / adapter_name("square", 1, 0) / "checkpoints" / "step-4"
    manifest.write_adapter(tmp_path / "rebuilt", tensors["params"][row])
    a, _ = read_adapter(original)
    b, cfg_b = read_adapter(tmp_path / "rebuilt")
    assert cfg_b["r"] == 1 and sorted(a) == sorted(b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), name
    images = load_images([root / "prepared" / "_images" / "valid" / "000000.png"])
    inputs = encode(processor, images, ["<OD>"], ["square<loc_1><loc_2><loc_3><loc_4>"])
    outs = []
    for folder in (original, tmp_path / "rebuilt"):
        base = build_tiny_model(cfg.base.tiny, processor, 64, seed=0)
        model = PeftModel.from_pretrained(base, folder).eval()
        outs.append(model(**inputs).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_per_checkpoint_normalization_stores_row_statistics(setting, tmp_path):
    cfg, root, _ = setting
    cfg = config_from_dict({**_as_dict(cfg), "generator": {"holdout": ["triangle"], "normalization": "per_checkpoint"}})
    manifest = collect_params(cfg, 1, root / "lora", tmp_path)
    tensors, loaded = load_params(1, tmp_path)
    assert manifest["normalization"]["mode"] == "per_checkpoint"
    assert tensors["row_mean"].shape == (9, len(manifest["names"]))
    stats = (tensors["row_mean"][0], tensors["row_std"][0])
    rebuilt = loaded.to_tensors(tensors["params"][0], stats)
    original, _ = read_adapter(root / "lora" / adapter_name("circle", 1, 0) / "checkpoints" / "step-2")
    assert all(torch.allclose(rebuilt[n], original[n], atol=1e-6) for n in original)


@pytest.mark.parametrize("mode", ["centered", "train_tasks"])
def test_centered_normalization_removes_the_shared_checkpoint(setting, tmp_path, mode):
    cfg, root, _ = setting
    cfg = config_from_dict({**_as_dict(cfg), "generator": {"holdout": ["triangle"], "normalization": mode}})
    collect_params(cfg, 1, root / "lora", tmp_path)
    tensors, manifest = load_params(1, tmp_path)
    train_rows = tensors["task_index"] != cfg.data.tasks.index("triangle")
    raw = torch.stack([manifest.denormalize(r) for r in tensors["params"]])
    per_element_mean = tensors["params"][train_rows].mean(0).abs().max().item()
    if mode == "centered":
        # The center is the training rows' element-wise mean (the held-out task's rows excluded),
        # so every element of the normalized training rows averages to zero.
        assert torch.allclose(manifest.center, raw[train_rows].mean(0), atol=1e-6)
        assert not torch.allclose(manifest.center, raw.mean(0), atol=1e-6)
        assert per_element_mean < 1e-4
    else:
        assert manifest.center is None and "center" not in tensors and per_element_mean > 0.1
    original, _ = read_adapter(root / "lora" / adapter_name("triangle", 1, 0) / "checkpoints" / "step-6")
    rebuilt = manifest.to_tensors(tensors["params"][-1])
    assert all(torch.allclose(rebuilt[n], original[n], atol=1e-6) for n in original)


def test_centered_manifest_without_its_center_is_refused(setting, tmp_path):
    cfg, root, _ = setting
    collect_params(cfg, 1, root / "lora", tmp_path)
    tensors = load_file(str(tmp_path / "r1.safetensors"))
    tensors.pop("center")
    save_file(tensors, str(tmp_path / "r1.safetensors"))
    with pytest.raises(InputError, match="cannot read the 'center' tensor"):
        Manifest.load(tmp_path / "r1.json")


def _as_dict(cfg):
    import dataclasses

    return dataclasses.asdict(cfg)


def _copy_lora(root, tmp_path):
    import shutil

    shutil.copytree(root / "lora", tmp_path / "lora")
    return tmp_path / "lora"


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a readable safetensors file"),
    ("nan", "non-finite weights"),
    ("rank", "adapter rank 2 is not 1"),
    ("targets", "tensor names or shapes differ"),
])
def test_bad_checkpoints_name_the_file(setting, tmp_path, damage, message):
    cfg, root, _ = setting
    lora = _copy_lora(root, tmp_path)
    bad = lora / adapter_name("square", 1, 0) / "checkpoints" / "step-4"
    weights = bad / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "nan":
        t = load_file(str(weights))
        next(iter(t.values()))[0] = float("nan")
        save_file(t, str(weights))
    elif damage == "rank":
        conf = json.loads((bad / "adapter_config.json").read_text())
        conf["r"] = 2
        (bad / "adapter_config.json").write_text(json.dumps(conf))
    else:
        t = load_file(str(weights))
        t.pop(next(iter(t)))
        save_file(t, str(weights))
    with pytest.raises(InputError) as err:
        collect_params(cfg, 1, lora, tmp_path / "out")
    assert message in str(err.value) and str(bad) in str(err.value)
    assert not (tmp_path / "out" / "r1.safetensors").exists()


def test_manifest_validation(tmp_path):
    (tmp_path / "r1.json").write_text(json.dumps({"rank": 1}))
    with pytest.raises(InputError, match="not a parameter manifest"):
        Manifest.load(tmp_path / "r1.json")


def test_task_vectors_shapes_per_method(setting, tmp_path):
    from icmlora.task_vectors import compute_task_vectors, load_task_vectors

    cfg, root, processor = setting
    metrics = compute_task_vectors(cfg, root / "prepared", root / "base", root / "lora", tmp_path / "tv.safetensors",
                                   tmp_path / "tv.json", tmp_path / "plots")
    assert set(metrics["silhouette"]) == {"icl_last", "icl_mean", "icl_label", "icl_match", "text"}  # no adapters: no reference
    assert set(metrics["match_fraction"]) == set(cfg.data.tasks) and all(0 <= f <= 1 for f in metrics["match_fraction"].values())
    vectors = load_task_vectors(tmp_path / "tv.safetensors")
    assert list(vectors) == cfg.data.tasks and all(v.shape == (cfg.base.tiny.d_model,) for v in vectors.values())
    ex = load_file(str(tmp_path / "tv.safetensors"))
    for pooling in ("mean", "match"):
        assert ex[f"icl_{pooling}_examples"].shape == (len(cfg.data.tasks) * cfg.task_vectors.examples, cfg.base.tiny.d_model)
    assert ex["text_examples"].shape[0] == len(cfg.data.tasks) * 4
    assert (tmp_path / "plots" / "icl_mean.png").stat().st_size > 1000


def test_match_pooling_finds_where_the_base_names_each_object():
    from icmlora.data.florence_format import Box
    from icmlora.evaluation.metrics import box_iou
    from icmlora.task_vectors import _named_objects

    loc = {100 + i: i for i in range(1000)}  # token id 100 + i is <loc_i>
    special = {0, 1, 2}
    # </s> <s> red x1 y1 x2 y2  blue x1 y1 x2 y2 </s>: the states at 1 and 6 predict the two names.
    seq = [2, 0, 7, 100 + 0, 100 + 0, 100 + 499, 100 + 499, 8, 100 + 500, 100 + 500, 100 + 999, 100 + 999, 2]
    named = _named_objects(seq, loc, special, 64, 64)
    assert [j for j, _ in named] == [1, 6]
    assert named[0][1].xyxy == pytest.approx((0.032, 0.032, 31.968, 31.968))
    corner = Box("", 32.0, 32.0, 64.0, 64.0)
    assert box_iou(named[1][1], corner) > 0.99 and box_iou(named[0][1], corner) == 0.0
    assert _named_objects([2, 0, 7, 100, 100, 2], loc, special, 64, 64) == []  # a cut-off box names nothing
