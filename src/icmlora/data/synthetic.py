"""A deterministic synthetic detection dataset: bright shapes on a dark, noisy background.

Measured on a 2-core CPU (shared/reference/tiny-florence-notes.md): high contrast is what
lets a tiny Florence-2 learn localization in minutes; random colours leave it near
mAP50 0.02-0.47. Each image holds several objects of *different* categories, so every
task's images also hold distractors: a task adapter that boxes the wrong shape pays in
precision instead of being rewarded for relabelling whatever it sees.

With ``category_colours`` (the default) each category also has its own hue (hues evenly
spaced around the colour wheel, jittered), as real categories differ in appearance beyond
outline: the tiny vision tower does not learn to tell outlines apart within the CPU budget (a
base trained to name the shapes in an image reached 19% exact match after 1,200 steps), so
with random colours no adapter can select its category among distractors. Off, colours are
random and only the outline tells categories apart.

A hue alone is not enough either: a base pre-trained class-agnostically (every box "object")
has no reason to keep colour, and its features lose it after the first stage (silhouette of
box-pooled features by category: 0.30 after the patch embedding, -0.10 after it). Its task
adapters then box one object per image about as often right as chance (precision 0.48-0.68).
So by default (``base_labels: hue``) the base's pre-training split names each object by its
hue (``HUE_NAMES``), as a real pre-trained detector already sees what sets categories apart;
the task names stay unknown to it (its strict mAP on every task is 0), and a task adapter must
learn which objects are its category, box only those, and name them.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from icmlora.config import SyntheticParams
from icmlora.data.family import SHAPES, cell_name, hue_bands
from icmlora.florence.format import Box


def _star(x: float, y: float, s: float, points: int = 5) -> list[tuple[float, float]]:
    cx, cy, outer, inner = x + s / 2, y + s / 2, s / 2, s / 5
    pts = []
    for i in range(2 * points):
        r = outer if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / points
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, s: float, colour: tuple[int, int, int]) -> None:
    # PIL's shape corners are inclusive pixel indices, so the right/bottom edge is x + s - 1.
    x2, y2 = x + s - 1, y + s - 1
    t = max(2, round(s / 5))  # stroke width for ring and cross
    if shape == "circle":
        draw.ellipse([x, y, x2, y2], fill=colour)
    elif shape == "square":
        draw.rectangle([x, y, x2, y2], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x + (s - 1) / 2, y), (x2, y2), (x, y2)], fill=colour)
    elif shape == "cross":
        c = x + s / 2
        draw.rectangle([c - t, y, c + t - 1, y2], fill=colour)
        c = y + s / 2
        draw.rectangle([x, c - t, x2, c + t - 1], fill=colour)
    elif shape == "ring":
        draw.ellipse([x, y, x2, y2], outline=colour, width=t)
    elif shape == "star":
        draw.polygon(_star(x, y, s - 1), fill=colour)
    elif shape == "diamond":
        draw.polygon([(x + (s - 1) / 2, y), (x2, y + (s - 1) / 2), (x + (s - 1) / 2, y2), (x, y + (s - 1) / 2)], fill=colour)
    elif shape == "hexagon":
        cx, cy, r = x + (s - 1) / 2, y + (s - 1) / 2, (s - 1) / 2
        draw.polygon([(cx + r * math.cos(math.pi / 3 * i), cy + r * math.sin(math.pi / 3 * i)) for i in range(6)], fill=colour)
    else:  # guarded by SHAPES, kept for a clear message if that list and this drift apart
        raise ValueError(f"unknown shape {shape!r}")


def _place(rng: np.random.Generator, cfg: SyntheticParams, count: int) -> list[tuple[int, int, int]]:
    """Non-overlapping (x, y, size) squares; fewer than ``count`` if the image is full."""
    lo, hi = cfg.object_size
    n = cfg.image_size
    placed: list[tuple[int, int, int]] = []
    cell = n // cfg.grid_cells
    for _ in range(count * 20):
        if len(placed) == count:
            break
        if cfg.grid:
            s = int(rng.integers(min(lo, cell), min(hi, cell) + 1))
            cx, cy = rng.integers(0, cfg.grid_cells, size=2)
            x, y = int(cx * cell + (cell - s) // 2), int(cy * cell + (cell - s) // 2)
        else:
            s = int(rng.integers(lo, hi + 1))
            x, y = (int(v) for v in rng.integers(0, n - s + 1, size=2))
        gap = 2  # keep shapes visibly apart so each box is one object
        if all(x + s + gap <= px or px + ps + gap <= x or y + s + gap <= py or py + ps + gap <= y for px, py, ps in placed):
            placed.append((x, y, s))
    return placed


def _colour(rng: np.random.Generator, cfg: SyntheticParams, index: int, count: int, floor: int = 150) -> tuple[int, int, int]:
    """The colour of an object of category ``index`` out of ``count``: hues evenly spaced (named
    by ``icmlora.data.family.hue_name(index, count)``), every channel in ``floor``..255."""
    if not cfg.category_colours:
        return tuple(int(v) for v in rng.integers(150, 256, size=3))
    hue = (index / count + rng.uniform(-1 / 40, 1 / 40)) % 1.0
    # Every channel stays in 150..255 as with random colours (the contrast the tiny model needs
    # to learn localization in minutes; darker saturated hues dropped base mAP50 from 0.92 to
    # 0.12): the hue's pure colour mapped onto that range. A family's ten hues need more
    # saturation to be named apart (``family.colour_floor``).
    rgb = colorsys.hsv_to_rgb(hue, 1.0, 1.0)
    return tuple(int(floor + round(v * (255 - floor) * rng.uniform(0.85, 1.0))) for v in rgb)


def generate_split(cfg: SyntheticParams, categories: list[str], count: int, seed: int) -> list[tuple[Image.Image, list[Box]]]:
    """``count`` images, each with objects of distinct categories drawn from ``categories``."""
    unknown = [c for c in categories if c not in SHAPES]
    if unknown:
        raise ValueError(f"unknown synthetic categories {unknown}; available: {', '.join(SHAPES)}")
    rng = np.random.default_rng(seed)
    n = cfg.image_size
    out = []
    for _ in range(count):
        lo, hi = cfg.objects_per_image
        want = int(rng.integers(lo, min(hi, len(categories)) + 1)) if lo <= len(categories) else len(categories)
        background = rng.integers(0, 91, size=3)
        image = Image.new("RGB", (n, n), tuple(int(v) for v in background))
        draw = ImageDraw.Draw(image)
        boxes = []
        labels = rng.choice(len(categories), size=want, replace=False)
        for (x, y, s), label in zip(_place(rng, cfg, want), labels):
            colour = _colour(rng, cfg, int(label), len(categories))
            _draw(draw, categories[label], x, y, s, colour)
            boxes.append(Box(categories[label], float(x), float(y), float(x + s), float(y + s)))
        if cfg.noise_sigma > 0 and rng.random() < cfg.noise_fraction:
            pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, cfg.noise_sigma, size=(n, n, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        out.append((image, boxes))
    return out



def generate_family_split(cfg: SyntheticParams, count: int, seed: int,
                          categories: list[str] | None = None) -> list[tuple[Image.Image, list[Box]]]:
    """``count`` images of the task family (``icmlora.data.family``): objects in distinct cells of
    a square grid of ``len(family.rows)`` rows (sides from ``object_size``, kept inside the cell, 2
    pixels apart), each of a hue band, its box labelled with its cell, ``<hue>-<row>``; prepare keeps
    a task's cell and writes the family's label word.

    With ``categories`` (``task_kind: category_row``) the bands are those categories instead: each
    drawn as its own shape in its own hue (as ``generate_split`` draws categories), its box
    labelled ``<category>-<row>``; prepare writes the category's word.

    An object after the first is, with probability ``family.confusers``, a near miss of an object
    already drawn: its hue in another row, or another hue in its row (equally often), the two
    distractors a (hue, row) task must leave out; otherwise its hue and cell are drawn freely."""
    family = cfg.family
    names = hue_bands(family.hues) if categories is None else list(categories)
    bands, rows = len(names), list(family.rows)
    rng = np.random.default_rng(seed)
    n, grid = cfg.image_size, len(rows)
    cell = n // grid
    lo, hi = min(cfg.object_size[0], cell - 2), min(cfg.object_size[1], cell - 2)
    out = []
    for _ in range(count):
        free = [(r, c) for r in range(grid) for c in range(grid)]
        objects: list[tuple[int, int, int]] = []  # (hue band, row, column)
        for _ in range(int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))):
            hue, choices = int(rng.integers(bands)), free
            if objects and rng.random() < family.confusers:
                like_hue, like_row, _ = objects[int(rng.integers(len(objects)))]
                if rng.random() < 0.5 or bands == 1:  # the same hue in another row (the only near miss of one band)
                    hue, choices = like_hue, [rc for rc in free if rc[0] != like_row]
                else:  # another hue in the same row
                    hue = (like_hue + 1 + int(rng.integers(bands - 1))) % bands
                    choices = [rc for rc in free if rc[0] == like_row]
            if not choices:
                continue
            r, c = choices[int(rng.integers(len(choices)))]
            free.remove((r, c))
            objects.append((hue, r, c))
        background = rng.integers(0, 91, size=3)
        image = Image.new("RGB", (n, n), tuple(int(v) for v in background))
        draw = ImageDraw.Draw(image)
        boxes = []
        for hue, r, c in objects:
            s = int(rng.integers(lo, hi + 1))
            # Anywhere in the cell with a pixel of margin: neighbours stay 2 pixels apart.
            x, y = (int(k * cell + 1 + rng.integers(0, cell - s - 1)) for k in (c, r))
            if categories is None:
                shape = family.shapes[int(rng.integers(len(family.shapes)))]
                colour = _colour(rng, cfg, hue, bands, family.colour_floor)
            else:  # a category: its own outline and hue, with the categories' colour floor
                shape, colour = names[hue], _colour(rng, cfg, hue, bands)
            _draw(draw, shape, x, y, s, colour)
            boxes.append(Box(cell_name(names[hue], rows[r]), float(x), float(y), float(x + s), float(y + s)))
        if cfg.noise_sigma > 0 and rng.random() < cfg.noise_fraction:
            pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, cfg.noise_sigma, size=(n, n, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        out.append((image, boxes))
    return out
