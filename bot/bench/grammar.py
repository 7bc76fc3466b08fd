"""``python -m bot bench --grammar``: generation held to the tool-call grammar against free
generation, on the embedded model, in one run.

Four generations at once on the batched path, alternately with and without the grammar (held
from the first token), the same prompts and seeds; tokens/s is the tokens generated after each
reply's first over the time from the first token to the last.  Calls are shorter than replies
in words, so the held side's batch empties sooner: the comparison leans against the grammar.
Also the lazy grammar that never triggers (a reply in words) against none, and the share of
the chain's picks the grammar turned down.
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
BUDGET = 96  # tokens a reply may write


async def _round(
    model: BatchedModel, grammar: Grammar | None, seed: int
) -> tuple[list[int], float]:
    """The tokens each reply wrote after its first, and the time from the first reply's first
    token to the last reply's last: the generation itself, not the prompts before it (calls
    are shorter than replies in words, and would carry more of the prompt's time)."""

    async def one(n: int, question: str) -> tuple[int, float, float]:
        sampling = SamplingSettings(max_tokens=BUDGET, temperature=0.8, seed=seed)
        pieces = [*model.template.turn("system", SYSTEM), *model.template.turn("user", question)]
        prompt = [*model.bos, *encode((*pieces, *model.template.generation_prompt()), model)]
        first, last = 0.0, 0.0
        async for _piece in model.stream(prompt, sampling, slot=f"q{n}", grammar=grammar):
            last = time.perf_counter()
            first = first or last
        # The tokens generated, not the text's: held to a grammar, a call is written in more,
        # smaller tokens than its text would be tokenized into.
        return max(len(model.generated(f"q{n}")) - 1, 0), first, last

    done = await asyncio.gather(*(one(n, q) for n, q in enumerate(ASKED)))
    tokens = [t for t, _f, _l in done]
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
    written = dict.fromkeys(sides, 0)
    try:
        await _round(model, None, 1)  # warm
        before = list(model.scheduler.grammar_checks)
        for r in range(rounds):
            names = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for name in names:
                tokens, elapsed = await _round(model, sides[name], 100 + r)
                rates[name].append(sum(tokens) / elapsed)
                written[name] += sum(tokens)
        after = model.scheduler.grammar_checks
        checked, rejected = after[0] - before[0], after[1] - before[1]
    finally:
        model.close()
    out: dict[str, Any] = {"rounds": rounds, "tokens_written": written}
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
