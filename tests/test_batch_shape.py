"""The shape of each batched step on the real embedded model: which sequences a generation
takes and the order of the rows handed to ``llama_decode``.

Each sequence is a KV stream of its own; llama.cpp takes a batch's streams as one range when
the rows come in ascending order, and decodes every stream between the lowest and the highest.
Four generations on sequences 7, 6, 5, 4 (in that order) or on 0, 2, 4, 6 cost what eight do
(``python -m bot bench --backend llama-server`` shows it as aggregate tokens/s).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ai_model.config import SamplingSettings
from tests.test_batching import load, prompt, reply

GREEDY = SamplingSettings(max_tokens=24, temperature=0.0, repeat_penalty=1.0, seed=1)
TOPICS = ["the sea", "a mill", "the moon", "a fox", "the rain", "a city", "the snow", "a bell"]


def record_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The sequence of every row of every batch decoded from now on."""
    import llama_cpp

    batches: list[list[int]] = []
    decode = llama_cpp.llama_decode

    def spy(ctx: Any, batch: Any) -> int:
        batches.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return int(decode(ctx, batch))

    monkeypatch.setattr(llama_cpp, "llama_decode", spy)
    return batches


async def occupy(model: Any, keys: list[str]) -> None:
    for key in keys:
        await reply(
            model, prompt(model, f"{key}: tell me about {TOPICS[int(key[1])]}."), key, GREEDY
        )


@pytest.mark.parametrize(
    ("touch", "label"),
    [
        # Least recently used last to first: new generations would take 7, 6, 5, 4.
        (["c7", "c6", "c5", "c4", "c3", "c2", "c1", "c0"], "descending"),
        # Every other one least recently used: new generations would take 0, 2, 4, 6.
        (["c0", "c2", "c4", "c6", "c1", "c3", "c5", "c7"], "spread"),
    ],
)
async def test_generations_together_take_neighbouring_sequences_in_ascending_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, touch: list[str], label: str
) -> None:
    model = await load(tmp_path, parallel=8, state_dir="")
    try:
        await occupy(model, [f"c{i}" for i in range(8)])  # every sequence holds a conversation
        await occupy(model, touch)
        batches = record_batches(monkeypatch)
        questions = [f"Eve: describe {topic} in many words." for topic in TOPICS[:4]]
        await asyncio.gather(
            *(reply(model, prompt(model, q), f"new-{i}", GREEDY) for i, q in enumerate(questions))
        )
    finally:
        model.close()
    assert batches
    for rows in batches:
        assert rows == sorted(rows), f"{label}: rows out of sequence order: {rows}"
    together = [sorted(set(rows)) for rows in batches if len(set(rows)) == 4]
    assert together, "the four generations never shared a step"
    for seqs in together:
        assert seqs[-1] - seqs[0] == 3, f"{label}: four generations spread over {seqs}"
