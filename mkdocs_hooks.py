"""MkDocs hook (mkdocs.yml ``hooks:``): the command reference page is written from the commands' own
``--help`` at build time, so it cannot drift from the code."""

from __future__ import annotations

import contextlib
import io

PLACEHOLDER = "<!-- the commands' --help, written by mkdocs_hooks.py -->"


def _help(argv: list[str]) -> str:
    from icmlora.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv)
    return out.getvalue().rstrip()


def on_files(files, config):
    """The PNG plots under metrics/ (committed outputs), served at the same paths, so a page shows
    them (``![...](metrics/family/heldout.png)``) without a copy in docs/."""
    from pathlib import Path

    from mkdocs.structure.files import File

    root = Path(config["config_file_path"]).parent
    for png in sorted((root / "metrics").rglob("*.png")):
        files.append(File(png.relative_to(root).as_posix(), str(root), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if PLACEHOLDER not in markdown:
        return markdown
    from icmlora.cli import COMMANDS

    parts = [f"## `icmlora`\n\n```text\n{_help(['--help'])}\n```"]
    for name in COMMANDS:
        parts.append(f"## `icmlora {name}`\n\n{COMMANDS[name]}.\n\n```text\n{_help([name, '--help'])}\n```")
        if name == "tracking":  # its subcommands' own help
            parts += [f"```text\n{_help([name, sub, '--help'])}\n```" for sub in ("sync", "status")]
    return markdown.replace(PLACEHOLDER, "\n\n".join(parts))
