"""A token's logits do not depend on how a step groups the tokens around it (raw llama.cpp, the
embedded model, the engine's own context parameters).

The scheduler gives a prompt to llama.cpp in chunks beside other conversations' one-token steps,
and llama.cpp splits a step into equal shares per sequence.  So one prompt's last tokens may be
multiplied one at a time in one run and three at a time in another.  Stock llama.cpp multiplies
the f16 KV cache by tinyBLAS for two or more tokens of a sequence and by a plain dot product for
one; the two sum in different orders (AVX2 and AVX-512 alike), the logits move by 0.3 to 0.8,
and a batched reply stops being the reply alone.  ``scripts/patches/llama.cpp/`` routes one
token through tinyBLAS too; each seed below fails on a stock wheel of either build.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from ai_model.batched import _load
from ai_model.config import ModelSettings
from ai_model.embedded import embedded_model_path

SETTINGS = ModelSettings(n_ctx=1024, parallel=4)


def decode(model: Any, ctx: Any, rows: list[tuple[int, int, int, bool]]) -> dict[int, Any]:
    """Decode ``(token, position, sequence, wants_logits)`` rows as one batch: logits by seq."""
    import llama_cpp
    from llama_cpp import _internals

    batch = _internals.LlamaBatch(n_tokens=len(rows), embd=0, n_seq_max=1, verbose=False)
    raw = batch.batch
    for i, (token, pos, seq, logits) in enumerate(rows):
        raw.token[i], raw.pos[i], raw.n_seq_id[i] = token, pos, 1
        raw.seq_id[i][0], raw.logits[i] = seq, logits
    raw.n_tokens = len(rows)
    assert llama_cpp.llama_decode(ctx.ctx, raw) == 0
    n_vocab = model.n_vocab()
    return {
        seq: np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(ctx.ctx, i), shape=(n_vocab,)
        ).copy()
        for i, (_, _, seq, logits) in enumerate(rows)
        if logits
    }


@pytest.mark.parametrize("seed", [2, 6, 10])  # each fails on stock llama.cpp, AVX2 or AVX-512
def test_a_prompts_logits_are_the_same_alone_and_split_beside_one_token_steps(seed: int) -> None:
    rng = random.Random(seed)
    prompts = [[rng.randrange(200, 20000) for _ in range(rng.randrange(20, 60))] for _ in range(4)]
    last = prompts[3]
    cut = len(last) - rng.randrange(2, 5)

    model, ctx = _load(SETTINGS, embedded_model_path())
    try:  # the whole prompt in one step, alone
        alone = decode(model, ctx, [(t, i, 3, i == len(last) - 1) for i, t in enumerate(last)])[3]
    finally:
        ctx.close()
        model.close()

    model, ctx = _load(SETTINGS, embedded_model_path())
    try:
        for seq in range(3):
            decode(model, ctx, [(t, i, seq, False) for i, t in enumerate(prompts[seq])])
        # The prompt in two chunks, each beside one generated token of the three others: the
        # second step is split into shares of one token per sequence.
        for step, (start, end) in enumerate(((0, cut), (cut, len(last)))):
            others = [(300 + seq, len(prompts[seq]) + step, seq, True) for seq in range(3)]
            mine = [(last[i], i, 3, i == len(last) - 1) for i in range(start, end)]
            grouped = decode(model, ctx, others + mine)
    finally:
        ctx.close()
        model.close()

    difference = float(np.abs(alone - grouped[3]).max())
    assert difference == 0.0, f"logits moved by up to {difference}"
