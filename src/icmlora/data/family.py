"""A task family: tasks defined by attributes, so that a task never trained is a new combination
of attribute values that training tasks use (``data.synthetic.task_kind: family``).

Every object of a family image has a hue band (``family.hues`` bands evenly spaced around the
colour wheel, named as the base model names hues) and sits in one row of a square grid
(``family.rows``, top to bottom). A task is one (hue band, row) pair, named ``<hue>-<row>``
(``red-top``): its targets are the objects of that hue *in* that row, every one written with the
family's one label word (``family.label``). Other objects of the image are its distractors, and
an image often holds an object of the same hue in another row or of another hue in the same row
(``family.confusers``), so an adapter that selects by one attribute alone pays in precision.

Why rows and not sizes: the tiny base's decoder state where it names an object carries the
object's hue and its vertical place (it describes objects top to bottom) but hardly its size
(linear probes on those states, README "Tasks the generator has not seen"), and LoRAs trained
to pick one size class of three picked between small and medium at chance.

A held-out task must be a new combination only: its hue band and its row each occur in some
training task (``problems`` says which do not), and its label word is the family's, which every
training task writes.
"""

from __future__ import annotations

# The colour wheel in 30-degree steps: the base model's pre-training names objects by these.
HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "magenta", "pink")


def hue_name(index: int, count: int) -> str:
    """The name of hue ``index`` out of ``count`` evenly spaced hues (distinct for up to 12)."""
    return HUE_NAMES[round(len(HUE_NAMES) * index / count) % len(HUE_NAMES)]


def hue_bands(hues: int) -> list[str]:
    """The family's hue bands by name, band i centred on hue i / hues of the wheel."""
    return [hue_name(i, hues) for i in range(hues)]


def cell_name(hue: str, row: str) -> str:
    return f"{hue}-{row}"


def cells(hues: int, rows: list[str]) -> list[str]:
    """Every task of the family, hue-major: red-top, red-middle, ..., pink-bottom."""
    return [cell_name(h, s) for h in hue_bands(hues) for s in rows]


def split_cell(task: str, hues: int, rows: list[str]) -> tuple[str, str] | None:
    """(hue, row) of a family task's name, or None if it names no cell of this family."""
    for hue in hue_bands(hues):
        for row in rows:
            if task == cell_name(hue, row):
                return hue, row
    return None


def problems(tasks: list[str], heldout: list[str], hues: int, rows: list[str]) -> list[str]:
    """What makes ``tasks`` / ``heldout`` not a family split: a name that is no cell, or a held-out
    task whose hue or row no training task has (it would be a new value, not a new combination)."""
    out = [f"data.tasks: {t!r} is not a family task (<hue>-<row> with hue one of {', '.join(hue_bands(hues))} and "
           f"row one of {', '.join(rows)})" for t in tasks if split_cell(t, hues, rows) is None]
    if out:
        return out
    training = [split_cell(t, hues, rows) for t in tasks if t not in heldout]
    seen_hues, seen_rows = {h for h, _ in training}, {s for _, s in training}
    for task in heldout:
        hue, row = split_cell(task, hues, rows)
        if hue not in seen_hues:
            out.append(f"heldout_tasks: {task!r} has hue {hue!r}, which no training task has: a held-out task may only "
                       "combine values that training tasks use")
        if row not in seen_rows:
            out.append(f"heldout_tasks: {task!r} has row {row!r}, which no training task has: a held-out task may only "
                       "combine values that training tasks use")
    return out
