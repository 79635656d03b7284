"""`icmlora profile NAME|FILE`: merge a params profile into params.yaml (a command, not a stage).

    icmlora profile micro      # the smallest sizes: tests, smoke runs
    icmlora profile real       # Florence-2-base-ft on PASCAL VOC, GPUs

A profile is a partial params.yaml (profiles/<name>.yaml); its keys replace those in
params.yaml, everything else stays, comments included (a round trip through ruamel.yaml, the
YAML library DVC itself writes params.yaml with). The result is validated before it is written.
For a one-off change, `dvc exp run -S key=value` does the same without touching params.yaml.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from icmlora.config import PARAMS_FILE, params_from_dict, read_yaml
from icmlora.errors import InputError
from icmlora.files import write_text

PROFILES_DIR = Path("profiles")


def _round_trip():
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, key order, quotes and flow style survive
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold a long value (a regex) onto two lines
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def deep_merge(base, override) -> None:
    """Merge mapping ``override`` into mapping ``base`` in place (nested mappings key by key)."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value


def apply_profile(params: Path, profile: Path) -> dict:
    """Merge ``profile`` into the ``params`` file; returns the merged values (plain Python)."""
    if not profile.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) or "none"
        raise InputError(f"{profile}: profile not found (profiles in {PROFILES_DIR}/: {known})")
    yaml = _round_trip()
    read_yaml(params.read_text(encoding="utf-8"), params)  # a syntax error names the file and line
    read_yaml(profile.read_text(encoding="utf-8"), profile)
    document = yaml.load(params.read_text(encoding="utf-8"))
    deep_merge(document, yaml.load(profile.read_text(encoding="utf-8")) or {})
    out = io.StringIO()
    yaml.dump(document, out)
    merged = read_yaml(out.getvalue(), f"{params} + {profile}")
    params_from_dict(merged, f"{params} + {profile}")
    write_text(params, out.getvalue())
    return merged


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="icmlora profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="a name in profiles/ (micro, real) or a YAML file")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help=f"parameters file to update (default: {PARAMS_FILE})")
    args = parser.parse_args(argv)
    path = Path(args.profile)
    if not path.suffix:
        path = PROFILES_DIR / f"{args.profile}.yaml"
    merged = apply_profile(Path(args.params), path)
    print(f"profile: merged {path} into {args.params} ({len(merged)} top-level sections)")
    return merged
