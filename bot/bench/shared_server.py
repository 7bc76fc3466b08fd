"""Two bot processes sharing one llama-server: who picks the slots.

``python -m bot bench --backend llama-server --shared``.  Two clients of one server (as two
bot processes would be: each its own slot bookkeeping) each run four conversations, and every
round all eight send their next message at once (each prompt extends the conversation's last
one).  Three ways of choosing slots, measured one after the other on the same server:

- ``server``: no slot named (``id_slot`` -1): the server gives each request the idle slot whose
  cached prompt is most like it (the default);
- ``own``: each process keeps its conversations on slots of its own (``server_slots``);
- ``shared``: each process spreads its conversations over every slot from 0 (what both did
  before): they queue behind each other on the same slots.

For each: the rounds' median wall time, aggregate streamed tokens/s, and the share of prompt
tokens the server did not have to evaluate (its own ``/metrics`` count).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import replace
from typing import Any

import httpx

from ai_model.config import ModelSettings, SamplingSettings
from ai_model.llama_server import LlamaServerDialect
from ai_model.remote import RemoteModel
from ai_model.templates import encode
from bot.bench.common import log, sentence

MODES = {"server": ((), ()), "own": ((0, 1), (2, 3)), "shared": ((0, 1, 2, 3), (0, 1, 2, 3))}


def prompt_tokens_evaluated(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("llamacpp:prompt_tokens_total"):
            return float(line.split()[-1])
    return 0.0


async def _mode(
    url: str, slots: tuple[tuple[int, ...], tuple[int, ...]], rounds: int, tag: str
) -> dict[str, float]:
    import random

    sampling = SamplingSettings(max_tokens=48, temperature=0.0, seed=3)
    base = ModelSettings(backend="llama-server", url=url, parallel=4, sampling=sampling)
    clients = [
        await asyncio.to_thread(
            RemoteModel.load, replace(base, server_slots=own), None, f"p{i}", LlamaServerDialect()
        )
        for i, own in enumerate(slots)
    ]
    rng = random.Random(hash(tag) & 0xFFFF)
    template = clients[0].template
    history: dict[str, list[int]] = {}
    for p in range(2):
        for c in range(4):
            opening = f"{tag} conversation {p}-{c}. " + sentence(rng, 300)
            history[f"{p}-{c}"] = [
                *clients[0].bos,
                *encode(template.turn("system", opening), clients[0]),
            ]
    walls: list[float] = []
    rates: list[float] = []
    sent: list[int] = []  # prompt tokens sent
    evaluated = 0.0
    try:
        for _ in range(rounds):
            before = await asyncio.to_thread(prompt_tokens_evaluated, url)
            began = time.perf_counter()

            async def one(p: int, c: int) -> int:
                key = f"{p}-{c}"
                turn = encode(
                    [*template.turn("user", sentence(rng, 20)), *template.generation_prompt()],
                    clients[p],
                )
                prompt = [*history[key], *turn]
                sent.append(len(prompt))
                pieces = [piece async for piece in clients[p].stream(prompt, sampling, slot=key)]
                produced = list(clients[p].generated(key))
                history[key] = [
                    *prompt,
                    *produced,
                    *encode(template.turn("assistant", "")[2:], clients[p]),
                ]
                return len(produced) if produced else len(pieces)

            counts = await asyncio.gather(*(one(p, c) for p in range(2) for c in range(4)))
            wall = time.perf_counter() - began
            walls.append(wall)
            rates.append(sum(counts) / wall)
            evaluated += await asyncio.to_thread(prompt_tokens_evaluated, url) - before
    finally:
        for client in clients:
            await client.aclose()
            client.close()
    return {
        "round_wall_s": round(statistics.median(walls), 3),
        "tokens_per_s": round(statistics.median(rates), 1),
        "prompt_reused": round(1 - evaluated / sum(sent), 3) if sent else 0.0,
    }


async def measure_shared(url: str, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"shared_server_rounds": rounds}
    for mode, slots in MODES.items():
        figures = await _mode(url, slots, rounds, mode)
        for name, value in figures.items():
            out[f"shared_{mode}_{name}"] = value
        log(f"two processes, slots chosen by {mode}: {figures}")
    return out
