"""Adapter I/O, collect_params (flatten, normalize, round trip, bad input) and task vectors."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from params_helpers import micro_params

from icmlora.artifacts import checkpoints_dir
from icmlora.artifacts.adapters import read_adapter
from icmlora.artifacts.lora_matrix import flatten, read_lora_matrix, read_manifest, unflatten
from icmlora.errors import InputError
from icmlora.florence.model import build_tiny_model, encode
from icmlora.images import load_images
from icmlora.stages.collect_params import collect_params



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
    matrix = read_lora_matrix(2, tmp_path)
    assert manifest == matrix.manifest.data
    assert matrix.rows.shape == (9, manifest["dim"]) and matrix.rows.dtype == torch.float32
    assert matrix.task_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert matrix.step.tolist() == [2, 4, 6] * 3
    assert manifest["offsets"][0] == 0 and manifest["names"] == sorted(manifest["names"])
    # Statistics come from the training tasks only: the held-out task's rows are not z-scored to 0/1.
    holdout = cfg.data.tasks.index(cfg.heldout_tasks[0])
    train_rows = matrix.rows[matrix.task_index != holdout]
    first = train_rows[:, : manifest["offsets"][1]]
    assert first.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert first.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("mode", ["centered", "train_tasks"])
def test_collect_params_in_place_passes_give_the_whole_row_result_bit_for_bit(setting, tmp_path, mode):
    """collect_params works a tensor's span at a time to stay near its output's size in memory; its
    rows, center and statistics equal, bit for bit, the whole-row computation: the center as the
    float64 mean of the training rows, each row as Manifest.normalize(flatten(its checkpoint))."""
    cfg, root, _ = setting
    cfg = micro_params(**{"cvae.normalization": mode})
    collect_params(cfg, 2, root / "lora", tmp_path)
    matrix = read_lora_matrix(2, tmp_path)
    manifest = matrix.manifest
    raw = torch.stack([flatten(read_adapter(checkpoints_dir(task, 2, 0, root / "lora") / f"step-{step}")[0],
                               manifest.names) for task in cfg.data.tasks for step in (2, 4, 6)])
    train = raw[matrix.task_index != cfg.data.tasks.index(cfg.heldout_tasks[0])]
    if mode == "centered":
        assert torch.equal(manifest.center, (train.double().sum(0) / len(train)).float())
    expected = torch.stack([manifest.normalize(row) for row in raw])
    assert torch.equal(matrix.rows, expected) and expected.abs().sum() > 0


def test_row_to_adapter_round_trip_gives_the_same_outputs(setting, tmp_path):
    cfg, root, processor = setting
    collect_params(cfg, 1, root / "lora", tmp_path)
    matrix = read_lora_matrix(1, tmp_path)
    row = 4  # square, step 4
    original = checkpoints_dir("square", 1, 0, root / "lora") / "step-4"
    matrix.manifest.write_adapter(tmp_path / "rebuilt", matrix.rows[row])
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
    cfg = micro_params(**{"cvae.normalization": "per_checkpoint"})
    manifest = collect_params(cfg, 1, root / "lora", tmp_path)
    matrix = read_lora_matrix(1, tmp_path)
    assert manifest["normalization"]["mode"] == "per_checkpoint"
    assert matrix.row_mean.shape == (9, len(manifest["names"]))
    rebuilt = matrix.manifest.to_tensors(matrix.rows[0], matrix.row_stats(0))
    original, _ = read_adapter(checkpoints_dir("circle", 1, 0, root / "lora") / "step-2")
    assert all(torch.allclose(rebuilt[n], original[n], atol=1e-6) for n in original)


@pytest.mark.parametrize("mode", ["centered", "train_tasks"])
def test_centered_normalization_removes_the_shared_checkpoint(setting, tmp_path, mode):
    cfg, root, _ = setting
    cfg = micro_params(**{"cvae.normalization": mode})
    collect_params(cfg, 1, root / "lora", tmp_path)
    matrix = read_lora_matrix(1, tmp_path)
    manifest = matrix.manifest
    tensors = load_file(str(tmp_path / "r1.safetensors"))
    train_rows = matrix.task_index != cfg.data.tasks.index("triangle")
    raw = torch.stack([manifest.denormalize(r) for r in matrix.rows])
    per_element_mean = matrix.rows[train_rows].mean(0).abs().max().item()
    if mode == "centered":
        # The center is the training rows' element-wise mean (the held-out task's rows excluded),
        # so every element of the normalized training rows averages to zero.
        assert torch.allclose(manifest.center, raw[train_rows].mean(0), atol=1e-6)
        assert not torch.allclose(manifest.center, raw.mean(0), atol=1e-6)
        assert per_element_mean < 1e-4
    else:
        assert manifest.center is None and "center" not in tensors and per_element_mean > 0.1
    original, _ = read_adapter(checkpoints_dir("triangle", 1, 0, root / "lora") / "step-6")
    rebuilt = manifest.to_tensors(matrix.rows[-1])
    assert all(torch.allclose(rebuilt[n], original[n], atol=1e-6) for n in original)


def test_centered_manifest_without_its_center_is_refused(setting, tmp_path):
    cfg, root, _ = setting
    collect_params(cfg, 1, root / "lora", tmp_path)
    tensors = load_file(str(tmp_path / "r1.safetensors"))
    tensors.pop("center")
    save_file(tensors, str(tmp_path / "r1.safetensors"))
    with pytest.raises(InputError, match="cannot read the 'center' tensor"):
        read_manifest(1, tmp_path)


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
    bad = checkpoints_dir("square", 1, 0, lora) / "step-4"
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
    with pytest.raises(InputError, match="not a LoRA matrix manifest"):
        read_manifest(1, tmp_path)


def test_match_pooling_finds_where_the_base_names_each_object(setting):
    from icmlora.florence.format import Box
    from icmlora.florence.hidden_states import named_objects
    from icmlora.florence.predict import TokenReader
    from icmlora.metrics import box_iou

    _, _, processor = setting
    tok = processor.tokenizer
    reader = TokenReader(tok)
    circle, square = tok.convert_tokens_to_ids(["circle", "square"])
    loc = {i: tok.convert_tokens_to_ids(f"<loc_{i}>") for i in (0, 499, 500, 999)}
    eos, bos = tok.eos_token_id, tok.bos_token_id
    # </s> <s> circle x1 y1 x2 y2  square x1 y1 x2 y2 </s>: the states at 1 and 6 predict the two names.
    seq = [eos, bos, circle, loc[0], loc[0], loc[499], loc[499], square, loc[500], loc[500], loc[999], loc[999], eos]
    named = named_objects(reader, seq, 64, 64)
    assert [j for j, _, _ in named] == [1, 6]
    # ... and the states at 2-5 and 7-10 predict their four locations (the object pooling's).
    assert [locs for _, _, locs in named] == [(2, 3, 4, 5), (7, 8, 9, 10)]
    assert named[0][1].xyxy == pytest.approx((0.032, 0.032, 31.968, 31.968))
    corner = Box("", 32.0, 32.0, 64.0, 64.0)
    assert box_iou(named[1][1], corner) > 0.99 and box_iou(named[0][1], corner) == 0.0
    assert named_objects(reader, [eos, bos, circle, loc[0], loc[0], eos], 64, 64) == []  # a cut-off box names nothing
    # A second box of the same phrase has no name of its own: only the first counts.
    two = [eos, bos, circle, *[loc[0]] * 2, *[loc[499]] * 2, *[loc[500]] * 2, *[loc[999]] * 2, eos]
    assert [j for j, _, _ in named_objects(reader, two, 64, 64)] == [1]


def test_streamed_safetensors_read_back_exactly(tmp_path):
    """The lora_matrix writer's own safetensors output (no in-memory copy) is what safetensors reads."""
    from safetensors.torch import load_file

    from icmlora.artifacts.lora_matrix import save_streamed

    tensors = {"matrix": torch.randn(5, 1001), "task_index": torch.arange(5), "center": torch.randn(1001),
               "row_mean": torch.randn(5, 3).double(), "empty": torch.zeros(0)}
    save_streamed(tensors, tmp_path / "m.safetensors")
    back = load_file(str(tmp_path / "m.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    with pytest.raises(ValueError, match="dtype torch.float16 not supported"):
        save_streamed({"x": torch.zeros(2, dtype=torch.float16)}, tmp_path / "h.safetensors")


def test_a_folder_that_holds_adapters_is_named_in_the_error(tmp_path):
    """`icmlora score --adapter models/lora/<task>-s0/r4` (the rank's folder, not its final/) says where
    the adapters are."""
    for name in ("final", "checkpoints"):
        (tmp_path / "r4" / name).mkdir(parents=True)
    (tmp_path / "r4" / "final" / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match=r"adapter folders inside it: final \(e\.g\. .*r4/final\)"):
        read_adapter(tmp_path / "r4")
    with pytest.raises(InputError, match=r"not found \(an adapter folder holds [^)]*\)$"):
        read_adapter(tmp_path / "r4" / "checkpoints")  # nothing inside: no hint


# Hand-made checkpoints for collect_params (no model): two tensors "a" [1, 2] and "b" [3, 1] at rank 1,
# three checkpoints per task, each task's values around its own offset.
def _hand_made(root, cfg, offsets=(2.0, -1.0, 5.0)):
    from icmlora.artifacts import checkpoint_name
    from icmlora.artifacts.adapters import write_adapter

    g = torch.Generator().manual_seed(4)
    raw = {}
    for task, offset in zip(cfg.data.tasks, offsets):
        for step in (2, 4, 6):
            tensors = {"a": offset + torch.randn(1, 2, generator=g), "b": 3 * offset + 2 * torch.randn(3, 1, generator=g)}
            write_adapter(checkpoints_dir(task, 1, 0, root) / checkpoint_name(step), tensors, {"r": 1})
            raw[(task, step)] = torch.cat([tensors["a"].reshape(-1), tensors["b"].reshape(-1)]).double()
    return raw


@pytest.mark.parametrize("mode", ["centered", "train_tasks", "per_checkpoint"])
def test_collect_params_statistics_are_the_written_formulas(tmp_path, mode):
    """Rows in task, seed, step order; per-tensor statistics over the training tasks' values (the
    held-out triangle's never), population standard deviations; per_checkpoint: each row's own."""
    cfg = micro_params(**{"cvae.normalization": mode})
    raw = _hand_made(tmp_path / "lora", cfg)
    data = collect_params(cfg, 1, tmp_path / "lora", tmp_path / "out")
    m = read_lora_matrix(1, tmp_path / "out")
    order = [(t, s) for t in cfg.data.tasks for s in (2, 4, 6)]
    assert m.task_index.tolist() == [cfg.data.tasks.index(t) for t, _ in order] and m.step.tolist() == [s for _, s in order]
    assert m.seed.tolist() == [0] * 9 and m.rows.dtype == torch.float32
    assert data["names"] == ["a", "b"] and data["shapes"] == [[1, 2], [3, 1]] and data["offsets"] == [0, 2]
    assert data["dim"] == 5 and data["rows"] == 9 and data["holdout"] == ["triangle"] and data["adapter_config"] == {"r": 1}
    rows = torch.stack([raw[k] for k in order])
    train = rows[:6]  # circle and square
    spans = [slice(0, 2), slice(2, 5)]
    if mode == "per_checkpoint":
        assert data["normalization"] == {"mode": "per_checkpoint",
                                         "note": "row_mean/row_std in the tensor file; leaks the target's statistics"}
        for i, row in enumerate(rows):
            mean = torch.stack([row[s].mean() for s in spans])
            std = torch.stack([row[s].std(unbiased=False) for s in spans])
            assert torch.allclose(m.row_mean[i].double(), mean, atol=1e-5) and torch.allclose(m.row_std[i].double(), std, atol=1e-5)
            expected = torch.cat([(row[s] - mean[j]) / std[j] for j, s in enumerate(spans)])
            assert torch.allclose(m.rows[i].double(), expected, atol=1e-5)
        return
    center = train.mean(0) if mode == "centered" else torch.zeros(5, dtype=torch.float64)
    assert (m.manifest.center is None) == (mode == "train_tasks")
    if mode == "centered":
        assert torch.allclose(m.manifest.center.double(), center, atol=1e-6)
    shifted = train - center
    mean = torch.stack([shifted[:, s].mean() for s in spans])
    std = torch.stack([shifted[:, s].std(unbiased=False) for s in spans])
    norm = data["normalization"]
    assert norm["mode"] == mode
    assert torch.allclose(torch.tensor(norm["mean"], dtype=torch.float64), mean, atol=1e-5)
    assert torch.allclose(torch.tensor(norm["std"], dtype=torch.float64), std, rtol=1e-5)
    expected = torch.cat([(rows[:, s] - center[s] - mean[j]) / std[j] for j, s in enumerate(spans)], dim=1)
    assert torch.allclose(m.rows.double(), expected, atol=1e-5)


def test_collect_params_names_every_bad_checkpoint_against_the_first(tmp_path):
    from icmlora.artifacts import checkpoint_name
    from icmlora.artifacts.adapters import write_adapter

    cfg = micro_params()
    _hand_made(tmp_path / "lora", cfg)
    first = checkpoints_dir("circle", 1, 0, tmp_path / "lora") / checkpoint_name(2)
    second = checkpoints_dir("circle", 1, 0, tmp_path / "lora") / checkpoint_name(4)
    last = checkpoints_dir("triangle", 1, 0, tmp_path / "lora") / checkpoint_name(6)
    write_adapter(second, {"a": torch.zeros(1, 3), "b": torch.zeros(3, 1)}, {"r": 1})
    write_adapter(last, {"a": torch.zeros(1, 2), "b": torch.zeros(3, 1)}, {"r": 2})
    with pytest.raises(InputError) as err:
        collect_params(cfg, 1, tmp_path / "lora", tmp_path / "out")
    assert str(err.value).splitlines() == [
        "collect_params r1: inconsistent checkpoints (2 problems):",
        f"  - {second}: tensor names or shapes differ from {first} (another target set?)",
        f"  - {last}: adapter rank 2 is not 1",
    ]
    assert not (tmp_path / "out").exists()


def test_collect_params_main_writes_the_rank_and_says_what(tmp_path, capsys):
    import yaml
    from params_helpers import params_dict

    from icmlora.stages.collect_params import main

    cfg = micro_params()
    _hand_made(tmp_path / "models" / "lora", cfg)  # the data contract's place, under the working directory
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict()))
    data = main(["--params", str(tmp_path / "params.yaml"), "--rank", "1"])
    assert data["rows"] == 9 and read_lora_matrix(1, tmp_path / "data" / "lora_matrix").rows.shape == (9, 5)
    assert capsys.readouterr().out.splitlines()[-1] == (
        "collect_params: wrote data/lora_matrix/r1.safetensors (9 checkpoints x 5 values, centered normalization) "
        "and its manifest r1.json")
    with pytest.raises(SystemExit):
        main(["--params", str(tmp_path / "params.yaml")])  # --rank is required
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert shown.startswith("usage: icmlora collect_params [-h] [--params PARAMS] --rank RANK")
    assert "Stage `collect_params`: every LoRA checkpoint of one rank" in shown and "  LoRA rank, from lora.ranks\n" in shown
    with pytest.raises(InputError, match=r"^--rank 3 is not in lora.ranks \(1, 2\)"):
        main(["--params", str(tmp_path / "params.yaml"), "--rank", "3"])
