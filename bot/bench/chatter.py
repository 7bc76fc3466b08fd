"""The chatter figure of ``python -m bot bench``: a mention after a long stretch of messages
that did not address the bot, against one after a short stretch.

The model costs nothing (:class:`bot.bench.common.InstantModel`, the real tokenizer and
template), so the figure is the core's own work: reading the history, framing the window,
storing.  Measured warm (the chatter arrived while the bot ran: its turns were encoded as they
came, :meth:`chat.prompt.building.PromptBuilder.prepare`) and cold (a fresh core reads and
encodes a window's worth from the database, as after a restart), with the event loop's lag
meanwhile.  Two members chat; a third mentions the bot.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ai_model.registry import ModelRegistry
from bot.bench.common import FixedModels, InstantModel, log, sentence
from chat.core import ConversationCore
from chat.messages import IncomingMessage
from chat.settings import Settings
from storage import Store, open_database


async def _mention(core: ConversationCore, key: str, lags: list[float]) -> float:
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append((time.perf_counter() - start - 0.005) * 1000)

    prober = asyncio.create_task(probe())
    msg = IncomingMessage("bench", key, "1", "Ann", "What did Bob say last?", mentions_bot=True)
    start = time.perf_counter()
    async for _ in core.answers.respond(msg):
        pass
    took = time.perf_counter() - start
    stop.set()
    await prober
    return took


async def chatter(
    settings: Settings, folder: Path, results: dict[str, Any], counts: tuple[int, int], repeats: int
) -> None:
    settings = replace(settings, database_url=f"sqlite+aiosqlite:///{folder / 'chatter.db'}")
    store = Store(await open_database(settings.database_url))
    vocab = await ModelRegistry(settings.models, vocab_only=True).get("office")
    model = InstantModel(vocab)
    served = FixedModels({"office": model, "character": model})
    core = ConversationCore(settings, store, served)
    rng = random.Random(11)
    warm: dict[int, list[float]] = {n: [] for n in counts}
    cold: dict[int, list[float]] = {n: [] for n in counts}
    lags: list[float] = []
    for r in range(repeats):
        for n in counts:
            key = f"chatter-{n}-{r}"
            for i in range(n):
                line = sentence(rng, 12)
                # Two members chat; a third asks the bot.
                who, name = ("2", "Bob") if i % 2 else ("3", "Cid")
                quiet = IncomingMessage("bench", key, who, name, line, mentions_bot=False)
                async for _ in core.answers.respond(quiet):
                    pass
            fresh = ConversationCore(settings, store, served)  # reads it all from the database
            cold[n].append(await _mention(fresh, key, lags))
            await fresh.memory.close()
            warm[n].append(await _mention(core, key, lags))
    await core.memory.close()
    await store.close()
    few, many = counts
    lags.sort()
    for name, times in (("warm", warm), ("cold", cold)):
        results[f"mention_after_{many}_{name}_s"] = round(statistics.median(times[many]), 4)
        results[f"mention_after_{few}_{name}_s"] = round(statistics.median(times[few]), 4)
    # The figure is the running bot's: the chatter arrived while it ran.  After a restart
    # (cold) the mention reads and encodes one window's worth, whatever the chatter before it.
    for name, times in (("", warm), ("_cold", cold)):
        results[f"mention_after_chatter_over_short{name}"] = round(
            statistics.median(times[many]) / statistics.median(times[few]), 3
        )
    results["mention_loop_lag_p99_ms"] = round(lags[int(len(lags) * 0.99)], 2) if lags else 0.0
    log(
        f"chatter: mention after {many} vs {few} unaddressed: warm {warm}, cold {cold}; "
        f"loop lag p99 {results['mention_loop_lag_p99_ms']} ms"
    )
