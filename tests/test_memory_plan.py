"""The memory plan of ``python -m bot check`` and the start-up warning, from real GGUF metadata."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ai_model.config import ModelSettings
from ai_model.memory_plan import GB, plan_model, read_shape, verdicts
from ai_model.registry import ModelRegistry
from bot.app import warn_of_memory
from tests.test_cli import run_bot
from tests.vendored import models_dir


def test_an_8b_llama_with_four_8191_token_sequences_needs_4_gb_of_f16_kv() -> None:
    # The vocabulary-only Llama 3 GGUF carries the 8B's shape: 32 layers, 8 KV heads of 128.
    vocab = models_dir() / "ggml-vocab-llama-bpe.gguf"
    shape = read_shape(vocab)
    assert shape.kv_bytes_per_token("f16") == 32 * 8 * (128 + 128) * 2  # 128 KiB a token
    plan = plan_model("office role", ModelSettings(parallel=4, n_ctx=8191), vocab, shape)
    assert plan.kv / GB == pytest.approx(4.0, abs=0.01)
    smaller = plan_model("office role", ModelSettings(kv_cache_type="q8_0"), vocab, shape)
    assert smaller.kv / plan.kv == pytest.approx(34 / 64)


def test_the_embedded_models_kv_matches_what_llama_cpp_allocates() -> None:
    # llama.cpp itself logs "size = 720.00 MiB (32768 cells, 30 layers)" for this model; the
    # plan counts 4 × 8191 cells of 30 layers × 3 KV heads × (64 + 64) f16 values.
    registry = ModelRegistry({"office": ModelSettings(), "character": ModelSettings()})
    [plan] = registry.memory_plans()  # one model serves both roles: counted once
    assert plan.roles == "office+character role"
    assert plan.kv_per_token == 30 * 3 * 128 * 2
    assert plan.kv == pytest.approx(720 * 2**20 * 32764 / 32768, rel=1e-6)
    assert plan.park == 1024 * 2**20 and plan.shared == 256 * 2**20
    fits, line = verdicts([plan], 8 * GB)[0]
    assert fits and "fits" in line
    fits, line = verdicts([plan], 1 * GB)[0]
    assert not fits and "1.04 GB more than the 1.00 GB of RAM available" in line
    assert "lower [models.*] parallel" in line and 'kv_cache_type = "q8_0"' in line


def test_check_says_by_how_much_a_plan_does_not_fit(tmp_path: Path) -> None:
    config = tmp_path / "bot.toml"
    config.write_text("[models.office]\nparallel = 256\nn_ctx = 32768\n")
    result = run_bot(["--config", str(config), "check"], tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "KV cache 256 × 32768 tokens × 22.5 KB (f16) = 180.00 GB" in result.stdout
    assert "GB more than the" in result.stdout and "lower [models.*] parallel" in result.stdout


async def test_start_up_warns_in_one_line_when_the_models_will_not_fit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = ModelRegistry({"office": ModelSettings(parallel=256, n_ctx=32768)})
    with caplog.at_level(logging.WARNING):
        await warn_of_memory(registry)
    lines = [r.getMessage() for r in caplog.records if "memory" in r.getMessage()]
    assert len(lines) == 1 and "python -m bot check" in lines[0]
