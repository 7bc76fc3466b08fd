"""``python -m bot bench``: speed figures of the core on the embedded model, as one JSON line.

Everything is measured in one run, side by side, on a temporary database and state folder:
first-token times (a short and a long channel, both already evaluated; more channels than
resident sequences in turn; after a restart), the prefix reuse that llama.cpp itself reports past
the window, streaming speed against raw llama.cpp, core throughput with a zero-cost model behind
the real tokenizer, event-loop lag while generating, the concurrency figures of
:mod:`bot.bench.batching` (serial and batched), and peak memory.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ai_model.base import ChatModel
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.embedded import gemma_model_path
from ai_model.registry import ModelRegistry
from bot.bench.batching import concurrency
from bot.bench.chatter import chatter
from bot.bench.common import (
    FixedModels,
    InstantModel,
    bench_settings,
    first_token_s,
    log,
    sentence,
)
from bot.bench.floors import admission_of, ratio_floor, read_seconds
from bot.bench.guards import check, earlier_runs, record
from bot.bench.scene import group_scene
from chat.core import ConversationCore
from chat.messages import IncomingMessage
from storage import Store, open_database
from storage.records import ASSISTANT, USER

TARGETS = {
    "concurrent4_worst_ttft_over_floor": ("<=", 1.2),
    "concurrent4_tokens_per_s_over_single": (">=", 0.9),
    "sixteen_channels_worst_over_p50": ("<=", 3.0),
    "ttft_long_over_empty_over_floor": ("<=", 1.15),
    "ttft_interleaved_over_single": ("<=", 2.0),
    "ttft_after_restart_over_floor": ("<=", 1.3),
    "prefix_hit_rate_past_window": (">=", 0.9),
    "gemma_prefix_hit_rate_past_window": (">=", 0.9),
    "scene_two_player_prefix_reuse": (">=", 0.9),
    "gen_speed_vs_raw": (">=", 0.9),
    "loop_lag_p99_ms": ("<=", 100),
    "mention_after_chatter_over_short": ("<=", 1.5),
    "mention_loop_lag_p99_ms": ("<=", 100),
}
QUESTION = "Could you summarise the main points of our discussion so far in two short sentences?"


@dataclass(frozen=True, slots=True)
class Sizes:
    long_history: int = 6000
    channel_history: int = 3000
    # More channels than resident sequences: the round-robin parks and restores states.
    channels: int = 6
    turns_past_window: int = 60
    window: int = 8191
    repeats: int = 3
    core_messages: int = 1000
    core_channels: int = 4
    concurrent_history: int = 2000
    sixteen: int = 16
    scene_turns: int = 75  # two players: 150 messages with the answers


# A smoke test: one repeat of each measurement (medians need the full run).
QUICK = Sizes(1200, 600, 6, 12, 1024, 1, 200, 4, 400, 16, scene_turns=6)
PARALLEL = 4


class Bench:
    def __init__(self, folder: Path, sizes: Sizes, gpu_layers: int = 0) -> None:
        self.folder = folder
        self.sizes = sizes
        self.rng = random.Random(7)
        model = ModelSettings(
            state_dir=str(folder / "states"),
            parallel=PARALLEL,
            n_gpu_layers=gpu_layers,
            # On a GPU as deployed (the seed settings): with the V cache transposed, a park or
            # restore is thousands of row copies (README, Speed).
            flash_attn=gpu_layers != 0,
            sampling=SamplingSettings(max_tokens=32, seed=7),
        )
        self.settings = bench_settings(folder / "bench.db", model)

    def log_line(self, text: str) -> None:
        log(text)

    async def open(
        self, parallel: int = PARALLEL, tag: str = "main", **changes: Any
    ) -> tuple[ModelRegistry, Store, ConversationCore]:
        """A registry, store and core; ``parallel`` 1 is the serial path (its contexts hold
        as many conversations as the batched path's sequences do, plus the parked ones)."""
        model = replace(
            self.settings.models["office"],
            parallel=parallel,
            cache_slots=max(PARALLEL, self.sizes.channels),
            state_dir=str(self.folder / f"states-{tag}"),
            **changes,
        )
        settings = replace(
            bench_settings(self.folder / f"bench-{tag}.db", model),
            models={"character": model, "office": model},
        )
        registry = ModelRegistry(settings.models)
        store = Store(await open_database(settings.database_url))
        return registry, store, ConversationCore(settings, store, registry)

    async def fill(self, core: ConversationCore, model: ChatModel, key: str, tokens: int) -> None:
        """Store a conversation of about ``tokens`` tokens (measured with the model)."""
        conv = await core.conversations.get("bench", key)
        total = 0
        for turn in itertools.count():
            text = sentence(self.rng, 60)
            if turn % 2 == 0:
                mid = await core.store.messages.add(conv.id, USER, text, author_name="Ann")
            else:
                await core.store.messages.add(conv.id, ASSISTANT, text, reply_to_id=mid)
            total += len(model.tokenize(text.encode(), False, False)) + 8
            if total >= tokens:
                break

    async def ttft(self, core: ConversationCore, key: str, text: str = QUESTION) -> float:
        """Seconds from sending a message to the first text of the reply."""
        return await first_token_s(core, key, text)

    async def first_token_figures(self, results: dict[str, Any]) -> None:
        s = self.sizes
        registry, store, core = await self.open()
        model = await registry.get("office")
        await self.ttft(core, "warm-up")
        await self.ttft(core, "short")  # evaluated once: then as warm as the long channel
        empty = [await self.ttft(core, "short") for _ in range(s.repeats)]
        log(f"short channel: {[round(t, 3) for t in empty]} s")
        dims = model.dimensions()  # type: ignore[attr-defined]
        short_turn = admission_of(model, "short")

        await self.fill(core, model, "long", s.long_history)
        cold = await self.ttft(core, "long")
        long = [await self.ttft(core, "long") for _ in range(s.repeats)]
        long_turn = admission_of(model, "long")
        log(f"long channel: first (cold) {cold:.2f} s, then {[round(t, 3) for t in long]} s")

        keys = [f"channel-{i}" for i in range(s.channels)]
        for key in keys:
            await self.fill(core, model, key, s.channel_history)
            await self.ttft(core, key)  # evaluated once, as any active channel would be
        single = [await self.ttft(core, keys[0]) for _ in range(s.repeats)]
        before = len(model.scheduler.admissions)  # type: ignore[attr-defined]
        interleaved = [await self.ttft(core, key) for _ in range(s.repeats) for key in keys]
        events = [a.event for a in list(model.scheduler.admissions)[before:]]  # type: ignore[attr-defined]
        log(
            f"single: {[round(t, 3) for t in single]} s; round-robin over {len(keys)} channels "
            f"and {PARALLEL} sequences: median {statistics.median(interleaved):.3f} s, "
            f"restored from RAM {events.count('ram')}, disk {events.count('disk')}, "
            f"resident {events.count('resident')}, cold {events.count('cold')}"
        )
        await core.memory.close()  # as the app's drain does
        registry.close()  # saves the states, as at a shutdown
        await store.close()

        read_s = read_seconds(self.folder / "states-main")  # the long channel's file
        registry, store, core = await self.open()  # "after a restart"
        restarted = await registry.get("office")
        restart = await self.ttft(core, "long")
        event = restarted.scheduler.admissions[-1].event  # type: ignore[attr-defined]
        log(f"after restart: {restart:.3f} s ({event})")
        await core.memory.close()  # as the app's drain does
        registry.close()
        await store.close()

        median_empty = statistics.median(empty)
        long_floor = ratio_floor(dims, [long_turn], short_turn)
        restart_floor = statistics.median(long) + read_s
        log(
            f"floors: long over empty {long_floor:.3f} (turns {long_turn} over {short_turn}); "
            f"restart {restart_floor:.3f} s (warm {statistics.median(long):.3f} s + reading "
            f"the state {read_s:.3f} s)"
        )
        results.update(
            ttft_long_over_empty_floor=round(long_floor, 3),
            ttft_long_over_empty_over_floor=round(
                statistics.median(long) / median_empty / long_floor, 3
            ),
            state_read_s=round(read_s, 4),
            ttft_after_restart_floor_s=round(restart_floor, 4),
            ttft_after_restart_over_floor=round(restart / restart_floor, 3),
        )
        results.update(
            ttft_empty_s=round(median_empty, 4),
            ttft_long_s=round(statistics.median(long), 4),
            ttft_long_cold_s=round(cold, 2),
            ttft_single_s=round(statistics.median(single), 4),
            ttft_interleaved_s=round(statistics.median(interleaved), 4),
            interleaved_channels=len(keys),
            interleaved_parked_restores=events.count("ram") + events.count("disk"),
            ttft_after_restart_s=round(restart, 4),
            restart_path=event,
            ttft_long_over_empty=round(statistics.median(long) / median_empty, 3),
            ttft_interleaved_over_single=round(
                statistics.median(interleaved) / statistics.median(single), 3
            ),
            ttft_after_restart_over_empty=round(restart / median_empty, 3),
        )

    async def fresh_first_tokens(self, results: dict[str, Any]) -> None:
        """A new conversation's first token with the beginning other conversations shared (the
        system prompt) held, and without it: two models side by side, measured alternately."""
        sides = [await self.open(tag=f"fresh-{mb}", shared_prefix_mb=mb) for mb in (256, 0)]
        times: list[list[float]] = [[], []]
        for _registry, _store, core in sides:
            for i in range(2):  # two conversations began alike: the next ones can share
                await self.ttft(core, f"fresh-first-{i}")
        for i in range(self.sizes.repeats):
            for side, (_registry, _store, core) in enumerate(sides):
                times[side].append(await self.ttft(core, f"fresh-{i}"))
        registry = sides[0][0]
        model = await registry.get("office")
        events = [a.event for a in model.scheduler.admissions][2:]  # type: ignore[attr-defined]
        for registry, store, core in sides:
            await core.memory.close()
            registry.close()
            await store.close()
        shared, unshared = statistics.median(times[0]), statistics.median(times[1])
        results.update(
            ttft_fresh_s=round(shared, 4),
            ttft_fresh_unshared_s=round(unshared, 4),
            ttft_fresh_shared_over_unshared=round(shared / unshared, 3),
        )
        log(
            f"fresh conversations: shared beginning {[round(t, 3) for t in times[0]]} s "
            f"({events.count('shared')} of {len(events)} started from it), "
            f"without {[round(t, 3) for t in times[1]]} s"
        )

    async def prefix_hit_rate(
        self, results: dict[str, Any], name: str = "", window: int = 0, **files: Any
    ) -> None:
        """Consecutive messages of one channel past the window, answered by the real model:
        the prompt tokens that llama.cpp already held (its own count), per turn.  ``name``
        prefixes the figures of another model (``files``: its path and format)."""
        window = window or self.sizes.window
        registry, store, core = await self.open(tag=f"window{name}", n_ctx=window, **files)
        model = await registry.get("office")
        admissions = model.scheduler.admissions  # type: ignore[attr-defined]
        rng = self.rng
        past: list[tuple[int, int]] = []  # (reused, prompt tokens) per turn past the window
        longest = 0
        while len(past) < self.sizes.turns_past_window:
            text = sentence(rng, rng.randint(20, 80))
            msg = IncomingMessage("bench", "window", "u", "Ann", text, True, True)
            async for _ in core.answers.respond(msg):
                pass
            adm = next(a for a in reversed(admissions) if a.key == "window")
            # The user pauses between messages: the summary job (memory on) gets its turn.
            await core.memory.settle("window")
            longest = max(longest, adm.reused + adm.computed)
            conv = await core.conversations.get("bench", "window")
            if conv.window_start_id > 0:
                past.append((adm.reused, adm.reused + adm.computed))
        hits = [reused >= 0.8 * total for reused, total in past[1:]]
        key = f"{name}_" if name else ""
        results[f"{key}prefix_hit_rate_past_window"] = round(sum(hits) / len(hits), 3)
        results[f"{key}prefix_tokens_reused_past_window"] = round(
            sum(r for r, _ in past[1:]) / sum(t for _, t in past[1:]), 3
        )
        results[f"{key}max_prompt_tokens"] = longest
        results[f"{key}summaries_written"] = core.memory.summaries_written
        results[f"{key}window_tokens"] = window
        if not name:
            results["memory_budget"] = self.settings.memory_budget
        log(
            f"{name or 'embedded'} ({model.template.name}): prefix reuse past the window: "
            f"{sum(hits)}/{len(hits)} turns (llama.cpp's count), with "
            f"{core.memory.summaries_written} summaries written and pinned at the trims"
        )
        await core.memory.close()  # as the app's drain does
        registry.close()
        await store.close()

    async def generation_speed(self, results: dict[str, Any]) -> None:
        """Streamed tokens/s through the core versus raw llama.cpp, same prompt and settings."""
        registry, store, core = await self.open(tag="speed")
        model = await registry.get("office")
        serial_registry, serial_store, _ = await self.open(parallel=1, tag="raw")
        serial = await serial_registry.get("office")
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
            times = serial.raw_token_times(tokens, raw_sampling)  # type: ignore[attr-defined]
            return len(times), times[-1] - times[0]

        core_rates, raw_rates = [], []
        for i in range(self.sizes.repeats):
            # A fresh channel each time, so the core and raw llama.cpp see the same prompt.
            msg = IncomingMessage("bench", f"gen-{i}", "u", "Ann", text, True, True)
            stamps: list[float] = []
            reply = ""
            async for snapshot in core.answers.respond(msg):
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
        await core.memory.close()  # as the app's drain does
        registry.close()
        serial_registry.close()
        await store.close()
        await serial_store.close()

    async def core_throughput(self, results: dict[str, Any]) -> None:
        """Messages/s through core + SQLite with a model that costs nothing."""
        settings = replace(
            self.settings, database_url=f"sqlite+aiosqlite:///{self.folder / 'core.db'}"
        )
        store = Store(await open_database(settings.database_url))
        # The real tokenizer and template: prompt assembly costs what it costs in production.
        vocab = await ModelRegistry(settings.models, vocab_only=True).get("office")
        model = InstantModel(vocab)
        core = ConversationCore(settings, store, FixedModels({"office": model, "character": model}))
        s = self.sizes
        per_channel = s.core_messages // s.core_channels
        latencies: list[float] = []

        async def channel(i: int, count: int, record: bool) -> None:
            for n in range(count):
                msg = IncomingMessage("bench", f"core-{i}", "u", "Ann", f"message {n}", True, True)
                start = time.perf_counter()
                async for _ in core.answers.respond(msg):
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
        await core.memory.close()  # as the app's drain does
        await store.close()


async def run(quick: bool = False, gpu_layers: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="localbot-bench-") as folder:
        bench = Bench(Path(folder), QUICK if quick else Sizes(), gpu_layers)
        results: dict[str, Any] = {"quick": quick, "parallel": PARALLEL, "gpu_layers": gpu_layers}
        started = time.perf_counter()
        await bench.core_throughput(results)
        many = 200 if quick else 2000
        await chatter(bench.settings, bench.folder, results, (20, many), bench.sizes.repeats)
        await bench.generation_speed(results)
        await bench.prefix_hit_rate(results)
        # A second format on a second real model: Gemma 3 270M (no system role, strict
        # alternation), on a smaller window so that its 262k-token vocabulary keeps the run short.
        gemma = str(gemma_model_path())
        await bench.prefix_hit_rate(
            results,
            "gemma",
            window=min(4096, bench.sizes.window),
            path=gemma,
            chat_template="gemma",
        )
        await bench.first_token_figures(results)
        await bench.fresh_first_tokens(results)
        await group_scene(bench, bench.sizes.scene_turns, results)
        for parallel in (1, PARALLEL):  # the serial path, then the batched one
            await concurrency(bench, parallel, results)
        results["sixteen_channels_worst_over_p50"] = round(
            results["sixteen_channels_ttft_worst_s"] / results["sixteen_channels_ttft_p50_s"], 3
        )
        results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        results["bench_seconds"] = round(time.perf_counter() - started, 1)
    results["targets_met"] = {
        name: (results[name] <= bound if op == "<=" else results[name] >= bound)
        for name, (op, bound) in TARGETS.items()
    }
    return results


def main(quick: bool = False, gpu_layers: int = 0, history: Path | None = None) -> int:
    try:  # read first: an unreadable file is reported at once, not after half an hour
        earlier = earlier_runs(history, quick) if history is not None else []
    except OSError as exc:
        log(f"cannot read the bench history {history}: {exc}")
        return 2
    results = asyncio.run(run(quick, gpu_layers))
    if history is not None:  # the core's speed is guarded against earlier runs, not a target
        results["regression_guards"] = check(results, earlier)
        try:
            record(results, history)
        except OSError as exc:  # the figures are printed all the same
            log(f"cannot add this run to the bench history {history}: {exc}")
    print(json.dumps(results, sort_keys=True))
    return 0
