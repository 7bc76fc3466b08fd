"""The benchmark command stays runnable: quick sizes, JSON as the last line of output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.bench.figures import TARGETS
from tests.test_cli import run_bot


def test_quick_bench_prints_every_figure_as_json(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"  # an earlier quick run far faster than any can be
    history.write_text(json.dumps({"quick": True, "core_msgs_per_s": 1e9, "core_p99_ms": 1e-9}))
    result = run_bot(["bench", "--quick", "--history", str(history)], tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    guards = figures["regression_guards"]
    assert guards["core_msgs_per_s"]["held"] is False and guards["core_p99_ms"]["held"] is False
    assert json.loads(history.read_text().splitlines()[-1])["core_msgs_per_s"] > 0
    for name in TARGETS:
        assert isinstance(figures[name], int | float), name
    assert figures["restart_path"] == "disk"  # the restart used the saved state
    assert figures["peak_rss_mb"] > 0 and set(figures["targets_met"]) == set(TARGETS)


def test_the_peer_bench_prints_its_table_for_one_four_and_eight(tmp_path: Path) -> None:
    from tests.llama_server import binary

    server = binary()
    if server is None:
        pytest.fail("no llama-server binary: make test builds it")
    args = ["bench", "--backend", "llama-server", "--quick"]
    result = run_bot(args, tmp_path, timeout=900, LOCALBOT_LLAMA_SERVER=str(server))
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for n in (1, 4, 8):
        for side in ("local", "server", "local_over_server"):
            for figure in ("ttft_median_s", "ttft_worst_s", "tokens_per_s"):
                assert figures[f"{side}_x{n}_{figure}"] > 0, (side, n, figure)
    assert figures["local_over_server_streamed_tokens_per_s"] > 0
    for side in ("local", "server"):  # what each side evaluated: the fairness check
        assert figures[f"{side}_prompt_tokens_evaluated"] > 0, side
    for n in (1, 4, 8):
        assert 0 < figures[f"local_x{n}_step_outside_decode_share"] < 1


def test_the_documents_bench_prints_its_figures(tmp_path: Path) -> None:
    result = run_bot(["bench", "--documents", "--quick"], tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["ingest_chunks"] > 0 and figures["ingest_chunks_per_s"] > 0
    assert 0 < figures["search_p50_ms"] <= figures["search_p99_ms"]
    assert figures["search_recall_at_10k"] >= 0.9
    assert figures["ttft_with_documents_s"] > 0 and figures["ttft_without_documents_s"] > 0


def test_the_grammar_bench_counts_the_tokens_generated(tmp_path: Path) -> None:
    result = run_bot(["bench", "--grammar", "--quick"], tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    written = figures["tokens_written"]
    # Four replies a round, two rounds: every side wrote (a call is at least ten tokens, and
    # counted as generated: held to the grammar, it is written in more tokens than its text
    # tokenizes into), and none ran past its 96-token budget after the first token.
    assert all(8 * 10 < n <= 8 * 95 for n in written.values()), written
    assert figures["grammar_over_free_tokens_per_s"] > 0
    assert 0 < figures["grammar_rejected_share"] < 1
