"""The hostile corpus through both local platform servers and the core, on the real model.

For every input: the bot stays up; the input is answered, refused politely, or ignored for a
documented reason (whitespace only); the normal users interleaved with it lose nothing (counted
in the database); no outgoing message is over the platform limit; no traceback reaches the log;
and no prompt carries a control token outside the chat template's own frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select

from adapters.discord import DiscordAdapter
from adapters.streaming import StreamLimits
from adapters.telegram import TelegramAdapter
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.local import LocalModel, special_token_check
from chat.commands import HANDLER_FAILED
from chat.core import ConversationCore
from chat.roleplay.characters import shipped_characters
from chat.settings import PlatformSettings, Settings
from storage import Store
from storage.schema import messages
from tests import hostile_corpus
from tests.conftest import FixedModels
from tests.fake_discord import (
    CHANNEL_NO_HOOKS,
    CHANNEL_WORK,
    GUILD,
    FakeDiscord,
    user,
)
from tests.fake_telegram import FakeTelegram
from tests.hostile_corpus import Case

pytestmark = pytest.mark.model

OWNER = 9000
NORMAL_USERS = 8
WAVE = 12  # hostile inputs per wave; a normal user's message follows every third one
OUR_LOGGERS = ("bot", "adapters", "storage", "ai_model", "telegram", "discord")


class Recorder:
    """The real model, with every prompt it is asked to continue recorded."""

    def __init__(self, model: LocalModel) -> None:
        self._model = model
        self.prompts: list[list[int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def stream(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> AsyncIterator[str]:
        self.prompts.append(list(tokens))
        return self._model.stream(tokens, *args, **kwargs)


def frame_violations(recorder: Recorder) -> list[int]:
    """Prompts whose control tokens are not exactly the template frame: (open close)* open."""
    llm = recorder.llama
    is_control = special_token_check(llm)
    open_id = llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    close_id = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    assert len(open_id) == 1 and len(close_id) == 1
    bad = []
    for n, prompt in enumerate(recorder.prompts):
        body = prompt[len(recorder.bos) :]
        controls = [t for t in body if is_control(t)]
        expected = [*(open_id + close_id) * (len(controls) // 2), *open_id]
        if controls != expected:
            bad.append(n)
    return bad


@pytest.fixture
def smollm(smollm_llama: Any) -> Iterator[LocalModel]:
    """The real embedded model behind a 2048-token window.

    Every bound scales with the window; a small one keeps each prompt's evaluation short on
    2 CPU cores, so the corpus runs in minutes while every input still reaches the model.
    """
    from ai_model.embedded import embedded_model_path
    from ai_model.local import llama_template

    template = llama_template(ModelSettings(), smollm_llama, embedded_model_path())
    # Four cached conversations, as the bot keeps by default: busy channels stay evaluated
    # while one-off DMs come and go.
    model = LocalModel(smollm_llama, "SmolLM2-135M-Instruct", template, 2048, cache_slots=4)
    yield model
    model._executor.shutdown(wait=True)
    model.slots.close()  # the shared llama.cpp instance gets its own context back


@pytest.fixture(scope="session")
def bombs() -> dict[str, bytes]:
    return {
        "bz2": hostile_corpus.zip_bomb(1 << 30),  # about 1 KB, inflating to 1 GB
        "deflate": hostile_corpus.zip_bomb(64 << 20, zipfile.ZIP_DEFLATED),
    }


async def hostile_core(
    settings: Settings, store: Store, smollm: LocalModel, platform: str
) -> tuple[Recorder, ConversationCore]:
    """The core with default fair-share limits, one owner, and short replies."""
    quick = ModelSettings(n_ctx=2048, sampling=SamplingSettings(max_tokens=12, seed=7))
    settings = replace(
        settings,
        owner_ids=frozenset({f"{platform}:{OWNER}"}),
        rate_limit=20,
        models={"character": quick, "office": quick},
    )
    model = Recorder(smollm)
    core = ConversationCore(settings, store, FixedModels({"office": model, "character": model}))
    await core.library.load()
    return model, core


async def settle(core: ConversationCore, activity: Callable[[], int], fetched: Callable[[], bool]):  # type: ignore[no-untyped-def]
    """Wait until every input was fetched, the core is idle and the server has been quiet."""
    deadline = time.monotonic() + 180
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = activity()
        busy = core.queues.busy_count() > 0
        if now != last or busy or not fetched():
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since > 0.6:
            return
    raise AssertionError("the bot did not settle within 3 minutes")


async def count_normal(store: Store) -> tuple[int, int]:
    """(normal users' messages stored, of those, how many have a stored answer)."""
    async with store.engine.connect() as conn:
        rows = (await conn.execute(select(messages))).all()
    asked = {r.id for r in rows if r.role == "user" and r.text.startswith("Normal message")}
    answered = {r.reply_to_id for r in rows if r.role == "assistant" and r.reply_to_id in asked}
    return len(asked), len(answered)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.exc_info and r.name.split(".")[0] in OUR_LOGGERS
    ]


