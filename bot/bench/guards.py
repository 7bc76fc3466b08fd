"""Regression guards of the full bench: figures held against the median of earlier runs.

Some figures have no fixed target worth stating (the core's throughput depends on the machine
far more than on the code), but must not fall between runs on one machine.  With ``--history
FILE`` the bench reads earlier runs from that file (one JSON object a line, as the bench
prints), compares this run with the median of the last few, and appends this run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

# figure -> (direction of better, the largest allowed change against the earlier median)
GUARDS = {
    "core_msgs_per_s": ("higher", 0.20),  # no more than 20 % below
    "core_p99_ms": ("lower", 0.25),  # the same change, as a latency: 1 / 0.8
}
# How many earlier runs the median takes: enough to outvote one noisy run.
EARLIER_RUNS = 3


def earlier_runs(path: Path, quick: bool = False) -> list[dict[str, Any]]:
    """The runs recorded in ``path`` of the same sizes (full or ``quick``), oldest first;
    lines that are not a run are skipped."""
    if not path.exists():
        return []
    runs = []
    # A damaged byte spoils its line only (skipped below as not JSON), not the whole file.
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            run = json.loads(line)
        except ValueError:
            continue
        if isinstance(run, dict) and bool(run.get("quick")) == quick:
            runs.append(run)
    return runs


def check(results: dict[str, Any], earlier: list[dict[str, Any]]) -> dict[str, Any]:
    """For each guarded figure: the earlier median, the allowed bound, and whether this run
    holds it (``None`` where no earlier run measured the figure)."""
    verdicts: dict[str, Any] = {}
    for name, (better, change) in GUARDS.items():
        values = [run[name] for run in earlier if isinstance(run.get(name), int | float)]
        values = values[-EARLIER_RUNS:]
        if not values:
            verdicts[name] = {"earlier_median": None, "bound": None, "held": None}
            continue
        median = statistics.median(values)
        bound = median * (1 - change) if better == "higher" else median * (1 + change)
        held = results[name] >= bound if better == "higher" else results[name] <= bound
        verdicts[name] = {
            "earlier_median": round(median, 2),
            "earlier_runs": len(values),
            "bound": round(bound, 2),
            "held": held,
        }
    return verdicts


def record(results: dict[str, Any], path: Path) -> None:
    """Append this run to the history file, on a line of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A file written by hand may lack its last newline: this run must not join that line.
    ends_open = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with path.open("a", encoding="utf-8") as out:
        out.write(("\n" if ends_open else "") + json.dumps(results, sort_keys=True) + "\n")
