"""Telegram by webhook: the real python-telegram-bot client, updates POSTed by the local Bot API
server the way Telegram does (tests/fake_webhook.py), redelivered until answered."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from adapters.streaming import StreamLimits
from adapters.telegram import TelegramAdapter
from chat.core import ConversationCore
from chat.settings import PlatformSettings, Settings
from storage import Store
from tests.conftest import FixedModels
from tests.fake_telegram import FakeTelegram
from tests.scripted import ScriptedModel
from tests.waiting import free_port

SECRET = "hook-Secret_42"
URL = "https://bot.example.org/telegram/hook"
DM = 501

Start = Callable[..., Any]


@pytest.fixture
async def start(telegram: FakeTelegram, settings: Settings, store: Store) -> AsyncIterator[Start]:
    running: list[tuple[TelegramAdapter, asyncio.Task[None]]] = []
    port = free_port()
    telegram.webhook.forward_to = f"http://127.0.0.1:{port}"

    async def begin(webhook: bool = True) -> tuple[TelegramAdapter, ScriptedModel]:
        model = ScriptedModel(["Here you go."])
        core = ConversationCore(settings, store, FixedModels({"office": model, "character": model}))
        platform = PlatformSettings(
            token="123:TEST",
            api_base_url=telegram.base_url,
            webhook_url=URL if webhook else None,
            listen=f"127.0.0.1:{port}",
            webhook_secret=SECRET if webhook else None,
        )
        adapter = TelegramAdapter(
            core, platform, poll_timeout=1, limits=StreamLimits(4096, 0.05, 10)
        )
        task = asyncio.create_task(adapter.start())
        running.append((adapter, task))
        await telegram.wait_for(lambda: adapter.connected, within=20)
        return adapter, model

    yield begin
    for adapter, task in running:
        await adapter.stop()
        await asyncio.wait_for(task, 10)


async def user_texts(store: Store, text: str) -> int:
    conv = await store.conversations.get_or_create("telegram", f"telegram:{DM}")
    return sum(m.text == text for m in await store.messages.history(conv.id))


async def test_an_update_redelivered_after_a_timeout_is_stored_once_and_answered_once(
    telegram: FakeTelegram, start: Start, store: Store, settings: Settings
) -> None:
    _adapter, model = await start()
    assert telegram.webhook.url == URL and telegram.webhook.secret == SECRET
    await store.conversations.get_or_create("telegram", f"telegram:{DM}")  # only the message waits
    # Storing takes longer than Telegram waits for the webhook's answer: another process
    # holds the database's write lock for 3 s.  Telegram gives up after 1 s and sends again.
    telegram.webhook.timeout_s = 1.0
    path = settings.database_url.split("///", 1)[1]
    locked, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with sqlite3.connect(path, isolation_level=None) as other:
            other.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(3)
            other.execute("COMMIT")

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    await asyncio.to_thread(locked.wait)
    telegram.push(DM, DM, "Ann", "What is on the agenda?")
    update_id = telegram.last_update_id
    await telegram.wait_for(lambda: update_id in telegram.webhook.acked, within=30)
    holder.join()
    statuses = [d.status for d in telegram.webhook.deliveries if d.update_id == update_id]
    assert statuses[0] is None and statuses[-1] == 200  # timed out, then answered
    await telegram.wait_for(lambda: telegram.bot_messages(DM))
    await asyncio.sleep(0.5)
    assert await user_texts(store, "What is on the agenda?") == 1
    # The slow-storage notice, then one answer.
    assert [m.text for m in telegram.bot_messages(DM)][-1:] == ["Here you go."]
    assert sum(m.text == "Here you go." for m in telegram.bot_messages(DM)) == 1
    assert len(model.prompts) == 1


async def test_a_wrong_or_missing_secret_gets_403_and_nothing_is_stored(
    telegram: FakeTelegram, start: Start, store: Store
) -> None:
    await start()
    telegram.webhook.send_secret = "not-the-secret"
    telegram.push(DM, DM, "Mallory", "Pretend to be Telegram")
    update_id = telegram.last_update_id
    await telegram.wait_for(
        lambda: sum(d.update_id == update_id for d in telegram.webhook.deliveries) >= 2
    )
    assert {d.status for d in telegram.webhook.deliveries} == {403}
    body = {"update_id": 99, "message": {"message_id": 1, "date": 0, "chat": {"id": DM}}}
    async with (
        aiohttp.ClientSession() as http,
        http.post(telegram.webhook.target(), json=body) as no_secret,
    ):
        assert no_secret.status == 403
    assert await user_texts(store, "Pretend to be Telegram") == 0
    assert not telegram.bot_messages(DM)
    # With the right secret, the same update goes through.
    telegram.webhook.send_secret = None
    await telegram.wait_for(lambda: update_id in telegram.webhook.acked, within=20)
    await telegram.wait_for(lambda: telegram.bot_messages(DM))
    assert await user_texts(store, "Pretend to be Telegram") == 1


async def test_updates_sent_while_the_bot_is_down_arrive_after_the_restart(
    telegram: FakeTelegram, start: Start, store: Store
) -> None:
    first, _ = await start()
    await first.stop()
    telegram.push(DM, DM, "Ann", "Are you there?")
    update_id = telegram.last_update_id
    await telegram.wait_for(
        lambda: any(d.update_id == update_id for d in telegram.webhook.deliveries)
    )
    assert update_id not in telegram.webhook.acked  # refused, so Telegram keeps it
    await start()
    await telegram.wait_for(lambda: telegram.bot_messages(DM), within=30)
    assert await user_texts(store, "Are you there?") == 1


async def test_switching_back_to_polling_deletes_the_webhook(
    telegram: FakeTelegram, start: Start, store: Store
) -> None:
    hooked, _ = await start()
    await hooked.stop()
    telegram.push(DM, DM, "Ann", "Polling now?")
    await start(webhook=False)
    assert "deleteWebhook" in telegram.methods() and not telegram.webhook.active
    await telegram.wait_for(lambda: telegram.bot_messages(DM), within=30)
    assert await user_texts(store, "Polling now?") == 1
