"""``python -m bot bench --grammar``: generation held to the tool-call grammar against free
generation, on the embedded model, in one run.

Four generations at once on the batched path, alternately with and without the grammar (held
from the first token), the same prompts and seeds; tokens/s is the tokens written after each
reply's first over the time from the first token to the last.  Also the lazy grammar that
never triggers (a reply in words) against none, and the share of the chain's picks the grammar
turned down.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from ai_model.batched import BatchedModel
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.embedded import embedded_model_path
from ai_model.sampling import Grammar
from ai_model.templates import encode
from bot.bench.common import log
from chat.tools.builtin import Toolbox
from chat.tools.grammar import OPEN, call_grammar

SYSTEM = f"You can use tools. To use one, answer with {OPEN}{{...}}</tool_call>."
ASKED = ["What's 17% of 2,340?", "Remind me at 3 pm to call Bob.", "Time in Tokyo?", "Sum 4+5"]


async def _round(model: BatchedModel, grammar: Grammar | None, seed: int) -> tuple[int, float]:
    """Tokens written after each reply's first, and the time from the first reply's first
    token to the last reply's last: the generation itself, not the prompts before it (calls
    are shorter than replies in words, and would carry more of the prompt's time)."""
    sampling = SamplingSettings(max_tokens=96, temperature=0.8, seed=seed)

    async def one(question: str) -> tuple[str, float, float]:
        pieces = [*model.template.turn("system", SYSTEM), *model.template.turn("user", question)]
        prompt = [*model.bos, *encode((*pieces, *model.template.generation_prompt()), model)]
        text, first, last = "", 0.0, 0.0
        async for piece in model.stream(prompt, sampling, grammar=grammar):
            last = time.perf_counter()
            first = first or last
            text += piece
        return text, first, last

    done = await asyncio.gather(*(one(q) for q in ASKED))
    tokens = sum(max(len(model.tokenize(t.encode(), False)) - 1, 0) for t, _f, _l in done)
    return tokens, max(last for _t, _f, last in done) - min(first for _t, first, _l in done)


async def measure(rounds: int) -> dict[str, Any]:
    settings = ModelSettings(parallel=4, state_dir="")
    model = await asyncio.to_thread(BatchedModel.load, settings, embedded_model_path(), "bench")
    tools = Toolbox(None, None, None, None).tools()  # type: ignore[arg-type]
    sides: dict[str, Grammar | None] = {
        "free": None,
        "held": call_grammar(tools, lazy=False),
        "lazy": call_grammar(tools, lazy=True),
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    try:
        await _round(model, None, 1)  # warm
        for r in range(rounds):
            names = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for name in names:
                tokens, elapsed = await _round(model, sides[name], 100 + r)
                rates[name].append(tokens / elapsed)
        checked, rejected = model.scheduler.grammar_checks
    finally:
        model.close()
    out: dict[str, Any] = {"rounds": rounds}
    for name, found in rates.items():
        out[f"{name}_tokens_per_s"] = round(statistics.median(found), 1)
    out["grammar_over_free_tokens_per_s"] = round(
        out["held_tokens_per_s"] / out["free_tokens_per_s"], 3
    )
    out["lazy_over_free_tokens_per_s"] = round(
        out["lazy_tokens_per_s"] / out["free_tokens_per_s"], 3
    )
    out["grammar_rejected_share"] = round(rejected / checked, 4) if checked else 0.0
    log(f"grammar bench: {out}")
    return out


def main(quick: bool = False) -> int:
    results = asyncio.run(measure(2 if quick else 6))
    print(json.dumps(results, sort_keys=True))
    return 0
