"""Parameters for tests: the repository's params.yaml with a profile merged in, plus changes.

params.yaml is the one source of every value (the config models declare no defaults), so tests
start from it. Imported as ``from params_helpers import ...`` (tests/ is on sys.path).
"""

from __future__ import annotations

from pathlib import Path

from icmlora.config import Params, params_from_dict, read_yaml
from icmlora.profile import deep_merge

REPO = Path(__file__).resolve().parents[1]


def params_dict(profile: str | None = "micro") -> dict:
    """The repository's params.yaml as plain values, with a profile merged in."""
    data = read_yaml((REPO / "params.yaml").read_text())
    if profile:
        deep_merge(data, read_yaml((REPO / "profiles" / f"{profile}.yaml").read_text()))
    return data


def micro_params(**changes) -> Params:
    """params.yaml + the micro profile, with dotted-key changes: micro_params(**{"lora.dropout": 0.1})."""
    return with_changes(params_dict(), changes)


def default_params(**changes) -> Params:
    """params.yaml as committed, with dotted-key changes."""
    return with_changes(params_dict(profile=None), changes)


# The synthetic source's other task kind, as the default was before category_row: a task is a
# category (a shape with its own hue) named by its own word; images hold distinct categories.
CATEGORY_KIND = {"data.synthetic.task_kind": "category", "data.tasks": ["circle", "square", "triangle", "cross", "ring", "star"],
                 "heldout_tasks": ["star"], "data.synthetic.objects_per_image": [1, 3], "data.synthetic.object_size": [14, 30]}


def category_params(**changes) -> Params:
    """params.yaml with ``task_kind: category`` tasks (CATEGORY_KIND), then dotted-key changes."""
    return default_params(**{**CATEGORY_KIND, **changes})


def with_changes(data: dict, changes: dict) -> Params:
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    return params_from_dict(data)
