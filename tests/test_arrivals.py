"""Prompts sent together start together: the engine announces a reply while its prompt is built,
and an idle scheduler holds its first step for the prompts announced (ai_model/arrivals.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from ai_model.arrivals import Upcoming
from ai_model.batched import BatchedModel
from chat.messages import IncomingMessage
from tests.scripted import ScriptedModel
from tests.test_batching import CONVERSATIONS, load, prompt, reply


async def arrive_apart(model: BatchedModel, announce: bool) -> list[tuple[int, int]]:
    """Three conversations whose prompts reach the model 15 ms apart, announced first or not;
    what the first step that evaluated prompts held."""
    prompts = [prompt(model, *turns) for turns in CONVERSATIONS[:3]]
    if announce:
        for i in range(3):
            model.upcoming(f"c{i}")

    async def late(i: int) -> str:
        await asyncio.sleep(0.015 * i)
        return await reply(model, prompts[i], f"c{i}")

    await asyncio.gather(*(late(i) for i in range(3)))
    return list(next(s for s in model.scheduler.steps if s.prefill).prefill)


async def test_prompts_announced_together_are_evaluated_in_one_step(tmp_path: Path) -> None:
    model = await load(tmp_path, parallel=4, batch_wait_ms=500, shared_prefix_mb=0)
    try:
        together = await arrive_apart(model, announce=True)
    finally:
        model.close()
    model = await load(tmp_path / "b", parallel=4, batch_wait_ms=500, shared_prefix_mb=0)
    try:
        apart = await arrive_apart(model, announce=False)
    finally:
        model.close()
    assert len(together) == 3  # one decode for the three prompts
    assert len(apart) == 1  # unannounced, the first prompt goes alone


async def test_an_announced_prompt_that_never_comes_holds_a_step_only_briefly(
    tmp_path: Path,
) -> None:
    model = await load(tmp_path, parallel=4, batch_wait_ms=300)
    tokens = prompt(model, *CONVERSATIONS[1])
    try:
        model.upcoming("gone")  # its prompt failed to build: it is never sent
        assert (await reply(model, tokens, "a")).strip()
        held = model.scheduler.held_s
        # A reply that is generating is never held: one announced meanwhile joins later.
        started = asyncio.Event()
        first = asyncio.ensure_future(reply(model, tokens, "b", then=started))
        await started.wait()
        model.upcoming("c")
        await asyncio.sleep(0.1)
        assert model.scheduler.held_s == held
        await first
    finally:
        model.close()
    assert 0.2 < held < 2.0


def test_announcements_are_forgotten_once_sent_or_past_their_time() -> None:
    upcoming = Upcoming(0.05)
    upcoming.announce("a", now=10.0)
    upcoming.announce("b", now=10.01)
    upcoming.announce(None, now=10.0)  # a request without a conversation is never waited for
    assert upcoming.until(10.02) == 10.06
    upcoming.arrived("b")
    assert upcoming.until(10.02) == 10.05
    assert upcoming.until(10.05) is None  # "a" never came: forgotten
    assert Upcoming(0.0).until(0.0) is None
    off = Upcoming(0.0)
    off.announce("a", now=1.0)  # batch_wait_ms = 0: nothing is ever held
    assert off.until(1.0) is None


async def test_the_engine_announces_a_reply_before_building_its_prompt(make_core: Any) -> None:
    model = ScriptedModel(["Hello there."])
    seen: list[list[str | None]] = []
    original = model.stream

    def stream(tokens: Sequence[int], *args: Any, **kw: Any) -> AsyncIterator[str]:
        seen.append(list(model.announced))
        return original(tokens, *args, **kw)

    model.stream = stream  # type: ignore[method-assign]
    core = make_core({"office": model, "character": model})
    chatter = IncomingMessage("discord", "discord:9", "1", "Ann", "lunch?", False, False)
    asked = IncomingMessage("discord", "discord:9", "1", "Ann", "Hi bot", False, True)
    async for _ in core.answers.respond(chatter):
        pass
    assert model.announced == []  # chatter is only stored
    async for _ in core.answers.respond(asked):
        pass
    assert seen == [["discord:9"]]
