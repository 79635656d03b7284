"""Benchmark (not a test): the mutation score of the modules that decide figures, per module.

    .venv/bin/python bench/mutation.py                 # what `make mutation` runs
    .venv/bin/python bench/mutation.py --label before  # the same, kept under another name
    .venv/bin/python bench/mutation.py --only src/icmlora/generators/ridge.py --label ridge
                                                       # a fresh copy, only these modules' mutants tested

Runs mutmut (pinned in constraints.txt) as pyproject.toml's [tool.mutmut] says: it copies the
project into mutants/ (git-ignored), writes every mutant of the modules in ``only_mutate`` into
the copy, and for each mutant runs the fast tests (`make test-fast`'s set) that reach the mutated
function; a mutant is killed when one of them fails. The copy is made afresh each run (a result
never comes from an earlier run's cache). Writes metrics/mutation.json under --label (other labels
kept): per module the mutants killed, survived, timed out and not reached by any fast test, the
score (killed + timeout) / total, and the surviving mutants' names (``mutmut show <name>`` in this
folder prints one's diff while mutants/ is there); docs/mutation-survivors.md says why each survives.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from icmlora.files import write_json  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: mutmut's own dependency reads TOML there
    import toml as tomllib

# mutmut's exit-code table (mutmut.stats.status_by_exit_code), for the statuses a score needs.
KILLED, TIMEOUT = "killed", "timeout"
STATUS_BY_EXIT_CODE = {1: KILLED, 3: KILLED, 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
                       36: TIMEOUT, -24: TIMEOUT, 24: TIMEOUT, 152: TIMEOUT, 255: TIMEOUT, None: "not checked"}


def modules() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]


def run_mutmut(max_children: int, mutant_names: list[str] | None = None) -> float:
    """One `mutmut run` in a fresh mutants/, or (``mutant_names``) in the last run's mutants/ on just
    these mutants; returns its wall time in seconds."""
    if mutant_names is None or all("*" in name for name in mutant_names):  # a fresh copy
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    # mutmut puts mutants/src first on the test process's path; a test's subprocess (`python -m
    # icmlora...`) imports this checkout's unmutated src/ (not whichever one the venv's editable
    # install names): mutated code outside mutmut's process cannot report to it.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    # One thread per test process: mutmut's limits are CPU seconds, which torch's thread pool
    # would spend several at a time, and `--max-children` processes already share the cores.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    begin = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children),
                           *(mutant_names or [])], cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"`mutmut run` failed (exit {proc.returncode}); its output is above")
    return time.perf_counter() - begin


def mutant_glob(module: str) -> str:
    """mutmut's name pattern of a module's mutants: src/icmlora/generators/ridge.py -> icmlora.generators.ridge.x*
    (functions x_name, methods xǁClassǁname; a package's __init__.py: the package's own name)"""
    dotted = Path(module).with_suffix("").relative_to("src").as_posix().replace("/", ".")
    return f"{dotted.removesuffix('.__init__')}.x*"


def exit_codes(module: str) -> dict:
    return json.loads((ROOT / "mutants" / f"{module}.meta").read_text())["exit_code_by_key"]


def module_scores(module: str) -> dict:
    exit_codes_ = exit_codes(module)
    statuses = {name: STATUS_BY_EXIT_CODE.get(code, "suspicious") for name, code in exit_codes_.items()}
    counts = Counter(statuses.values())
    total = len(statuses)
    return {
        "total": total,
        "killed": counts[KILLED],
        "timeout": counts[TIMEOUT],
        "survived": counts["survived"],
        "no_tests": counts["no tests"],
        "other": total - counts[KILLED] - counts[TIMEOUT] - counts["survived"] - counts["no tests"],
        "score": round((counts[KILLED] + counts[TIMEOUT]) / total, 4) if total else None,
        "not_killed": sorted(name for name, status in statuses.items() if status not in (KILLED, TIMEOUT)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="the name this run is kept under in the output")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--output", type=Path, default=ROOT / "metrics" / "mutation.json")
    parser.add_argument("--retest", nargs="*", metavar="MODULE",
                        help="keep the last run's mutants/ and test again only its mutants that no test killed (of "
                             "these modules; none named: all), against today's tests: tests are only ever added, "
                             "so a mutant killed stays killed")
    parser.add_argument("--only", nargs="+", metavar="MODULE",
                        help="test only these modules' mutants (of only_mutate), in a fresh copy; scores for these alone")
    args = parser.parse_args(argv)
    if args.only and args.retest is not None:
        parser.error("--only and --retest do not go together")
    unknown = sorted(set(args.only or []) - set(modules()))
    if unknown:
        parser.error(f"--only {unknown}: not in pyproject.toml's [tool.mutmut] only_mutate ({modules()})")

    retest = [mutant_glob(module) for module in args.only] if args.only else None
    if args.retest is not None:
        retest = [name for module in (args.retest or modules()) for name, code in exit_codes(module).items()
                  if STATUS_BY_EXIT_CODE.get(code) != KILLED]
        print(f"testing again {len(retest)} mutants no test killed")
    wall_s = run_mutmut(args.max_children, retest)
    scores = {module: module_scores(module) for module in (args.only or args.retest or modules())}
    out = json.loads(args.output.read_text()) if args.output.exists() else {}
    out[args.label] = {
        "command": ("make mutation" if retest is None else f"bench/mutation.py --only {' '.join(args.only)}" if args.only
                    else f"bench/mutation.py --retest {' '.join(args.retest)}".strip()),
        "wall_s": round(wall_s, 1),
        "max_children": args.max_children,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "score_is": "(killed + timeout) / total",
        "modules": scores,
    }
    write_json(args.output, out)

    print(f"\nmutation score ({args.label}, {wall_s:.0f} s):")
    print(f"{'module':40} {'total':>6} {'killed':>6} {'timeout':>7} {'survived':>8} {'no tests':>8} {'score':>6}")
    for module, s in scores.items():
        print(f"{module:40} {s['total']:6} {s['killed']:6} {s['timeout']:7} {s['survived']:8} {s['no_tests']:8} "
              f"{s['score']:6.1%}")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
