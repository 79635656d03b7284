"""Atomic writes (``icmlora.files``): every output of every stage is written through them, so a
write either replaces the target whole or leaves it as it was, with no temporary file behind."""

import os
from pathlib import Path

import pytest

from icmlora import files
from icmlora.errors import InputError
from icmlora.files import atomic_dir, atomic_path, read_json, write_json, write_text


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def test_a_write_replaces_the_file_and_leaves_nothing_else(tmp_path, umask_022):
    """write_text / write_json replace the target's content; the file gets the mode a plain open()
    gives (0644 under umask 022, not mkstemp's private 0600); only the target is in the folder."""
    target = tmp_path / "out" / "metrics.json"  # a missing parent folder is created
    assert write_text(target, "old\n") == target
    write_json(target, {"map50": 0.5, "tasks": ["dog", "cat"]})
    assert target.read_text() == '{\n  "map50": 0.5,\n  "tasks": [\n    "dog",\n    "cat"\n  ]\n}\n'
    assert read_json(target) == {"map50": 0.5, "tasks": ["dog", "cat"]}
    assert target.stat().st_mode & 0o777 == 0o644
    assert _listing(target.parent) == ["metrics.json"]


def test_a_failure_inside_the_atomic_context_keeps_the_old_file(tmp_path):
    """An exception while the temporary file is half written: the target keeps its old content
    and the temporary file is removed."""
    target = tmp_path / "model.bin"
    target.write_bytes(b"old weights")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old weights"
    assert _listing(tmp_path) == ["model.bin"]


def test_a_serializer_that_fails_midway_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that fails after writing part of the text (a full disk): the old content stays,
    no temporary file is left."""
    target = tmp_path / "params.yaml"
    target.write_text("seed: 1\n")
    real_write = Path.write_text

    def write_half(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half)
    with pytest.raises(OSError, match="No space left"):
        write_text(target, "seed: 2\nlong: " + "x" * 100 + "\n")
    monkeypatch.undo()
    assert target.read_text() == "seed: 1\n"
    assert _listing(tmp_path) == ["params.yaml"]


def test_a_failing_rename_keeps_the_old_file(tmp_path, monkeypatch):
    """The rename that publishes the file fails: the target is untouched, the complete temporary
    file is removed all the same."""
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(PermissionError):
        write_json(target, {"v": 2})
    monkeypatch.undo()
    assert read_json(target) == {"v": 1}
    assert _listing(tmp_path) == ["a.json"]


def test_an_unserializable_object_writes_nothing(tmp_path):
    """A value json cannot write fails before the target is touched."""
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(target, {"v": object()})
    assert read_json(target) == {"v": 1}
    assert _listing(tmp_path) == ["a.json"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """atomic_dir: success replaces the folder (no file of the old one survives); a failure in
    the body, or in the swap itself, leaves the old folder as it was, and no temporary or
    set-aside folder stays beside it."""
    target = tmp_path / "plots"
    target.mkdir()
    (target / "old.png").write_bytes(b"old")
    with atomic_dir(target) as tmp:
        (tmp / "new.png").write_bytes(b"new")
    assert _listing(target) == ["new.png"] and (target / "new.png").read_bytes() == b"new"
    assert _listing(tmp_path) == ["plots"]

    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.png").write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert _listing(target) == ["new.png"] and _listing(tmp_path) == ["plots"]

    real_replace = os.replace
    calls = []

    def second_fails(src, dst):  # the old folder is moved aside, then putting the new one in fails
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError(18, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", second_fails)
    with pytest.raises(OSError, match="cross-device"):
        with atomic_dir(target) as tmp:
            (tmp / "newer.png").write_bytes(b"newer")
    monkeypatch.undo()
    assert len(calls) == 3  # aside, (failed) in, back
    assert _listing(target) == ["new.png"] and (target / "new.png").read_bytes() == b"new"
    assert _listing(tmp_path) == ["plots"]


def test_read_json_names_the_file_and_line(tmp_path):
    """A missing or malformed file is an InputError naming the file (and the line of the error)."""
    with pytest.raises(InputError, match=r"missing\.json: file not found"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{\n  "a": 1,\n}\n')
    with pytest.raises(InputError, match=r"bad\.json:3: invalid JSON"):
        read_json(tmp_path / "bad.json")
