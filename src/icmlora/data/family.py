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

The embedded default's tasks (``task_kind: category_row``) are the same grid with categories in
place of hue bands: a task is a (category, row) pair, ``circle-top``, that boxes the category's
objects in that row and writes the category's own word, ``circle``. Each category is a shape
with its own hue, as in ``task_kind: category``. A held-out task is again a new combination
only: its category (so its label word) and its row each occur in some training task
(``category_row_problems``).
"""

from __future__ import annotations

# The colour wheel in 30-degree steps: the base model's pre-training names objects by these.
HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "magenta", "pink")
# The outlines the synthetic source draws (``icmlora.data.synthetic``): the categories a task may name.
SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon")


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


def _new_values(pairs: dict[str, tuple[str, str]], heldout: list[str], first: str) -> list[str]:
    """A held-out task whose first attribute (``first``: hue, category) or row no training task has."""
    training = [pair for t, pair in pairs.items() if t not in heldout]
    seen = ({a for a, _ in training}, {r for _, r in training})
    return [f"heldout_tasks: {task!r} has {name} {value!r}, which no training task has: a held-out task may only "
            "combine values that training tasks use"
            for task in heldout for name, value, known in zip((first, "row"), pairs[task], seen) if value not in known]


def problems(tasks: list[str], heldout: list[str], hues: int, rows: list[str]) -> list[str]:
    """What makes ``tasks`` / ``heldout`` not a family split: a name that is no cell, or a held-out
    task whose hue or row no training task has (it would be a new value, not a new combination)."""
    out = [f"data.tasks: {t!r} is not a family task (<hue>-<row> with hue one of {', '.join(hue_bands(hues))} and "
           f"row one of {', '.join(rows)})" for t in tasks if split_cell(t, hues, rows) is None]
    return out or _new_values({t: split_cell(t, hues, rows) for t in tasks}, heldout, "hue")


def split_category_row(task: str, rows: list[str]) -> tuple[str, str] | None:
    """(category, row) of a ``category_row`` task's name (``circle-top``), or None if it names none."""
    category, dash, row = task.rpartition("-")
    return (category, row) if dash and category and row in rows else None


def row_categories(tasks: list[str], rows: list[str]) -> list[str]:
    """The categories of ``category_row`` tasks, in order of first appearance (each its own hue)."""
    found = [split_category_row(t, rows) for t in tasks]
    return list(dict.fromkeys(pair[0] for pair in found if pair is not None))


def category_row_problems(tasks: list[str], heldout: list[str], rows: list[str], shapes: tuple[str, ...]) -> list[str]:
    """What makes ``tasks`` / ``heldout`` not a ``category_row`` split: a name that is no
    <category>-<row> pair of a shape the synthetic source draws, or a held-out task whose category
    (its label word) or row no training task has."""
    out = [f"data.tasks: {t!r} is not a category_row task (<category>-<row> with category one of "
           f"{', '.join(shapes)} and row one of {', '.join(rows)})" for t in tasks
           if (split_category_row(t, rows) or ("", ""))[0] not in shapes]
    return out or _new_values({t: split_category_row(t, rows) for t in tasks}, heldout, "category")
