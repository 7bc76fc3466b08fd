"""Memory beyond the window: summaries that follow the trims, pinned facts, and edits and
deletions reaching the prompt, on a scripted model and on the real embedded one."""

from __future__ import annotations

import asyncio
import contextlib
import html
import itertools
import logging
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ai_model.config import ModelSettings, SamplingSettings
from ai_model.registry import ModelRegistry
from ai_model.sampling import Grammar
from chat.core import ConversationCore
from chat.messages import IncomingMessage, ReplyKind
from chat.prompt.memory import MAX_CHUNKS_PER_JOB, next_boundary
from chat.prompt.window import Turn, Window
from chat.settings import Settings
from storage import Store
from storage.records import ASSISTANT, USER
from tests.conftest import FixedModels, record_prompts
from tests.scripted import ScriptedModel
from tests.test_core import text_of
from tests.test_window import sentence

KEY = "console:story"
SUMMARY_HEAD = "Summary of the conversation before the messages below:\n"


class Tracking(ScriptedModel):
    """A scripted model that streams several generations at once (no turn lock), and
    records which conversations had a reply and a summary generating at the same time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turn = contextlib.nullcontext()  # type: ignore[assignment]
        self.active: dict[str, int] = {"reply": 0, "summary": 0}
        self.overlaps = 0
        self.summary_prompts: list[str] = []

    async def stream(  # type: ignore[override]
        self,
        tokens: Sequence[int],
        sampling: SamplingSettings,
        stop: Sequence[str] = (),
        slot: str | None = None,
        background: bool = False,
        grammar: Grammar | None = None,
    ) -> AsyncIterator[str]:
        kind = "reply" if slot is not None else "summary"
        if kind == "summary":
            self.summary_prompts.append(text_of(tokens))
        self.active[kind] += 1
        try:
            async for piece in super().stream(tokens, sampling, stop, slot):
                self.overlaps += self.active["reply"] > 0 and self.active["summary"] > 0
                yield piece
        finally:
            self.active[kind] -= 1


def script(prompt: Sequence[int]) -> str:
    text = text_of(prompt)
    if "Shorten this summary" in text:
        return "SUMMARY short " + " ".join(f"s{i}" for i in range(10))
    if "You keep the minutes" in text:
        # The first summary is too long for its budget: the job has it shortened.
        long = "Summary so far:\n(nothing yet)" in text
        return "SUMMARY " + " ".join(f"fact{i}" for i in range(80 if long else 20))
    return "Noted, " + " ".join(f"w{i}" for i in range(12))


async def test_summaries_follow_the_trims_and_never_run_beside_a_reply(
    settings: Settings, store: Store
) -> None:
    model = Tracking(script, n_ctx=2048, delay=0.002)
    sampling = SamplingSettings(max_tokens=64)
    models = {r: replace(m, sampling=sampling) for r, m in settings.models.items()}
    core = ConversationCore(
        replace(settings, models=models), store, FixedModels({"office": model, "character": model})
    )
    budget = int(2048 * settings.memory_budget)
    rng = random.Random(5)
    starts, pinned = [], []
    for turn in range(60):
        msg = IncomingMessage("console", KEY, "u1", "Ann", sentence(rng, 25), is_dm=True)
        replies = [r async for r in core.answers.respond(msg)]
        assert replies[-1].kind is ReplyKind.ANSWER
        conv = await core.conversations.get("console", KEY)
        starts.append(conv.window_start_id)
        pinned.append(conv.settings.get("summary_id"))
        if turn % 3 == 0:
            await core.memory.settle(KEY)  # the user pauses: the job finishes
        elif turn % 3 == 1:
            # The next message arrives while the summary is being written: it stops, and
            # the reply does not wait for it.
            core.memory.hurry(KEY)
            for _ in range(100):
                if model.active["summary"]:
                    break
                await asyncio.sleep(0.005)
    await core.memory.close()

    assert model.overlaps == 0
    assert core.memory.summaries_written >= 3
    assert any("Shorten this summary" in p for p in model.summary_prompts)
    found = await store.summaries.of((await core.conversations.get("console", KEY)).id)
    assert all(s.token_count <= budget for s in found)
    # Each pinned summary covers only what the window no longer shows.
    for summary_id, start in zip(pinned, starts, strict=True):
        if summary_id is not None:
            summary = next((s for s in found if s.id == summary_id), None)
            assert summary is None or summary.last_id < start
    jobs = ("You keep the minutes", "Shorten this summary")
    replies = [p for p in model.prompts if not any(j in text_of(p) for j in jobs)]
    assert len(replies) == len(starts)
    assert any(SUMMARY_HEAD + "SUMMARY" in text_of(p) for p in replies)
    # The summary changes only where the window moves: no more prompt fronts change than trims.
    trims = sum(a != b for a, b in itertools.pairwise(starts))
    system = len(replies[0]) // 4
    breaks = sum(
        p[:system] != q[:system] or _front_moved(p, q) for p, q in itertools.pairwise(replies)
    )
    assert trims >= 3 and breaks <= trims, (breaks, trims)
    assert all(len(p) + 64 <= 2048 for p in replies)


def _front_moved(before: Sequence[int], after: Sequence[int]) -> bool:
    """Whether ``after`` no longer starts with most of ``before`` (the cache is lost)."""
    keep = len(before) - 16  # the reply cue and the end of the last turn may differ
    return list(after[:keep]) != list(before[:keep])


def test_next_boundary_ends_on_a_whole_exchange() -> None:
    def turn(position: int, message_id: int, size: int) -> Turn:
        return Turn(position, message_id, tuple(range(size)))

    turns = (turn(1, 1, 30), turn(1, 2, 30), turn(3, 3, 30), turn(3, 4, 30), turn(5, 5, 30))
    assert next_boundary(Window(turns, 1, False), budget=200) == 1  # 25% = 50 tokens
    assert next_boundary(Window(turns, 1, False), budget=400) == 3
    assert next_boundary(Window(turns[:2], 1, False), budget=400) is None


async def test_a_30000_token_conversation_on_the_real_model_keeps_a_pinned_summary(
    settings: Settings, store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chat.prompt.memory")
    small = ModelSettings(
        n_ctx=1024,
        state_dir=str(tmp_path / "states"),
        sampling=SamplingSettings(max_tokens=24, seed=1),
    )
    registry = ModelRegistry({"office": small, "character": small})
    model = await registry.get("office")
    prompts = record_prompts(model)
    core = ConversationCore(
        replace(settings, models={"office": small, "character": small}), store, registry
    )
    try:
        # 30,000 tokens stored before the bot answered any of it (say, from before an upgrade).
        conv = await core.conversations.get("console", KEY)
        rng = random.Random(3)
        total = 0
        for n in itertools.count():
            text = sentence(rng, 60)
            if n % 2 == 0:
                asked = await store.messages.add(conv.id, USER, text, author_name="Ann")
            else:
                await store.messages.add(conv.id, ASSISTANT, text, reply_to_id=asked)
            total += len(model.tokenize(text.encode(), False, False))
            if total >= 30_000:
                break
        await core.steering.remember("console", KEY, "The ship is called Kestrel.")
        summary = None
        for _ in range(12):
            msg = IncomingMessage("console", KEY, "u1", "Ann", sentence(rng, 40), is_dm=True)
            replies = [r async for r in core.answers.respond(msg)]
            assert replies[-1].final and replies[-1].kind is ReplyKind.ANSWER, replies[-1].text
            await core.memory.settle(KEY)
            conv = await core.conversations.get("console", KEY)
            if conv.settings.get("summary_id") is not None and summary is not None:
                break  # pinned, and a prompt was built with it
            if conv.settings.get("summary_id") is not None:
                summary = await core.memory.pinned(
                    KEY, conv.id, conv.reset_after_id, conv.settings["summary_id"]
                )
        assert summary is not None, "no summary was pinned"
        budget = int(1024 * settings.memory_budget)
        assert 0 < summary.token_count <= budget
        assert summary.last_id < conv.window_start_id
        shown = model.detokenize(prompts[-1])  # type: ignore[attr-defined]
        assert summary.text[-40:] in shown  # pinned after the system part
        assert "1. The ship is called Kestrel." in shown  # /remember reaches the prompt
        assert all(len(p) + 24 <= 1024 for p in prompts)
        # The backlog was bounded: at most a few chunks were summarized for one job.
        assert core.memory.summaries_written <= 3
        assert MAX_CHUNKS_PER_JOB <= 4
        skipped = [r.getMessage() for r in caplog.records if "are skipped" in r.getMessage()]
        assert skipped, "the backlog was not bounded"  # the oldest chunks were left out
    finally:
        await core.memory.close()
        registry.close()


async def test_edits_and_deletions_reach_the_real_model_and_keep_the_prefix_before_them(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    small = ModelSettings(
        n_ctx=1024,
        state_dir=str(tmp_path / "states"),
        sampling=SamplingSettings(max_tokens=16, temperature=0.0),
    )
    registry = ModelRegistry({"office": small, "character": small})
    model = await registry.get("office")
    prompts: list[str] = []
    original = model.stream

    def recording(tokens, sampling, stop=(), slot=None, background=False, grammar=None):  # type: ignore[no-untyped-def]
        prompts.append(model.detokenize(tokens))  # type: ignore[attr-defined]
        return original(tokens, sampling, stop, slot, background, grammar)

    model.stream = recording  # type: ignore[method-assign]
    core = ConversationCore(
        replace(settings, models={"office": small, "character": small}), store, registry
    )
    texts = [
        "The meeting is on Monday in room four.",
        "Our budget is three thousand euros.",
        "Ignore this line, it is a typo.",
        "Please list what we agreed.",
    ]
    try:
        for i, text in enumerate(texts[:3]):
            msg = IncomingMessage("console", KEY, "u1", "Ann", text, True, True, str(100 + i))
            _ = [r async for r in core.answers.respond(msg)]
        followed = [
            r async for r in core.edits.edited("console", KEY, "101", "Our budget is 4,500.")
        ]
        assert followed == []  # an answered message is not answered again
        assert await core.edits.deleted("console", KEY, ["102"])
        assert not await core.edits.deleted("console", KEY, ["999"])
        msg = IncomingMessage("console", KEY, "u1", "Ann", texts[3], True, True, "103")
        _ = [r async for r in core.answers.respond(msg)]
        admission = model.scheduler.admissions[-1]  # type: ignore[attr-defined]
        prompt = core.prompts.encoder(model)
        conv = await core.conversations.get("console", KEY)
        history = await store.messages.history(conv.id)
        asked = [m.text for m in history if m.role == USER]
        assert asked == [texts[0], "Our budget is 4,500.", texts[3]]  # edited, one deleted
        assert "user\nOur budget is 4,500." in prompts[-1]
        assert "user\nOur budget is three thousand" not in prompts[-1]
        assert "user\nIgnore this line" not in prompts[-1]
        # llama.cpp kept the cached prefix up to the edited message and recomputed the rest.
        before = len(model.bos) + len(prompt.system(settings.system_prompt))
        before += sum(len(prompt.turn(m).tokens) for m in history[:2])
        assert before <= admission.reused < before + 12, (admission, before)
    finally:
        registry.close()


async def test_continue_lengthens_the_same_telegram_message_and_the_note_sits_at_its_depth(
    telegram: Any, settings: Settings, store: Store, tmp_path: Path
) -> None:
    from adapters.streaming import StreamLimits
    from adapters.telegram import TelegramAdapter
    from chat.settings import PlatformSettings

    small = ModelSettings(
        n_ctx=1024,
        state_dir=str(tmp_path / "states"),
        sampling=SamplingSettings(max_tokens=20, temperature=0.0, seed=1),
    )
    registry = ModelRegistry({"office": small, "character": small})
    model = await registry.get("office")
    prompts: list[list[int]] = []
    original = model.stream

    def recording(tokens, sampling, stop=(), slot=None, background=False, grammar=None):  # type: ignore[no-untyped-def]
        prompts.append(list(tokens))
        return original(tokens, sampling, stop, slot, background, grammar)

    model.stream = recording  # type: ignore[method-assign]
    core = ConversationCore(
        replace(settings, models={"office": small, "character": small}), store, registry
    )
    platform = PlatformSettings(token="123:TEST", api_base_url=telegram.base_url)
    adapter = TelegramAdapter(core, platform, poll_timeout=1, limits=StreamLimits(4096, 0.05, 10))
    task = asyncio.create_task(adapter.start())
    chat = 777
    try:
        await telegram.wait_for(lambda: "setMyCommands" in telegram.methods())
        for i, text in enumerate(["Hello.", "I run a bakery.", "It is called Crumbs."]):
            telegram.push(chat, chat, "Ann", text)
            await telegram.wait_for(lambda i=i: len(telegram.bot_messages(chat)) == i + 1)
        telegram.push(chat, chat, "Ann", "/note Answer like a pirate.")
        await telegram.wait_for(lambda: len(telegram.bot_messages(chat)) == 4)
        assert "Author's note set" in telegram.bot_messages(chat)[-1].text
        telegram.push(chat, chat, "Ann", "Write a long story about my bakery.")
        await telegram.wait_for(lambda: len(telegram.bot_messages(chat)) == 5)
        reply = telegram.bot_messages(chat)[-1]
        await telegram.wait_for(lambda: reply.parse_mode == "HTML")  # the final edit
        shown = model.detokenize(prompts[-1])  # type: ignore[attr-defined]
        note_at = shown.index("[Author's note: Answer like a pirate.]")
        # Four messages from the end: a reply, a message, a reply and the newest message.
        lines = shown[note_at:].split("\n")
        assert lines.count("user") == 2 and lines.count("assistant") == 3  # with the cue
        assert "It is called Crumbs." in shown[note_at:]
        assert "I run a bakery." in shown[:note_at]

        before = html.unescape(reply.text)
        edits = len(reply.edits)
        telegram.push(chat, chat, "Ann", "/continue")
        await telegram.wait_for(lambda: len(reply.edits) > edits + 1 and reply.parse_mode == "HTML")
        await asyncio.sleep(0.2)
        assert len(telegram.bot_messages(chat)) == 5  # the same message grew: none was added
        after = html.unescape(reply.text)
        assert after.startswith(before[:20]) and len(after) > len(before)
        conv = await core.conversations.get("telegram", f"telegram:{chat}")
        stored = [m for m in await store.messages.history(conv.id) if m.role == ASSISTANT][-1]
        assert stored.text == after
        # No new turn: the continuation ran on the reply's own prompt and cached tokens.
        admission = model.scheduler.admissions[-1]  # type: ignore[attr-defined]
        assert admission.computed <= 2, admission
    finally:
        await adapter.stop()
        await asyncio.wait_for(task, 10)
        await core.memory.close()
        registry.close()


async def test_summarize_map_reduces_what_does_not_fit_and_streams_the_result(
    settings: Settings, store: Store
) -> None:
    def summarizer(prompt: Sequence[int]) -> str:
        text = text_of(prompt)
        if "Merge these notes" in text:
            return "FINAL: " + " ".join(f"point{i}" for i in range(30))
        if "Summarize this part" in text:
            return "- a note"
        return "Fine."

    model = ScriptedModel(summarizer, n_ctx=1400, delay=0.001)
    core = ConversationCore(settings, store, FixedModels({"office": model, "character": model}))
    conv = await core.conversations.get("console", KEY)
    rng = random.Random(9)
    for _ in range(3):
        await store.messages.add(conv.id, USER, sentence(rng, 10), author_name="Ann")
    msg = IncomingMessage("console", KEY, "u1", "Ann", "hello", is_dm=True)
    _ = [r async for r in core.answers.respond(msg)]
    for i in range(40):  # what the user missed: more than one window's worth
        await store.messages.add(conv.id, USER, f"{i}: " + sentence(rng, 12), author_name="Bob")

    replies = [r async for r in core.summaries.summarize("console", KEY, True, "u1")]
    assert replies[-1].final and replies[-1].text.startswith("FINAL: point0")
    assert len([r for r in replies if not r.final]) > 3  # streamed
    maps = [text_of(p) for p in model.prompts if "Summarize this part" in text_of(p)]
    assert len(maps) >= 2  # the messages did not fit one window: mapped in chunks
    covered = "".join(maps)
    assert all(f"Bob: {i}: " in covered for i in range(40))
    assert "hello" not in covered  # only what came after my last reply
    assert all(len(p) + 400 <= 1400 for p in model.prompts)

    replies = [r async for r in core.summaries.summarize("console", KEY, True, "u1", "2")]
    last_map = text_of(model.prompts[-1])
    assert "Bob: 39: " in last_map and "Bob: 37: " not in last_map  # the last two only
    refused = [r async for r in core.summaries.summarize("console", KEY, True, "u1", "9999")]
    assert refused[-1].kind is ReplyKind.NOTICE
    await core.actions.set_mode("console", KEY, "roleplay")
    refused = [r async for r in core.summaries.summarize("console", KEY, True, "u1")]
    assert "work conversations" in refused[-1].text


async def test_fact_limits_and_regenerate_on_edit(settings: Settings, store: Store) -> None:
    model = ScriptedModel(["First answer.", "Second answer."])
    core = ConversationCore(
        replace(settings, regenerate_on_edit=True),
        store,
        FixedModels({"office": model, "character": model}),
    )
    assert "Tell me what" in await core.steering.remember("console", KEY, "   ")
    assert "too long" in await core.steering.remember("console", KEY, "x" * 301)
    for i in range(20):
        assert f"(fact {i + 1})" in await core.steering.remember(
            "console", KEY, f"fact <|im_end|> {i}"
        )
    assert "20 facts" in await core.steering.remember("console", KEY, "one more")
    assert "already remember" in await core.steering.remember("console", KEY, "fact <|im_end|> 3")
    assert "from 1 to 20" in await core.steering.forget_fact("console", KEY, "21")
    assert "from 1 to 20" in await core.steering.forget_fact("console", KEY, "two")
    assert await core.steering.forget_fact("console", KEY, "1") == "Forgotten: fact <|im_end|> 0"
    assert "too long" in await core.steering.set_note("console", KEY, "y" * 501)
    assert "Persona set" in await core.steering.set_persona(
        "console", KEY, "u1", "Zed: a " + "z" * 10
    )
    assert "too long" in await core.steering.set_persona("console", KEY, "u1", "z" * 501)

    msg = IncomingMessage("console", KEY, "u1", "Ann", "What is two and two?", True, True, "m1")
    _ = [r async for r in core.answers.respond(msg)]
    # A fact is plain text to the model: its markup-looking text is never a control token.
    assert "fact <|im_end|> 5" in text_of(model.prompts[-1])  # control ids would show as ¦
    report = await core.steering.report("console", KEY)
    assert "19. fact <|im_end|> 19" in report

    # regenerate_on_edit: editing the message the last reply answers writes it again.
    rewritten = [r async for r in core.edits.edited("console", KEY, "m1", "And three?")]
    assert rewritten[-1].final and rewritten[-1].text == "Second answer."
    assert "user\nAnd three?" in text_of(model.prompts[-1])
    # An edit to text with nothing in it is ignored.
    assert [r async for r in core.edits.edited("console", KEY, "m1", "   ")] == []


def test_summary_chunks_count_what_is_sent_joins_included(smollm: Any) -> None:
    from chat.prompt.memory import chunk_lines

    rng = random.Random(4)
    # Short chat lines, the case where the newlines between them weigh most.
    lines = [
        f"{rng.choice(['Ann', 'Bob'])}: {rng.choice(['ok', 'yes', 'no', 'hm'])}"
        for _ in range(3000)
    ]
    room = 500
    chunks = chunk_lines(smollm, lines, room)
    assert sum(len(c) for c in chunks) == len(lines)
    for chunk in chunks:
        sent = smollm.tokenize("\n".join(chunk).encode(), add_bos=False, special=False)
        assert len(sent) <= room, len(sent)
