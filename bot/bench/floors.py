"""Compute floors of the bench's first-token ratios, from the loaded model's own shape.

A first token costs the evaluation of the turn's new prompt tokens: every weight applied to
each of them, and attention from each to every cell before it.  On a CPU that is compute bound,
so the ratio of two first tokens cannot fall below the ratio of their FLOPs, whatever the
engine does.  The bench prints each measured ratio over its floor.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ai_model.batched import ModelDimensions
from ai_model.parking import state_buffer


def prefill_flops(d: ModelDimensions, cached: int, new: int) -> float:
    """FLOPs to evaluate ``new`` prompt tokens after ``cached`` evaluated ones, and the logits
    of the last.  The embedding lookup is no matmul; an untied output matrix is counted per
    token (an overestimate of at most its share of the weights)."""
    per_token = 2 * max(d.params - d.vocab * d.embd, 0)
    per_cell = 4 * d.layers * d.heads * (d.embd // max(d.heads, 1))  # Q·K and A·V
    cells = new * cached + new * (new + 1) / 2
    return new * per_token + per_cell * cells + 2 * d.vocab * d.embd


def admission_of(model: Any, key: str) -> tuple[int, int]:
    """(cached, computed) prompt tokens of ``key``'s latest admission on the scheduler."""
    for admission in reversed(list(model.scheduler.admissions)):
        if admission.key == key:
            return int(admission.reused), int(admission.computed)
    raise LookupError(f"no admission of {key}")


def ratio_floor(
    d: ModelDimensions, measured: Sequence[tuple[int, int]], base: tuple[int, int]
) -> float:
    """The FLOPs of the ``measured`` admissions together over those of ``base``."""
    return sum(prefill_flops(d, c, n) for c, n in measured) / prefill_flops(d, *base)


def read_seconds(folder: Path) -> float:
    """Seconds to read the largest state file in ``folder`` into a state buffer, as a
    restore does (the file stands in the page cache, as the restored one does)."""
    files = sorted(folder.glob("*.state"), key=lambda p: p.stat().st_size)
    if not files:
        return 0.0
    path = files[-1]
    started = time.perf_counter()
    with open(path, "rb") as src:
        data = state_buffer(path.stat().st_size)
        src.readinto(data)
    return time.perf_counter() - started
