"""What the README and the documentation pages show a user still exists: every `make` target, every
`icmlora` command with the options it is shown with, every bench script's options, and every file path
they name; and the README stays a five-minute page (at most 300 lines).
(Commands that train or download are not run here; the pipeline's own tests run them.)"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from icmlora.cli import COMMANDS
from icmlora.cli import main as cli

from params_helpers import REPO

# The README and every page of the documentation site (mkdocs.yml: docs/)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _text() -> str:
    return "\n".join(p.read_text() for p in DOCS)


def _commands(text: str) -> list[str]:
    """Shell lines of fenced bash blocks (backslash continuations joined, comments dropped) and
    inline `code` spans, each as one command line."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return lines


def _options(line: str, program: str) -> list[str]:
    """The --options given after ``program`` on ``line``."""
    rest = line.split(program, 1)[1]
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)))


def test_the_readme_commands_are_found():
    """The parser below finds what the README shows (so the checks after it check something)."""
    commands = _commands(_text())
    assert "make repro" in commands and "make test" in commands
    assert any(c.startswith(".venv/bin/icmlora generate --examples") for c in commands)
    assert any(c.startswith(".venv/bin/icmlora score --annotations") and "--adapter" in c for c in commands)


def test_every_make_target_shown_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.M))
    shown = {m for c in _commands(_text()) for m in re.findall(r"(?:^|&& |; )make ([a-z][a-z0-9-]*)", c)}
    assert {"repro", "test", "test-fast", "test-long", "family", "scale"} <= shown
    assert shown <= targets, f"README shows make targets the Makefile lacks: {sorted(shown - targets)}"


def test_every_icmlora_command_shown_exists_with_its_options(capsys):
    shown: dict[str, set[str]] = {}
    for line in _commands(_text()):
        for match in re.finditer(r"\bicmlora ([a-z_-]+)", line):
            name = match.group(1)
            if name in ("stages",):  # `icmlora.stages.<stage>`: a module path, not a command
                continue
            shown.setdefault(name, set()).update(_options(line[match.start():], f"icmlora {name}"))
    assert {"generate", "score", "profile"} <= set(shown)
    unknown = sorted(set(shown) - set(COMMANDS))
    assert not unknown, f"README shows icmlora commands that do not exist: {unknown}"
    for name, options in shown.items():
        with pytest.raises(SystemExit) as done:
            cli([name, "--help"])
        assert done.value.code == 0
        usage = capsys.readouterr().out
        missing = [o for o in options if o not in usage]
        assert not missing, f"`icmlora {name}` has no option {missing} (README shows it)"


def test_every_bench_script_shown_exists_with_its_options():
    shown: dict[str, set[str]] = {}
    for line in _commands(_text()):
        for match in re.finditer(r"\bbench/([a-z_]+\.(?:py|sh))", line):
            shown.setdefault(match.group(1), set()).update(_options(line[match.start():], match.group(0)))
    assert "family.py" in shown and "gpu_check.sh" in shown
    for script, options in shown.items():
        path = REPO / "bench" / script
        assert path.is_file(), f"README names bench/{script}, which does not exist"
        if script.endswith(".py") and options:
            usage = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                                   timeout=120).stdout
            missing = [o for o in options if o not in usage]
            assert not missing, f"bench/{script} has no option {missing} (README shows it)"


def test_every_repository_path_shown_exists():
    """Paths into the repository's own folders (placeholders and globs aside) are there: tracked
    files and folders, or outputs a committed dvc.lock or metrics file holds."""
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split())
    folders = {str(p) for f in tracked for p in __import__("pathlib").PurePosixPath(f).parents}
    lock = (REPO / "dvc.lock").read_text()
    shown = set()
    for span in re.findall(r"`([^`\n]+)`", _text()) + re.findall(r"\]\(([^)#\s]+)", _text()):
        for path in re.findall(r"(?<![\w./-])((?:src|tests|bench|profiles|docs|metrics|\.ci)/[\w./-]*\w)", span):
            if not re.search(r"[<>*{}]", path):
                shown.add(path.rstrip("/"))
    assert "bench/family.py" in shown and "metrics/family/heldout.png" in shown
    missing = sorted(p for p in shown if p not in tracked and p not in folders and f"path: {p}" not in lock)
    assert not missing, f"README or docs name paths that are not in the repository: {missing}"


def test_the_readme_is_a_five_minute_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move detail to a page under docs/"
    for page in ("docs/pipeline.md", "docs/new-tasks.md", "docs/reproducibility.md", "docs/team.md"):
        assert f"]({page}" in "\n".join(lines), f"README does not link {page}"
