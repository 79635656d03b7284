"""`icmlora profile NAME|FILE`: merge a params profile into params.yaml.

    python -m icmlora profile micro      # the smallest sizes: tests, smoke runs
    python -m icmlora profile real       # Florence-2-base-ft on PASCAL VOC, GPUs

A profile is a partial params.yaml (profiles/<name>.yaml); its keys replace those in
params.yaml, everything else stays. The result is validated before it is written. For a
one-off change, `dvc exp run -S key=value` does the same without touching params.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from icmlora.config import config_from_dict, read_yaml
from icmlora.errors import InputError
from icmlora.files import write_text

PROFILES_DIR = Path("profiles")


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_profile(params: Path, profile: Path) -> dict:
    if not profile.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) or "none"
        raise InputError(f"{profile}: profile not found (profiles in {PROFILES_DIR}/: {known})")
    merged = deep_merge(read_yaml(params.read_text()) or {}, read_yaml(profile.read_text()) or {})
    config_from_dict(merged, f"{params} + {profile}")
    write_text(params, yaml.safe_dump(merged, sort_keys=False, default_flow_style=None))
    return merged


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="icmlora profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="a name in profiles/ (micro, real) or a YAML file")
    parser.add_argument("--params", default="params.yaml", help="parameters file to update (default: params.yaml)")
    args = parser.parse_args(argv)
    path = Path(args.profile)
    if not path.suffix:
        path = PROFILES_DIR / f"{args.profile}.yaml"
    merged = apply_profile(Path(args.params), path)
    print(f"profile: merged {path} into {args.params} ({len(merged)} top-level sections)")
    return merged
