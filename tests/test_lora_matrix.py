"""The LoRA weight matrix's normalization, row bookkeeping and files on hand-made manifests with
hand-computed values (tests/test_lora_params.py drives the same code through collect_params)."""

from __future__ import annotations

import json

import pytest
import torch

from icmlora.artifacts.lora_matrix import (
    MANIFEST_KEYS, LoraMatrix, Manifest, read_lora_matrix, read_manifest, unflatten, write_lora_matrix,
)
from icmlora.errors import InputError

# Two tensors: "a" [2] and "b" [1, 3], so D = 5; per-tensor statistics mean (1, -1), std (2, 4).
NAMES, SHAPES = ["a", "b"], [[2], [1, 3]]
RAW = torch.tensor([3.0, 5.0, 3.0, 7.0, -5.0])


def manifest_data(mode: str) -> dict:
    return {"rank": 1, "dim": 5, "rows": 2, "tasks": ["circle", "square"], "holdout": ["square"], "names": NAMES,
            "shapes": SHAPES, "offsets": [0, 2], "adapter_config": {"r": 1},
            "normalization": {"mode": mode, "mean": [1.0, -1.0], "std": [2.0, 4.0]}}


def test_train_tasks_normalization_is_a_per_tensor_z_score():
    manifest = Manifest(manifest_data("train_tasks"))
    assert (manifest.names, manifest.shapes, manifest.dim, manifest.mode) == (NAMES, SHAPES, 5, "train_tasks")
    normalized = manifest.normalize(RAW)
    assert torch.equal(normalized, torch.tensor([1.0, 2.0, 1.0, 2.0, -1.0]))  # (3-1)/2, (5-1)/2, (3+1)/4, ...
    assert torch.equal(manifest.denormalize(normalized), RAW)
    tensors = manifest.to_tensors(normalized.double())
    assert list(tensors) == NAMES and tensors["a"].dtype == torch.float32
    assert torch.equal(tensors["a"], torch.tensor([3.0, 5.0])) and torch.equal(tensors["b"], torch.tensor([[3.0, 7.0, -5.0]]))


def test_centered_normalization_subtracts_the_center_first():
    center = torch.tensor([1.0, -1.0, 1.0, -3.0, 3.0])
    manifest = Manifest(manifest_data("centered"), center)
    assert torch.equal(manifest.normalize(RAW), torch.tensor([0.5, 2.5, 0.75, 2.75, -1.75]))
    assert torch.equal(manifest.denormalize(torch.tensor([0.5, 2.5, 0.75, 2.75, -1.75])), RAW)
    with pytest.raises(ValueError, match=r"^centered normalization needs the matrix file's center \(read_manifest reads it\)$"):
        Manifest(manifest_data("centered")).normalize(RAW)


def test_per_checkpoint_normalization_takes_the_rows_own_statistics():
    manifest = Manifest(manifest_data("per_checkpoint"))
    stats = (torch.tensor([3.0, 3.0]), torch.tensor([1.0, 2.0]))
    assert torch.equal(manifest.normalize(RAW, stats), torch.tensor([0.0, 2.0, 0.0, 2.0, -4.0]))
    assert torch.equal(manifest.denormalize(torch.tensor([0.0, 2.0, 0.0, 2.0, -4.0]), stats), RAW)
    with pytest.raises(ValueError, match=r"^per_checkpoint normalization needs the statistics of a checkpoint \(row_stats\)$"):
        manifest.normalize(RAW)


def test_unflatten_refuses_a_vector_of_another_length():
    assert torch.equal(unflatten(RAW, NAMES, SHAPES)["b"], torch.tensor([[3.0, 7.0, -5.0]]))
    with pytest.raises(ValueError, match="^vector has 4 values, the manifest describes 5$"):
        unflatten(RAW[:4], NAMES, SHAPES)


def per_checkpoint_matrix() -> LoraMatrix:
    rows = torch.tensor([[0.0, 2.0, 0.0, 2.0, -4.0], [1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    return LoraMatrix(rows, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), torch.tensor([2, 4, 2]),
                      Manifest(manifest_data("per_checkpoint")),
                      row_mean=torch.tensor([[3.0, 3.0], [1.0, 5.0], [7.0, 7.0]]),
                      row_std=torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 1.0]]))


def test_rows_come_back_with_their_own_statistics_and_a_task_averages_its_own():
    matrix = per_checkpoint_matrix()
    assert matrix.tasks == ["circle", "square"]
    assert torch.equal(matrix.raw(0), RAW)
    assert torch.equal(matrix.raw(1), torch.tensor([4.0, 4.0, 9.0, 9.0, 9.0]))  # 1 * 3 + 1, 1 * 4 + 5
    mean, std = matrix.task_stats("circle")  # rows 0 and 1
    assert torch.equal(mean, torch.tensor([2.0, 4.0])) and torch.equal(std, torch.tensor([2.0, 3.0]))
    mean, std = matrix.task_stats("square")
    assert torch.equal(mean, torch.tensor([7.0, 7.0])) and torch.equal(std, torch.tensor([1.0, 1.0]))

    shared = LoraMatrix(matrix.rows, matrix.task_index, matrix.seed, matrix.step, Manifest(manifest_data("train_tasks")))
    assert shared.row_stats(0) is None and shared.task_stats("circle") is None
    assert torch.equal(shared.raw(1), torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0]))  # 1 * 2 + 1, 1 * 4 - 1


