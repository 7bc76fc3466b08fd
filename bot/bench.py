"""``python -m bot bench``: speed figures of the core on the embedded model, as one JSON line.

Everything is measured in one run, side by side, on a temporary database and state folder:
first-token times (empty channel, long channel, interleaved channels, after a restart), the
prefix reuse rate past the window, streaming speed against raw llama.cpp, core throughput with a
zero-cost model, event-loop lag while generating, and peak memory.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ai_model.base import ChatModel
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.registry import ModelRegistry
from ai_model.scripted import ScriptedModel
from ai_model.slots import common_prefix
from bot.core import ConversationCore
from bot.messages import IncomingMessage
from bot.settings import Settings
from storage import Store, open_database
from storage.store import ASSISTANT, USER

TARGETS = {
    "ttft_long_over_empty": ("<=", 1.5),
    "ttft_interleaved_over_single": ("<=", 2.0),
    "ttft_after_restart_over_empty": ("<=", 3.0),
    "prefix_hit_rate_past_window": (">=", 0.9),
    "gen_speed_vs_raw": (">=", 0.9),
    "core_msgs_per_s": (">=", 500),
    "core_p99_ms": ("<=", 20),
    "loop_lag_p99_ms": ("<=", 100),
}
QUESTION = "Could you summarise the main points of our discussion so far in two short sentences?"
WORDS = [
    "budget",
    "report",
    "meeting",
    "lantern",
    "dragon",
    "quarterly",
    "river",
    "invoice",
    "castle",
    "spreadsheet",
    "tavern",
    "deadline",
    "sword",
    "client",
    "harbor",
    "agenda",
    "potion",
    "schedule",
    "merchant",
    "forecast",
    "travel",
    "weather",
]


@dataclass(frozen=True, slots=True)
class Sizes:
    long_history: int = 6000
    channel_history: int = 3000
    channels: int = 4
    turns_past_window: int = 200
    repeats: int = 3
    core_messages: int = 1000
    core_channels: int = 4


QUICK = Sizes(1200, 600, 2, 40, 2, 200, 4)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def bench_settings(database: Path, model: ModelSettings) -> Settings:
    """Settings for a bench: ``model`` in both roles, a database file of its own."""
    # One synthetic user sends everything: the fair-share limits, which would ration
    # them, are off, so that the figures measure the pipeline itself.
    return replace(
        Settings(),
        database_url=f"sqlite+aiosqlite:///{database}",
        models={"character": model, "office": model},
        rate_limit=0,
        max_queued=1_000_000,
        max_pending_per_user=1_000_000,
    )


class Bench:
    def __init__(self, folder: Path, sizes: Sizes) -> None:
        self.folder = folder
        self.sizes = sizes
        self.rng = random.Random(7)
        model = ModelSettings(
            state_dir=str(folder / "states"),
            cache_slots=sizes.channels + 1,
            sampling=SamplingSettings(max_tokens=32, seed=7),
        )
        self.settings = bench_settings(folder / "bench.db", model)

    async def open(self) -> tuple[ModelRegistry, Store, ConversationCore]:
        registry = ModelRegistry(self.settings.models)
        store = Store(await open_database(self.settings.database_url))
        return registry, store, ConversationCore(self.settings, store, registry)

    async def fill(self, core: ConversationCore, model: ChatModel, key: str, tokens: int) -> None:
        """Store a conversation of about ``tokens`` tokens (measured with the model)."""
        conv = await core.conversation("bench", key)
        total = 0
        for turn in itertools.count():
            text = sentence(self.rng, 60)
            if turn % 2 == 0:
                mid = await core.store.add_message(conv.id, USER, text, author_name="Ann")
            else:
                await core.store.add_message(conv.id, ASSISTANT, text, reply_to_id=mid)
            total += len(model.tokenize(text.encode(), False, False)) + 8
            if total >= tokens:
                break

    async def ttft(self, core: ConversationCore, key: str, text: str = QUESTION) -> float:
        """Seconds from sending a message to the first text of the reply."""
        msg = IncomingMessage("bench", key, "u1", "Ann", text, is_dm=True)
        start = time.perf_counter()
        first: float | None = None
        async for reply in core.respond(msg):
            if first is None and reply.text and not reply.final:
                first = time.perf_counter() - start
        return first if first is not None else time.perf_counter() - start

    async def first_token_figures(self, results: dict[str, Any]) -> None:
        s = self.sizes
        registry, store, core = await self.open()
        model = await registry.get("office")
        await self.ttft(core, "warm-up")
        empty = [await self.ttft(core, f"empty-{i}") for i in range(s.repeats)]
        log(f"empty channel: {[round(t, 3) for t in empty]} s")

        await self.fill(core, model, "long", s.long_history)
        cold = await self.ttft(core, "long")
        long = [await self.ttft(core, "long") for _ in range(s.repeats)]
        log(f"long channel: first (cold) {cold:.2f} s, then {[round(t, 3) for t in long]} s")

        keys = [f"channel-{i}" for i in range(s.channels)]
        for key in keys:
            await self.fill(core, model, key, s.channel_history)
            await self.ttft(core, key)  # evaluated once, as any active channel would be
        single = [await self.ttft(core, keys[0]) for _ in range(s.repeats)]
        interleaved = [await self.ttft(core, key) for _ in range(s.repeats) for key in keys]
        log(
            f"single: {[round(t, 3) for t in single]} s; round-robin median "
            f"{statistics.median(interleaved):.3f} s"
        )
        registry.close()  # saves the states, as at a shutdown
        await store.close()

        registry, store, core = await self.open()  # "after a restart"
        restarted = await registry.get("office")
        restart = await self.ttft(core, "long")
        event = restarted.slots.last_event  # type: ignore[attr-defined]
        log(f"after restart: {restart:.3f} s ({event})")
        registry.close()
        await store.close()

        median_empty = statistics.median(empty)
        results.update(
            ttft_empty_s=round(median_empty, 4),
            ttft_long_s=round(statistics.median(long), 4),
            ttft_long_cold_s=round(cold, 2),
            ttft_single_s=round(statistics.median(single), 4),
            ttft_interleaved_s=round(statistics.median(interleaved), 4),
            ttft_after_restart_s=round(restart, 4),
            restart_path=event,
            ttft_long_over_empty=round(statistics.median(long) / median_empty, 3),
            ttft_interleaved_over_single=round(
                statistics.median(interleaved) / statistics.median(single), 3
            ),
            ttft_after_restart_over_empty=round(restart / median_empty, 3),
        )

    async def prefix_hit_rate(self, results: dict[str, Any]) -> None:
        """Consecutive prompts of one channel past the window: how often 80% is reused."""
        registry, store, _ = await self.open()
        model = await registry.get("office")
        rng = self.rng
        scripted = ScriptedModel(
            lambda _p: sentence(rng, rng.randint(20, 60)),
            tokenizer=model,
            bos=model.bos,
            template=model.template,
            n_ctx=model.n_ctx,
        )
        core = ConversationCore(
            self.settings, store, _Fixed({"office": scripted, "character": scripted})
        )
        past = 0
        trimmed_at = None
        while past < self.sizes.turns_past_window:
            text = sentence(rng, rng.randint(20, 80))
            async for _ in core.respond(
                IncomingMessage("bench", "window", "u", "Ann", text, True, True)
            ):
                pass
            conv = await core.conversation("bench", "window")
            if trimmed_at is None and conv.window_start_id > 0:
                trimmed_at = len(scripted.prompts) - 1
            if trimmed_at is not None:
                past += 1
        assert trimmed_at is not None
        prompts = scripted.prompts[trimmed_at:]
        hits = [common_prefix(a, b) >= 0.8 * len(b) for a, b in itertools.pairwise(prompts)]
        results["prefix_hit_rate_past_window"] = round(sum(hits) / len(hits), 3)
        results["max_prompt_tokens"] = max(len(p) for p in scripted.prompts)
        log(f"prefix reuse past the window: {sum(hits)}/{len(hits)} turns")
        registry.close()
        await store.close()

    async def generation_speed(self, results: dict[str, Any]) -> None:
        """Streamed tokens/s through the core versus raw llama.cpp, same prompt and settings."""
        registry, store, core = await self.open()
        model = await registry.get("office")
        seen: list[list[int]] = []
        original = model.stream

        def spy(tokens: Sequence[int], *args: Any, **kwargs: Any) -> Any:
            seen.append(list(tokens))
            return original(tokens, *args, **kwargs)

        model.stream = spy  # type: ignore[method-assign]
        sampling = SamplingSettings(max_tokens=160, temperature=0.0, seed=1)
        core.settings = replace(
            self.settings,
            models={r: replace(m, sampling=sampling) for r, m in self.settings.models.items()},
        )
        text = "Write a long, detailed story about a dragon who opens a bakery."
        lags: list[float] = []
        stop = asyncio.Event()

        async def probe() -> None:
            while not stop.is_set():
                start = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append((time.perf_counter() - start - 0.01) * 1000)

        prober = asyncio.create_task(probe())
        raw_sampling = replace(sampling, stop=())

        def raw(tokens: list[int]) -> tuple[int, float]:
            times = model.raw_token_times(tokens, raw_sampling)  # type: ignore[attr-defined]
            return len(times), times[-1] - times[0]

        core_rates, raw_rates = [], []
        for i in range(self.sizes.repeats):
            # A fresh channel each time, so the core and raw llama.cpp see the same prompt.
            msg = IncomingMessage("bench", f"gen-{i}", "u", "Ann", text, True, True)
            stamps: list[float] = []
            reply = ""
            async for snapshot in core.respond(msg):
                if snapshot.delta:
                    stamps.append(time.perf_counter())
                reply = snapshot.text
            n_core = len(model.tokenize(reply.encode(), False, False))
            core_rates.append((n_core - 1) / (stamps[-1] - stamps[0]))
            n_raw, raw_time = await asyncio.to_thread(raw, seen[-1])
            raw_rates.append((n_raw - 1) / raw_time)
        stop.set()
        await prober
        lags.sort()
        core_rate, raw_rate = statistics.median(core_rates), statistics.median(raw_rates)
        results.update(
            gen_tokens_per_s_core=round(core_rate, 1),
            gen_tokens_per_s_raw=round(raw_rate, 1),
            gen_speed_vs_raw=round(core_rate / raw_rate, 3),
            loop_lag_p99_ms=round(lags[int(len(lags) * 0.99)], 2),
        )
        log(
            f"generation: core {[round(r, 1) for r in core_rates]} tok/s, raw "
            f"{[round(r, 1) for r in raw_rates]} tok/s; "
            f"loop lag p99 {results['loop_lag_p99_ms']} ms"
        )
        registry.close()
        await store.close()

    async def core_throughput(self, results: dict[str, Any]) -> None:
        """Messages/s through core + SQLite with a model that costs nothing."""
        settings = replace(
            self.settings, database_url=f"sqlite+aiosqlite:///{self.folder / 'core.db'}"
        )
        store = Store(await open_database(settings.database_url))
        model = ScriptedModel(["OK."])
        core = ConversationCore(settings, store, _Fixed({"office": model, "character": model}))
        s = self.sizes
        per_channel = s.core_messages // s.core_channels
        latencies: list[float] = []

        async def channel(i: int, count: int, record: bool) -> None:
            for n in range(count):
                msg = IncomingMessage("bench", f"core-{i}", "u", "Ann", f"message {n}", True, True)
                start = time.perf_counter()
                async for _ in core.respond(msg):
                    pass
                if record:
                    latencies.append(time.perf_counter() - start)

        # Steady state: statement caches, the history cache and the window are warm first.
        await asyncio.gather(*(channel(i, 25, False) for i in range(s.core_channels)))
        start = time.perf_counter()
        await asyncio.gather(*(channel(i, per_channel, True) for i in range(s.core_channels)))
        wall = time.perf_counter() - start
        latencies.sort()
        results.update(
            core_msgs_per_s=round(len(latencies) / wall, 1),
            core_p99_ms=round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
            core_concurrent_channels=s.core_channels,
        )
        log(f"core: {results['core_msgs_per_s']} msgs/s, p99 {results['core_p99_ms']} ms")
        await store.close()


class _Fixed:
    def __init__(self, models: dict[str, ChatModel]) -> None:
        self.models = models

    async def get(self, role: str) -> ChatModel:
        return self.models[role]


async def run(quick: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="localbot-bench-") as folder:
        bench = Bench(Path(folder), QUICK if quick else Sizes())
        results: dict[str, Any] = {"quick": quick}
        started = time.perf_counter()
        await bench.core_throughput(results)
        await bench.generation_speed(results)
        await bench.prefix_hit_rate(results)
        await bench.first_token_figures(results)
        results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        results["bench_seconds"] = round(time.perf_counter() - started, 1)
    results["targets_met"] = {
        name: (results[name] <= bound if op == "<=" else results[name] >= bound)
        for name, (op, bound) in TARGETS.items()
    }
    return results


def main(quick: bool = False) -> int:
    results = asyncio.run(run(quick))
    print(json.dumps(results, sort_keys=True))
    return 0
