"""Greedy replies on the batched path, which picks among the few highest logits, are the replies
of the serial path, whose llama.cpp chain runs over the whole vocabulary (ai_model/sampling.py:
narrows)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ai_model.config import ModelSettings, SamplingSettings
from ai_model.embedded import embedded_model_path
from ai_model.local import LocalModel
from ai_model.sampling import GrammarCheck, narrows
from tests.test_batching import STORIES, load, prompt, reply


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.8])
async def test_greedy_replies_are_the_serial_paths(tmp_path: Path, penalty: float) -> None:
    sampling = SamplingSettings(max_tokens=48, temperature=0.0, repeat_penalty=penalty)
    model = await load(tmp_path, parallel=2)
    serial = await asyncio.to_thread(
        LocalModel.load, ModelSettings(n_ctx=1024, parallel=1), embedded_model_path(), "s"
    )
    try:
        prompts = [prompt(model, *turns) for turns in STORIES]
        batched = [await reply(model, p, f"c{i}", sampling) for i, p in enumerate(prompts)]
        alone = [await reply(serial, p, f"c{i}", sampling) for i, p in enumerate(prompts)]
    finally:
        model.close()
        serial.close()
    assert batched == alone and all(r.strip() for r in batched)


def test_a_pick_is_narrowed_only_while_the_penalty_lowers_logits() -> None:
    def narrow(**changes: float) -> int:
        check = GrammarCheck(None, 1000, None, SamplingSettings(**changes))  # type: ignore[arg-type]
        try:
            return check.narrow
        finally:
            check.close()

    assert narrows(SamplingSettings(temperature=0.0, repeat_penalty=1.0))
    assert narrow(temperature=0.0, repeat_penalty=1.0) == 1  # the highest logit alone
    assert narrow(temperature=0.0, repeat_penalty=1.1, repeat_last_n=64) == 65
    assert narrow(temperature=0.7, top_k=40, repeat_penalty=1.1, repeat_last_n=64) == 104
    # Below 1 the penalty raises the logits of recent tokens, from wherever they ranked; without
    # top-k a draw may take any token.
    assert not narrows(SamplingSettings(temperature=0.0, repeat_penalty=0.9))
    assert narrow(temperature=0.0, repeat_penalty=0.9) == 1000
    assert not narrows(SamplingSettings(temperature=0.7, top_k=0))
    assert narrow(temperature=0.7, top_k=0, repeat_penalty=1.1) == 1000