def test_the_matrix_files_round_trip(tmp_path):
    matrix = per_checkpoint_matrix()
    tensor_file, manifest_file = write_lora_matrix(2, matrix, tmp_path / "m" / "new")  # folders made as needed
    assert (tensor_file, manifest_file) == (tmp_path / "m" / "new" / "r2.safetensors", tmp_path / "m" / "new" / "r2.json")
    assert json.loads(manifest_file.read_text()) == matrix.manifest.data
    back = read_lora_matrix(2, tmp_path / "m" / "new")
    for name in ("rows", "task_index", "seed", "step", "row_mean", "row_std"):
        assert torch.equal(getattr(back, name), getattr(matrix, name)), name
    assert back.manifest.data == matrix.manifest.data and back.manifest.center is None

    center = torch.tensor([1.0, -1.0, 1.0, -3.0, 3.0])
    centered = LoraMatrix(matrix.rows, matrix.task_index, matrix.seed, matrix.step,
                          Manifest(manifest_data("centered"), center))
    write_lora_matrix(1, centered, tmp_path / "c")
    back = read_lora_matrix(1, tmp_path / "c")
    assert torch.equal(back.manifest.center, center) and back.row_mean is None and back.row_std is None
    assert torch.equal(read_manifest(1, tmp_path / "c").center, center)


def test_missing_or_damaged_matrix_files_are_named_with_the_stage_to_rerun(tmp_path):
    with pytest.raises(InputError, match=r"r3.safetensors: not found \(run `dvc repro collect_params@3`\)"):
        read_lora_matrix(3, tmp_path)
    with pytest.raises(InputError, match=r"r3.json: not found \(run `dvc repro collect_params@3`\)"):
        read_manifest(3, tmp_path)
    (tmp_path / "r3.json").write_text(json.dumps({k: 0 for k in MANIFEST_KEYS if k not in ("names", "shapes")}))
    with pytest.raises(InputError, match=r"r3.json: not a LoRA matrix manifest \(missing names, shapes\); re-run collect_params$"):
        read_manifest(3, tmp_path)

    # A centered manifest whose tensor file has a center of the wrong length.
    matrix = per_checkpoint_matrix()
    write_lora_matrix(1, LoraMatrix(matrix.rows, matrix.task_index, matrix.seed, matrix.step,
                                    Manifest(manifest_data("centered"), torch.zeros(4))), tmp_path)
    with pytest.raises(InputError, match=r"r1.safetensors: 'center' has shape \[4\], the manifest says \[5\]$"):
        read_manifest(1, tmp_path)
    (tmp_path / "r1.safetensors").unlink()
    with pytest.raises(InputError, match=r"r1.safetensors: cannot read the 'center' tensor the manifest .*r1.json needs "
                                         r"\(.*\); re-run collect_params$"):
        read_manifest(1, tmp_path)


def test_a_row_becomes_a_peft_folder_with_its_readme(tmp_path):
    from icmlora.artifacts.adapters import read_adapter

    manifest = Manifest(manifest_data("per_checkpoint"))
    folder = manifest.write_adapter(tmp_path / "sample-z0", torch.tensor([0.0, 2.0, 0.0, 2.0, -4.0]),
                                    (torch.tensor([3.0, 3.0]), torch.tensor([1.0, 2.0])), readme="generated for circle")
    tensors, config = read_adapter(folder)
    assert torch.equal(tensors["a"], torch.tensor([3.0, 5.0])) and torch.equal(tensors["b"], torch.tensor([[3.0, 7.0, -5.0]]))
    assert config == {"r": 1} and (folder / "README.md").read_text() == "generated for circle"


def test_the_streamed_file_has_a_compact_header_padded_to_8_bytes(tmp_path, monkeypatch):
    """safetensors' layout: an 8-byte little-endian length, a compact JSON header of sorted names padded
    with spaces so the data starts 8-aligned, then the tensors' bytes in that order."""
    from icmlora.artifacts.lora_matrix import save_streamed

    tensors = {"b": torch.arange(3, dtype=torch.int64), "a": torch.tensor([1.5, -2.0])}
    save_streamed(tensors, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8:8 + length]
    assert (8 + length) % 8 == 0 and len(header) - len(header.rstrip(b" ")) < 8
    assert header.rstrip(b" ") == (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                   b'"b":{"dtype":"I64","shape":[3],"data_offsets":[8,32]}}')
    assert data[8 + length:] == tensors["a"].numpy().tobytes() + tensors["b"].numpy().tobytes()
    monkeypatch.setattr("sys.byteorder", "big")
    with pytest.raises(RuntimeError, match="^safetensors stores little-endian values; this writer does not byte-swap$"):
        save_streamed(tensors, tmp_path / "big.safetensors")
