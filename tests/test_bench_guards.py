"""The bench's regression guards: the core's speed against the median of earlier runs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from bot.bench.guards import check, earlier_runs, record


def _history(path: Path, *runs: Mapping[str, object]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in runs) + "not a run\n[1, 2]\n")


def test_a_run_holds_the_guard_within_a_fifth_of_the_earlier_median(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    # The oldest run is outside the last three: its 10 does not pull the median down.
    _history(
        path,
        *[{"quick": False, "core_msgs_per_s": v, "core_p99_ms": 10.0} for v in (10, 300, 320, 280)],
    )
    earlier = earlier_runs(path)
    assert len(earlier) == 4  # the lines that are not runs are skipped
    held = check({"core_msgs_per_s": 241.0, "core_p99_ms": 12.4}, earlier)
    assert held["core_msgs_per_s"] == {
        "earlier_median": 300,
        "earlier_runs": 3,
        "bound": 240.0,
        "held": True,
    }
    assert held["core_p99_ms"]["held"] is True
    fallen = check({"core_msgs_per_s": 239.0, "core_p99_ms": 12.6}, earlier)
    assert fallen["core_msgs_per_s"]["held"] is False
    assert fallen["core_p99_ms"]["held"] is False


def test_quick_and_full_runs_are_not_compared_and_a_first_run_has_no_verdict(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.jsonl"
    assert check({"core_msgs_per_s": 1.0, "core_p99_ms": 1.0}, earlier_runs(path)) == {
        name: {"earlier_median": None, "bound": None, "held": None}
        for name in ("core_msgs_per_s", "core_p99_ms")
    }
    record({"quick": True, "core_msgs_per_s": 900.0, "core_p99_ms": 1.0}, path)
    assert earlier_runs(path) == []
    assert [r["core_msgs_per_s"] for r in earlier_runs(path, quick=True)] == [900.0]


def test_a_run_is_recorded_on_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps({"quick": False, "core_msgs_per_s": 300.0}))  # no newline
    record({"quick": False, "core_msgs_per_s": 310.0}, path)
    assert [r["core_msgs_per_s"] for r in earlier_runs(path)] == [300.0, 310.0]


def test_an_unreadable_history_stops_the_bench_before_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.bench import figures

    async def never(quick: bool, gpu_layers: int) -> dict[str, object]:
        raise AssertionError("the bench ran")

    monkeypatch.setattr(figures, "run", never)
    assert figures.main(history=tmp_path) == 2  # a folder, not a file
    assert "cannot read the bench history" in capsys.readouterr().err


def test_a_damaged_line_is_skipped_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    good = json.dumps({"quick": False, "core_msgs_per_s": 300.0}).encode()
    path.write_bytes(b'{"quick": false, "core_msgs_per_s": \xff}\n' + good + b"\n")
    assert [r["core_msgs_per_s"] for r in earlier_runs(path)] == [300.0]
