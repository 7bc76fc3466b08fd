"""The context window: never overflowed, trimmed oldest-first in chunks, system part pinned."""

from __future__ import annotations

import asyncio
import itertools
import random

from ai_model.config import ModelSettings
from ai_model.local import LocalModel
from bot.bench.common import sentence
from chat.core import ConversationCore
from chat.messages import IncomingMessage, ReplyKind
from chat.prompt.window import PromptTooLong, Turn, fit_window
from storage.records import NOTICE
from tests.scripted import ScriptedModel
from tests.waiting import wait_until


def turns(sizes: list[int]) -> list[Turn]:
    return [Turn(position=i + 1, message_id=i + 1, tokens=(0,) * n) for i, n in enumerate(sizes)]


def test_window_keeps_its_start_until_it_overflows_then_drops_a_chunk() -> None:
    history = turns([100] * 10)
    window = fit_window(history, budget=1000, start=0)
    assert (window.start, window.trimmed, len(window.turns)) == (0, False, 10)
    grown = turns([100] * 11)
    window = fit_window(grown, budget=1000, start=0)
    assert window.trimmed
    assert sum(len(t.tokens) for t in window.turns) <= 750  # a quarter freed, not one message
    # The following turns keep the new start: the prompt's front does not move.
    for extra in range(12, 14):
        later = fit_window(turns([100] * extra), budget=1000, start=window.start)
        assert later.start == window.start and not later.trimmed


def test_window_rejects_a_single_message_larger_than_the_budget() -> None:
    try:
        fit_window(turns([10, 2000]), budget=1000, start=0)
    except PromptTooLong as exc:
        assert (exc.needed, exc.available) == (2000, 1000)
    else:
        raise AssertionError("expected PromptTooLong")


def test_window_never_opens_on_an_orphaned_reply() -> None:
    history = [
        Turn(1, 1, (0,) * 300),
        Turn(1, 2, (0,) * 300),  # reply to 1
        Turn(3, 3, (0,) * 300),
        Turn(3, 4, (0,) * 300),  # reply to 3
        Turn(5, 5, (0,) * 300),
    ]
    window = fit_window(history, budget=1000, start=0)
    assert window.turns[0].position == window.turns[0].message_id


async def test_a_long_conversation_never_overflows_the_window(
    smollm: LocalModel, make_core
) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    scripted = ScriptedModel(
        lambda _prompt: sentence(rng, 40),
        tokenizer=smollm,
        bos=smollm.bos,
        template=smollm.template,
    )
    core: ConversationCore = make_core({"character": scripted, "office": scripted})
    system = [*smollm.bos, *core.prompts.encoder(scripted).system(core.settings.system_prompt)]
    max_tokens = core.settings.models["office"].sampling.max_tokens
    total_tokens = 0
    turn = 0
    while total_tokens < 20_000:
        turn += 1
        text = sentence(rng, rng.randint(60, 240))
        total_tokens += len(smollm.tokenize(text.encode(), add_bos=False))
        msg = IncomingMessage("console", "console:long", "u1", "Ann", text, is_dm=True)
        reply = [r async for r in core.answers.respond(msg)][-1]
        assert reply.final and reply.kind is ReplyKind.ANSWER
        total_tokens += len(smollm.tokenize(reply.text.encode(), add_bos=False))
    assert total_tokens >= 20_000
    trims = 0
    for before, prompt in itertools.pairwise(scripted.prompts):
        # Checked on the actual token list handed to the model.
        assert len(prompt) + max_tokens <= 8191
        assert prompt[: len(system)] == system  # the system prompt is never trimmed
        if prompt[: len(before) - 10] != before[: len(before) - 10]:
            trims += 1
    assert len(scripted.prompts) == turn
    # The history outgrew the window several times, but trimming happened in chunks:
    # most consecutive prompts share their whole front, so llama.cpp can reuse it.
    assert 1 <= trims <= turn // 8, (trims, turn)
    assert max(len(p) for p in scripted.prompts) > 6000


async def test_the_real_model_answers_a_conversation_that_outgrows_its_window(
    smollm_llama: object, make_core
) -> None:  # type: ignore[no-untyped-def]
    # A small window keeps this quick on a CPU: prompt evaluation costs ~3 ms a token here.

    from ai_model.config import ModelSettings, SamplingSettings
    from ai_model.embedded import embedded_model_path

    small = ModelSettings(n_ctx=1024, sampling=SamplingSettings(max_tokens=32, seed=1))
    model = await asyncio.to_thread(LocalModel.load, small, embedded_model_path(), "small")
    prompts: list[int] = []
    original = model.stream

    def recording(tokens, sampling, stop=(), slot=None, background=False, grammar=None):  # type: ignore[no-untyped-def]
        prompts.append(len(tokens))
        return original(tokens, sampling, stop, slot, background, grammar)

    model.stream = recording  # type: ignore[method-assign]
    core: ConversationCore = make_core(
        {"character": model, "office": model},
        models={"character": small, "office": small},
    )
    rng = random.Random(11)
    try:
        for _ in range(8):
            text = sentence(rng, 120)
            msg = IncomingMessage("console", "console:edge", "u1", "Ann", text, is_dm=True)
            reply = [r async for r in core.answers.respond(msg)][-1]
            assert reply.final and reply.kind is ReplyKind.ANSWER, reply.text
    finally:
        model.close()
    assert max(prompts) + 32 <= 1024
    conv = await core.conversations.get("console", "console:edge")
    assert conv.window_start_id > 1  # the window did move


