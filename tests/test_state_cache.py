"""The conversation state cache: same replies cached or not, LRU eviction, disk copies."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from ai_model.config import ModelSettings, SamplingSettings
from ai_model.embedded import embedded_model_path
from ai_model.local import LocalModel
from ai_model.templates import encode

SAMPLING = SamplingSettings(max_tokens=24, seed=123, temperature=0.6)


async def load(tmp_path: Path, **changes: Any) -> LocalModel:
    changes.setdefault("state_dir", str(tmp_path / "states"))
    settings = ModelSettings(n_ctx=1024, **changes)
    return await asyncio.to_thread(LocalModel.load, settings, embedded_model_path(), "t")


def prompt(model: LocalModel, *turns: str) -> list[int]:
    pieces = [
        p for i, t in enumerate(turns) for p in model.template.turn(("user", "assistant")[i % 2], t)
    ]
    return [*model.bos, *encode((*pieces, *model.template.generation_prompt()), model)]


async def reply(model: LocalModel, tokens: list[int], slot: str | None) -> str:
    return "".join([p async for p in model.stream(tokens, SAMPLING, slot=slot)])


HISTORY = (
    "Ann: Tell me about the old mill north of town.",
    "The mill burned down last winter, and now bandits hide in its ruins.",
    "Ann: Should I take the river path instead?",
)


async def test_cached_and_uncached_paths_give_the_same_reply(tmp_path: Path) -> None:
    model = await load(tmp_path, cache_slots=3)
    try:
        long = prompt(model, *HISTORY)
        other = prompt(model, "Bob: What is the capital of France?")
        first = await reply(model, long, "a")  # evaluates the whole prompt
        await reply(model, other, "b")  # another channel in between
        assert model.slots.held_keys()[:2] == ["b", "a"]
        cached = await reply(model, long, "a")  # back to a: its context still holds the prompt
        assert model.slots.last_event == "switch"
        model.slots.active.ctx.kv_cache_clear()
        model.llama.n_tokens = 0  # now nothing is cached
        uncached = await reply(model, long, "a")
    finally:
        model.close()
    assert first == cached == uncached and first.strip()


async def test_the_budget_evicts_the_least_recently_used_channel(tmp_path: Path) -> None:
    model = await load(tmp_path, cache_slots=2, state_dir="")
    try:
        for key in ("a", "b", "a", "c"):
            await reply(model, prompt(model, f"{key}: hello there"), key)
        # b was used least recently
        assert sorted(k for k in model.slots.held_keys() if k) == ["a", "c"]
        assert len(model.slots.slots) == 2
        await reply(model, prompt(model, "b: hello there"), "b")
        assert model.slots.last_event == "cold"  # b had to be evaluated again
        assert sorted(k for k in model.slots.held_keys() if k) == ["b", "c"]
    finally:
        model.close()


async def test_states_survive_a_restart_and_corrupt_ones_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = await load(tmp_path)
    long = prompt(model, *HISTORY)
    before = await reply(model, long, "discord:1")
    model.close()  # saves the state
    files = list((tmp_path / "states").glob("*.state"))
    assert len(files) == 1

    model = await load(tmp_path)  # "after a restart"
    try:
        assert await reply(model, long, "discord:1") == before
        assert model.slots.last_event == "disk"
    finally:
        model.close()

    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF  # flip a byte in the state
    files[0].write_bytes(bytes(data))
    model = await load(tmp_path)
    try:
        with caplog.at_level(logging.WARNING):
            assert await reply(model, long, "discord:1") == before  # still right, from scratch
        assert model.slots.last_event == "cold"
        assert "corrupt" in caplog.text
    finally:
        model.close()

    model = await load(tmp_path, n_batch=1024)  # other load settings: the state is not ours
    try:
        await reply(model, long, "discord:1")
        assert model.slots.last_event == "cold"
    finally:
        model.close()


async def test_the_next_prompt_reuses_the_reply_tokens_in_the_cache(
    tmp_path: Path, make_core: Any
) -> None:
    from ai_model.slots import common_prefix
    from chat.messages import IncomingMessage

    small = ModelSettings(n_ctx=1024, state_dir="", sampling=SamplingSettings(max_tokens=40))
    model = await asyncio.to_thread(LocalModel.load, small, embedded_model_path(), "t")
    seen: list[list[int]] = []
    original = model.stream

    def spy(tokens, sampling, stop=(), slot=None, background=False, grammar=None):  # type: ignore[no-untyped-def]
        seen.append(list(tokens))
        return original(tokens, sampling, stop, slot, background, grammar)

    model.stream = spy  # type: ignore[method-assign]
    core = make_core(
        {"office": model, "character": model}, models={"office": small, "character": small}
    )
    try:
        for text in ("Tell me a fun fact about owls.", "And one about cats?"):
            msg = IncomingMessage("console", "console:t", "u", "Ann", text, is_dm=True)
            async for _ in core.answers.respond(msg):
                pass
            if len(seen) == 1:
                produced = list(model.generated("console:t"))
                evaluated = list(model.llama.input_ids[: model.llama.n_tokens])
    finally:
        model.close()
    assert produced
    # The second prompt matches what llama.cpp evaluated, through the whole generated reply.
    assert common_prefix(evaluated, seen[1]) == len(seen[0]) + len(produced)


async def test_a_new_conversation_reuses_the_whole_turns_an_evicted_one_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new channel takes the least recently used context and keeps what its prompt shares
    with it, cut back to a turn boundary: the system part, never a message's text."""
    system = "You are Mira, the innkeeper of the Lantern. " * 4
    words = "Ann: The quick brown fox jumps over the lazy dog near the old mill by the river."

    def with_system(*turns: str) -> list[int]:
        pieces = [*model.template.turn("system", system)]
        for i, t in enumerate(turns):
            pieces += model.template.turn(("user", "assistant")[i % 2], t)
        return [*model.bos, *encode((*pieces, *model.template.generation_prompt()), model)]

    model = await load(tmp_path, cache_slots=2, state_dir="")
    try:
        c_prompt = with_system(words + " Where is Bob?")
        cold = await reply(model, c_prompt, "c")  # the reply with nothing reused
        model.slots.active.ctx.kv_cache_clear()
        model.llama.n_tokens = 0
        await reply(model, with_system(words + " What time is it?"), "a")
        await reply(model, with_system("Bob: Hello!"), "b")
        evaluated: list[int] = []
        real_eval = model.llama.eval
        monkeypatch.setattr(model.llama, "eval", lambda t: (evaluated.append(len(t)), real_eval(t)))
        again = await reply(model, c_prompt, "c2")  # a new channel: a's context is taken
        assert model.slots.last_event == "cold"
        system_turn = [*model.bos, *encode(model.template.turn("system", system), model)]
        start = model.tokenize(b"<|im_start|>", False, True)
    finally:
        model.close()
    assert again == cold and cold.strip()
    assert c_prompt[: len(system_turn)] == system_turn
    user_start = c_prompt.index(start[0], len(system_turn) - 1)
    # Reused: the system turn and the next turn's opening markup, though "Ann: The quick ..."
    # matched too; evaluated: the rest of the prompt.
    assert evaluated[0] == len(c_prompt) - (user_start + 1)
