"""Tolerances of tests that compare two computations of one thing (two thread counts, two processes,
cached features against pixels, a resumed run against an uninterrupted one): each measured value is
checked against its bound through ``within``, which also appends it to the JSON-lines file named by
``ICMLORA_SPREAD_LOG`` when that is set.

``bench/kernel_spread.py`` runs these tests under several CPU dispatch settings (ATen's capability,
MKL's and oneDNN's code paths, thread counts) with that variable set, and writes every measured value
per setting to metrics/kernel_spread.json: a bound in the tests comes from that spread, measured under
several kernel paths (docs/reproducibility.md lists them), not from the one CPU a test was written on.
Imported as ``from spread import within`` (tests/ is on sys.path).
"""

from __future__ import annotations

import json
import os


def within(name: str, measured: float, tolerance: float) -> bool:
    """``measured <= tolerance``, with the measurement recorded under ``name`` (see the module)."""
    log = os.environ.get("ICMLORA_SPREAD_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"name": name, "measured": float(measured), "tolerance": tolerance}) + "\n")
    return measured <= tolerance
