"""The group-scene figures of ``python -m bot bench``: a roleplay scene on a card whose
description, scenario and example dialogue use ``{{user}}``, with a lorebook whose entries the
messages switch on and off, answered by the real model.

Two players taking turns, and beside it one player sending the same number of messages, in
one run, alternately: llama.cpp's own count of the prompt tokens it already held (per turn,
after the first), and the median first token of each scene.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bot.bench.batching import Bench
from chat.core import ConversationCore
from chat.messages import IncomingMessage
from chat.roleplay.characters import card_from_fields

SCENE_CARD = card_from_fields(
    "Isolde",
    description="{{char}} runs the harbor tavern where {{user}} have gathered tonight.",
    scenario="{{user}} wait out a storm with {{char}}, who knows every sailor in town.",
    mes_example="<START>\n{{user}}: Any news?\n{{char}}: Only the wind, {{user}}.",
    first_mes="*{{char}} lights the lamps.*",
    character_book={
        "entries": [
            {
                "keys": ["harbor"],
                "content": "The harbor chain is raised at night; no ship leaves before dawn.",
                "enabled": True,
                "insertion_order": 1,
                "extensions": {},
            },
            {
                "keys": ["ale", "drink"],
                "content": "The house ale is dark and bitter, brewed in the cellar.",
                "enabled": True,
                "insertion_order": 2,
                "extensions": {},
            },
            {
                "keys": ["tavern"],
                "content": "The tavern is called the Salt Lamp.",
                "constant": True,
                "enabled": True,
                "insertion_order": 3,
                "extensions": {},
            },
        ]
    },
)
LINES = [
    "Isolde, what news from the harbor tonight?",
    "Isolde, another ale for the table, please.",
    "Isolde, is there a room free upstairs?",
    "Isolde, who is the stranger by the fire?",
]


async def _turn(core: ConversationCore, key: str, name: str, text: str) -> float:
    msg = IncomingMessage("bench", key, name.lower(), name, text, mentions_bot=True)
    start = time.perf_counter()
    first: float | None = None
    async for reply in core.answers.respond(msg):
        if first is None and reply.text and not reply.final and reply.speaker:
            first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


async def group_scene(bench: Bench, turns: int, results: dict[str, Any]) -> None:
    registry, store, core = await bench.open(parallel=4, tag="scene")
    model = await registry.get("character")
    await core.library.import_card(SCENE_CARD)
    scenes = {"two": ("Ann", "Bob"), "one": ("Ann",)}
    for scene in scenes:
        await core.actions.set_mode("bench", f"scene-{scene}", "roleplay")
        await core.actions.set_character("bench", f"scene-{scene}", "Isolde")
    admissions = model.scheduler.admissions  # type: ignore[attr-defined]
    reused: dict[str, list[tuple[int, int]]] = {s: [] for s in scenes}
    firsts: dict[str, list[float]] = {s: [] for s in scenes}
    for i in range(turns):
        for scene, players in scenes.items():
            key = f"scene-{scene}"
            name = players[i % len(players)]
            firsts[scene].append(await _turn(core, key, name, f"{LINES[i % len(LINES)]} ({i})"))
            adm = next(a for a in reversed(admissions) if a.key == key)
            reused[scene].append((adm.reused, adm.reused + adm.computed))
    await core.memory.close()
    registry.close()
    await store.close()
    for scene in scenes:
        counts = reused[scene][1:]  # the first turn of a scene has nothing to reuse
        results[f"scene_{scene}_player_prefix_reuse"] = round(
            sum(r for r, _ in counts) / sum(t for _, t in counts), 3
        )
        results[f"scene_{scene}_player_ttft_p50_s"] = round(statistics.median(firsts[scene][1:]), 4)
    results["scene_turns"] = turns
    bench.log_line(
        f"group scene over {turns} turns each: prefix reuse two players "
        f"{results['scene_two_player_prefix_reuse']}, one player "
        f"{results['scene_one_player_prefix_reuse']} (llama.cpp's count); first token p50 "
        f"{results['scene_two_player_ttft_p50_s']} s vs {results['scene_one_player_ttft_p50_s']} s"
    )
