"""The concurrency figures of ``python -m bot bench``: the serial path and the batched
scheduler side by side, in one run, through the whole core.

- ``concurrent4``: four conversations, each with about 2,000 tokens of evaluated history, send
  at the same instant; their slowest first token over a lone conversation's first token.
- ``concurrent4_tokens_per_s``: four streams' aggregate generation tokens/s over one stream's.
- ``sixteen_channels``: sixteen new conversations, one message each, at once: the median and
  the worst first token.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import replace
from typing import Any, Protocol

from ai_model.base import ChatModel
from ai_model.config import SamplingSettings
from ai_model.registry import ModelRegistry
from bot.bench.floors import admission_of, ratio_floor
from chat.core import ConversationCore
from chat.messages import IncomingMessage
from chat.settings import Settings
from storage import Store


class Bench(Protocol):
    """What these sections use of the bench run (:class:`bot.bench.figures.Bench`)."""

    settings: Settings

    @property
    def sizes(self) -> Any: ...

    async def open(
        self, *, parallel: int, tag: str
    ) -> tuple[ModelRegistry, Store, ConversationCore]: ...

    async def fill(
        self, core: ConversationCore, model: ChatModel, key: str, tokens: int
    ) -> None: ...

    async def ttft(self, core: ConversationCore, key: str) -> float: ...

    def log_line(self, text: str) -> None: ...


STORIES = [
    "Write a long, detailed story about a dragon who opens a bakery.",
    "Write a long, detailed story about a lighthouse keeper and a storm.",
    "Write a long, detailed story about a merchant crossing the desert.",
    "Write a long, detailed story about a robot learning to paint.",
]


async def stream_times(
    core: ConversationCore, model: ChatModel, key: str, text: str
) -> tuple[int, list[float]]:
    """The reply's length in tokens (the real tokenizer's count), and when each piece came."""
    msg = IncomingMessage("bench", key, "u1", "Ann", text, is_dm=True)
    stamps: list[float] = []
    reply = ""
    async for snapshot in core.answers.respond(msg):
        if snapshot.delta and not snapshot.final:
            stamps.append(time.perf_counter())
        reply = snapshot.text
    return len(model.tokenize(reply.encode(), False, False)), stamps


async def concurrency(bench: Bench, parallel: int, results: dict[str, Any]) -> None:
    """Every concurrency figure for ``parallel`` sequences (1: the serial path)."""
    s = bench.sizes
    label = "serial" if parallel == 1 else "batched"
    registry, store, core = await bench.open(parallel=parallel, tag=label)
    model = await registry.get("office")
    # The floors need the scheduler's admissions: the batched path only.
    dims = model.dimensions() if parallel > 1 else None  # type: ignore[attr-defined]
    keys = [f"{label}-c{i}" for i in range(4)]
    for key in keys:
        await bench.fill(core, model, key, s.concurrent_history)
        await bench.ttft(core, key)  # evaluated once, as any active channel would be
    lone = [await bench.ttft(core, keys[0]) for _ in range(s.repeats)]
    lone_turn = admission_of(model, keys[0]) if dims else (0, 0)
    worst, floors = [], []
    for _ in range(s.repeats):
        times = await asyncio.gather(*(bench.ttft(core, key) for key in keys))
        worst.append(max(times))
        if dims is not None:
            floors.append(ratio_floor(dims, [admission_of(model, k) for k in keys], lone_turn))
    bench.log_line(f"{label}: lone {lone}, four at once (slowest) {worst}")

    # Generation speed: greedy replies of up to 96 tokens, fresh conversations.
    sampling = SamplingSettings(max_tokens=96, temperature=0.0, seed=1)
    core.settings = replace(
        core.settings,
        models={r: replace(m, sampling=sampling) for r, m in core.settings.models.items()},
    )
    one_rates, four_rates = [], []
    for rep in range(s.repeats):
        n, stamps = await stream_times(core, model, f"{label}-one-{rep}", STORIES[rep % 4])
        one_rates.append((n - 1) / (stamps[-1] - stamps[0]))
        runs = await asyncio.gather(
            *(stream_times(core, model, f"{label}-four-{rep}-{i}", STORIES[i]) for i in range(4))
        )
        first = min(st[0] for _n, st in runs)
        last = max(st[-1] for _n, st in runs)
        four_rates.append((sum(n for n, _st in runs) - 4) / (last - first))
    bench.log_line(f"{label}: tokens/s one {one_rates}, four together {four_rates}")

    # Sixteen new conversations at once, one message each (the bench's 32-token replies).
    core.settings = replace(
        core.settings,
        models={
            r: replace(m, sampling=bench.settings.models[r].sampling)
            for r, m in core.settings.models.items()
        },
    )
    sixteen = await asyncio.gather(
        *(bench.ttft(core, f"{label}-sixteen-{i}") for i in range(s.sixteen))
    )
    await core.memory.close()  # as the app's drain does
    registry.close()
    await store.close()

    lone_s = statistics.median(lone)
    one = statistics.median(one_rates)
    prefix = "" if parallel > 1 else "serial_"
    results.update(
        {
            f"{prefix}ttft_lone_s": round(lone_s, 4),
            f"{prefix}concurrent4_worst_ttft_s": round(statistics.median(worst), 4),
            f"{prefix}concurrent4_worst_ttft_over_single": round(
                statistics.median(worst) / lone_s, 3
            ),
            f"{prefix}gen_tokens_per_s_one_stream": round(one, 1),
            f"{prefix}gen_tokens_per_s_four_streams": round(statistics.median(four_rates), 1),
            f"{prefix}concurrent4_tokens_per_s_over_single": round(
                statistics.median(four_rates) / one, 3
            ),
            f"{prefix}sixteen_channels_ttft_p50_s": round(statistics.median(sixteen), 4),
            f"{prefix}sixteen_channels_ttft_worst_s": round(max(sixteen), 4),
        }
    )
    if floors:  # four turns' prefill over one's: what four at once cost at least, in FLOPs
        floor = statistics.median(floors)
        results["concurrent4_worst_ttft_floor"] = round(floor, 3)
        results["concurrent4_worst_ttft_over_floor"] = round(
            statistics.median(worst) / lone_s / floor, 3
        )
