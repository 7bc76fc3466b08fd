"""The benchmark command stays runnable: quick sizes, JSON as the last line of output."""

from __future__ import annotations

import json
from pathlib import Path

from bot.bench.figures import TARGETS
from tests.test_cli import run_bot


def test_quick_bench_prints_every_figure_as_json(tmp_path: Path) -> None:
    result = run_bot(["bench", "--quick"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for name in TARGETS:
        assert isinstance(figures[name], int | float), name
    assert figures["restart_path"] == "disk"  # the restart used the saved state
    assert figures["peak_rss_mb"] > 0 and set(figures["targets_met"]) == set(TARGETS)