async def check_the_rest(
    store: Store,
    sent_normal: int,
    caplog: pytest.LogCaptureFixture,
    model: Recorder,
    core: ConversationCore,
) -> None:
    """What holds whatever the platform: others' messages, the log, prompts, the library."""
    assert await count_normal(store) == (sent_normal, sent_normal)
    assert tracebacks(caplog) == []
    assert model.prompts and frame_violations(model) == []
    shipped = next(c for c in shipped_characters() if c.name == "Mira")
    assert core.characters.get("Mira").description == shipped.description


def report(platform: str, cases: list[Case], seconds: float) -> None:
    sizes = hostile_corpus.sizes(cases)
    print(f"\n{platform}: {len(cases)} hostile inputs in {seconds:.0f}s")
    for category, n in sorted(sizes.items()):
        print(f"  {n:4d}  {category}")


async def test_hostile_corpus_over_telegram(
    settings: Settings,
    store: Store,
    smollm: LocalModel,
    bombs: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    cases = hostile_corpus.build(bombs)
    assert len(cases) >= 200
    server = FakeTelegram()
    await server.start()
    model, core = await hostile_core(settings, store, smollm, "telegram")
    platform = PlatformSettings(token="123:TEST", api_base_url=server.base_url)
    adapter = TelegramAdapter(core, platform, poll_timeout=1, limits=StreamLimits(4096, 0.05, 10))
    task = asyncio.create_task(adapter.start())
    started = time.monotonic()
    try:
        await server.wait_for(lambda: "setMyCommands" in server.methods())
        chats: list[int] = []
        sent_normal = 0
        for i, case in enumerate(cases):
            chats.append(_push_telegram(server, i, case))
            if i % 3 == 2:
                who = 500 + sent_normal % NORMAL_USERS
                text = f"Normal message {sent_normal} @lantern_bot"
                server.push(-who, who, f"Norma{who}", text)  # each in a group of their own
                sent_normal += 1
            if i % WAVE == WAVE - 1 or i == len(cases) - 1:
                await settle(
                    core,
                    lambda: len(server.calls),
                    lambda: server.confirmed >= server.last_update_id,
                )
                assert not task.done(), "the adapter stopped"
        for case, chat in zip(cases, chats, strict=True):
            got = server.bot_messages(chat)
            if case.kind == "whitespace":
                assert not got, f"{case.category}: whitespace got a reply"
                continue
            assert got, f"{case.category}: no reply to {case.text[:40]!r} ({case.filename})"
            assert all(m.text != "…" and HANDLER_FAILED not in m.text for m in got), case.category
        assert server.too_long == []
        assert all(len(m.text) <= 4096 for m in server.sent)
        await check_the_rest(store, sent_normal, caplog, model, core)
        report("telegram", cases, time.monotonic() - started)
    finally:
        await adapter.stop()
        await asyncio.wait_for(task, 20)
        await server.stop()


def _push_telegram(server: FakeTelegram, i: int, case: Case) -> int:
    """Send ``case`` into a chat of its own; return the chat's id."""
    if case.kind == "card":
        uploader = OWNER if case.owner else 30_000 + i
        chat = -(20_000 + i) if case.owner else uploader
        file_id = f"f{i}"
        server.files[file_id] = case.card
        document = {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "file_name": case.filename,
            "file_size": len(case.card),
        }
        server.push(chat, uploader, case.name, "/character import", extra={"document": document})
        return chat
    uid = 10_000 + i
    # Commands alternate between a private chat and a group of their own.
    chat = -(10_000 + i) if case.kind == "command" and i % 2 else uid
    server.push(chat, uid, case.name, case.text)
    return chat


async def test_hostile_corpus_over_discord(
    settings: Settings,
    store: Store,
    smollm: LocalModel,
    bombs: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    cases = hostile_corpus.build(bombs)
    server = FakeDiscord()
    await server.start()
    model, core = await hostile_core(settings, store, smollm, "discord")
    platform = PlatformSettings(token="TEST", api_base_url=server.api_url, guild_id=int(GUILD))
    adapter = DiscordAdapter(core, platform, limits=StreamLimits(2000, 0.05, 10))
    task = asyncio.create_task(adapter.start())
    started = time.monotonic()
    try:
        await asyncio.wait_for(adapter.ready.wait(), 20)
        outcomes: list[Callable[[], bool]] = []
        sent_normal = 0
        for i, case in enumerate(cases):
            outcomes.append(await _push_discord(server, i, case))
            if i % 3 == 2:
                who = str(500 + sent_normal % NORMAL_USERS)
                author = user(who, f"Norma{who}")
                await server.say(
                    CHANNEL_NO_HOOKS, author, f"Normal message {sent_normal}", mention_bot=True
                )
                sent_normal += 1
            if i % WAVE == WAVE - 1 or i == len(cases) - 1:
                await settle(core, lambda: len(server.requests), lambda: True)
                assert not task.done(), "the adapter stopped"
        for case, answered in zip(cases, outcomes, strict=True):
            if case.kind == "whitespace":
                assert not answered(), f"{case.category}: whitespace got a reply"
            else:
                assert answered(), f"{case.category}: no reply to {case.text[:40]!r}"
        assert server.too_long == []
        assert all(len(p.content) <= 2000 for p in server.posted)
        assert all("went wrong on my side" not in p.content for p in server.posted)
        await check_the_rest(store, sent_normal, caplog, model, core)
        report("discord", cases, time.monotonic() - started)
    finally:
        await adapter.stop()
        await asyncio.wait_for(task, 20)
        await server.stop()


async def _push_discord(server: FakeDiscord, i: int, case: Case) -> Callable[[], bool]:
    """Send ``case``; return a check of whether the bot answered it."""
    if case.kind == "card":
        uid = str(OWNER) if case.owner else str(30_000 + i)
        aid, attachment = server.attachment(case.filename, case.card)
        option = [
            {"type": 1, "name": "import", "options": [{"type": 11, "name": "card", "value": aid}]}
        ]
        token = await server.command(
            CHANNEL_WORK,
            user(uid, case.name),
            "character",
            option,
            resolved={"attachments": {aid: attachment}},
        )
        return lambda: any(p.content for p in server.responses(token))
    author = user(str(10_000 + i), case.name)
    if case.kind == "command" and case.text.startswith("/character ") and i % 2:
        # Slash-command options are free text: the name goes straight to the handler.
        name = case.text.removeprefix("/character ")
        options = [
            {"type": 1, "name": "set", "options": [{"type": 3, "name": "name", "value": name}]}
        ]
        token = await server.command(CHANNEL_WORK, author, "character", options)
        return lambda: bool(server.responses(token))
    # Every other input in a DM of its own (a bare mention is a message to the bot, so
    # whitespace-only is tried where no mention is needed).
    channel = f"3{i:05d}" if i % 2 or case.kind == "whitespace" else CHANNEL_WORK
    mid = await server.say(channel, author, case.text, mention_bot=channel == CHANNEL_WORK)
    return lambda: any(p.reference == mid for p in server.posted)
