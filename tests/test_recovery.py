"""Start-up recovery and duplicate deliveries, in process: the Telegram adapter on a real
SQLite file, the local Telegram server and a scripted model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from adapters.streaming import StreamLimits
from adapters.telegram import TelegramAdapter
from chat.core import ConversationCore
from chat.recovery import OFFLINE
from chat.settings import PlatformSettings, Settings
from storage import Store
from storage.records import RECEIVED, USER
from storage.schema import messages
from tests.conftest import FixedModels
from tests.fake_telegram import FakeTelegram
from tests.scripted import ScriptedModel

Start = Callable[..., Any]


@pytest.fixture
async def start_bot(
    telegram: FakeTelegram, settings: Settings, store: Store
) -> AsyncIterator[Start]:
    """Starts the adapter (again, after a "restart", on the same database)."""
    running: list[tuple[TelegramAdapter, asyncio.Task[None]]] = []

    async def start(**changes: Any) -> tuple[TelegramAdapter, ScriptedModel]:
        for adapter, task in running:
            await adapter.stop()
            await asyncio.wait_for(task, 10)
        running.clear()
        model = ScriptedModel(["Here you go."])
        core = ConversationCore(replace(settings, **changes), store, FixedModels({"office": model}))
        platform = PlatformSettings(token="123:TEST", api_base_url=telegram.base_url)
        adapter = TelegramAdapter(
            core, platform, poll_timeout=1, limits=StreamLimits(4096, 0.05, 10)
        )
        running.append((adapter, asyncio.create_task(adapter.start())))
        await asyncio.wait_for(adapter.recovered.wait(), 20)
        return adapter, model

    yield start
    for adapter, task in running:
        await adapter.stop()
        await asyncio.wait_for(task, 10)


async def unanswered(store: Store, chat: int, text: str, age: timedelta) -> int:
    """A message stored ``age`` ago whose answer never came (a crash right after storing)."""
    conv = await store.conversations.get_or_create("telegram", f"telegram:{chat}")
    platform_id = str(abs(chat) * 10 + len(text))
    message_id = await store.messages.add(
        conv.id,
        USER,
        text,
        author_id=str(chat),
        author_name="Ann",
        platform_message_id=platform_id,
        reply_state=RECEIVED,
    )
    when = datetime.now(UTC) - age
    async with store.engine.begin() as conn:
        await conn.execute(
            update(messages).where(messages.c.id == message_id).values(created_at=when)
        )
    return message_id


async def states(store: Store) -> dict[str, tuple[str | None, str | None]]:
    query = select(messages.c.text, messages.c.reply_state, messages.c.reply_error).where(
        messages.c.role == USER
    )
    async with store.engine.connect() as conn:
        return {r.text: (r.reply_state, r.reply_error) for r in await conn.execute(query)}


async def test_recent_messages_are_answered_and_older_ones_get_one_notice_per_chat(
    start_bot: Start, telegram: FakeTelegram, store: Store
) -> None:
    await unanswered(store, 601, "old one", timedelta(hours=3))
    await unanswered(store, 601, "old two", timedelta(hours=2))
    await unanswered(store, 602, "old three", timedelta(days=2))
    await unanswered(store, 603, "recent", timedelta(minutes=20))
    await start_bot()
    await telegram.wait_for(lambda: all(telegram.bot_messages(c) for c in (601, 602, 603)))
    await asyncio.sleep(0.3)
    (notice,) = telegram.bot_messages(601)  # one notice, quoting the newest of the two
    assert notice.text == OFFLINE and notice.reply_to == 6017
    assert [m.text for m in telegram.bot_messages(602)] == [OFFLINE]
    (answer,) = telegram.bot_messages(603)
    assert answer.text == "Here you go." and answer.reply_to == 6036  # quotes the message
    assert await states(store) == {
        "old one": ("failed", "offline"),
        "old two": ("failed", "offline"),
        "old three": ("failed", "offline"),
        "recent": ("answered", None),
    }
    sent = len(telegram.sent)
    await start_bot()  # nothing is left to finish: a restart sends nothing
    await asyncio.sleep(0.5)
    assert len(telegram.sent) == sent


async def test_older_messages_are_skipped_quietly_when_notices_are_off(
    start_bot: Start, telegram: FakeTelegram, store: Store
) -> None:
    await unanswered(store, 611, "old", timedelta(hours=2))
    await unanswered(store, 612, "recent", timedelta(minutes=59))
    await start_bot(offline_notice=False, recover_window=1800)  # 30 minutes
    await asyncio.sleep(0.5)
    assert not telegram.sent
    assert await states(store) == {"old": ("failed", "offline"), "recent": ("failed", "offline")}


async def test_a_message_reset_since_is_not_answered_after_a_restart(
    start_bot: Start, telegram: FakeTelegram, store: Store
) -> None:
    await unanswered(store, 621, "before the reset", timedelta(minutes=5))
    conv = await store.conversations.get_or_create("telegram", "telegram:621")
    await store.conversations.reset(conv.id)
    await start_bot()
    await asyncio.sleep(0.5)
    assert not telegram.bot_messages(621)
    assert await states(store) == {"before the reset": ("failed", "reset")}


async def test_a_message_delivered_twice_is_stored_and_answered_once(
    start_bot: Start, telegram: FakeTelegram, store: Store
) -> None:
    await start_bot()
    message_id = telegram.push(631, 631, "Ann", "Only once, please.")
    await telegram.wait_for(lambda: telegram.bot_messages(631))
    telegram.redeliver(message_id)  # Telegram sends it again (a confirmation was lost)
    await telegram.wait_for(lambda: telegram.confirmed >= telegram.last_update_id)
    await asyncio.sleep(0.3)
    assert [m.text for m in telegram.bot_messages(631)] == ["Here you go."]
    assert await states(store) == {"Only once, please.": ("answered", None)}