async def test_a_message_too_long_for_the_window_gets_a_clear_reply_and_is_kept(
    smollm: LocalModel, make_core
) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(3)
    scripted = ScriptedModel(["Noted."], tokenizer=smollm, bos=smollm.bos, template=smollm.template)
    core: ConversationCore = make_core({"character": scripted, "office": scripted})
    huge = sentence(rng, 9000)
    msg = IncomingMessage("console", "console:big", "u1", "Ann", huge, is_dm=True)
    replies = [r async for r in core.answers.respond(msg) if r.text]
    assert len(replies) == 1 and replies[0].kind is ReplyKind.NOTICE and replies[0].final
    assert "too long" in replies[0].text
    assert scripted.prompts == []  # the model was never asked

    conv = await core.conversations.get("console", "console:big")
    assert await core.store.messages.count(conv.id) == 2  # the message and the notice
    msg = IncomingMessage("console", "console:big", "u1", "Ann", "Short one.", is_dm=True)
    replies = [r async for r in core.answers.respond(msg)]
    assert replies[-1].text == "Noted."
    history = await core.store.messages.history(conv.id)
    assert [m.text for m in history] == ["Short one.", "Noted."]
    assert all(m.role != NOTICE for m in history)


SMALL = {role: ModelSettings(n_ctx=1024) for role in ("office", "character")}


def count_tokenized(model: ScriptedModel) -> list[int]:
    """The byte lengths of the texts ``model`` tokenizes from now on."""
    tokenized: list[int] = []
    original = model.tokenize

    def counting(text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        tokenized.append(len(text))
        return original(text, add_bos, special)

    model.tokenize = counting  # type: ignore[method-assign]
    return tokenized


async def test_a_mention_after_long_chatter_frames_no_more_than_a_window(
    make_core,  # type: ignore[no-untyped-def]
) -> None:
    """Unaddressed messages are stored as they come; the mention after 2,000 of them reads
    and tokenizes a window's worth, not the whole stretch since the last trim."""
    model = ScriptedModel(["Noted."], n_ctx=1024)  # one token per byte
    tokenized = count_tokenized(model)
    core = make_core({"office": model, "character": model}, models=SMALL)
    key = "telegram:-1007"
    for i in range(2000):
        line = f"chatter line {i} about the weather and the trains"
        quiet = IncomingMessage("telegram", key, "2", "Bob", line, mentions_bot=False)
        assert [r async for r in core.answers.respond(quiet)] == []
    tokenized.clear()
    ask = IncomingMessage("telegram", key, "1", "Ann", "What did Bob say last?")
    replies = [r async for r in core.answers.respond(ask)]
    assert replies[-1].kind is ReplyKind.ANSWER
    assert sum(tokenized) <= 3 * 1024  # a window's worth of text, with its frames
    assert "line 1999 about" in model.detokenize(model.prompts[-1])
    # After a restart the history is read from the database, as many rows as could fit.
    again = make_core({"office": model, "character": model}, models=SMALL)
    conv = await again.conversations.get("telegram", key)
    assert len(await again.history.get(conv)) <= 1024 // 2 + 1


async def test_chatter_is_encoded_as_it_arrives_in_a_running_bot(
    make_core,  # type: ignore[no-untyped-def]
) -> None:
    """Once the bot has answered in a channel, each unaddressed message's turn is encoded as
    it arrives (off the event loop), named as the prompt will name it: the mention after the
    chatter tokenizes only itself, and its prompt still names every speaker."""
    model = ScriptedModel(["Noted."] * 3, n_ctx=1024)  # one token per byte
    tokenized = count_tokenized(model)
    core = make_core({"office": model, "character": model}, models=SMALL)
    key = "telegram:-1008"
    first = IncomingMessage("telegram", key, "1", "Ann", "Hello there.")
    assert [r async for r in core.answers.respond(first)][-1].kind is ReplyKind.ANSWER
    for i in range(300):
        who, name = ("2", "Bob") if i % 2 else ("3", "Cid")
        line = f"chatter line {i} about the weather and the trains"
        quiet = IncomingMessage("telegram", key, who, name, line, mentions_bot=False)
        assert [r async for r in core.answers.respond(quiet)] == []
    await wait_until(lambda: core.prompts.preparing == 0)
    tokenized.clear()
    ask = IncomingMessage("telegram", key, "1", "Ann", "What did Bob say last?")
    replies = [r async for r in core.answers.respond(ask)]
    assert replies[-1].kind is ReplyKind.ANSWER
    assert sum(tokenized) <= 200  # the mention and the reply's frames, not the chatter
    shown = model.detokenize(model.prompts[-1])
    assert "Bob: chatter line 299 about" in shown and "Cid: chatter line 298 about" in shown
