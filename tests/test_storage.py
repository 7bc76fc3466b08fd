"""Storage on a real SQLite file and a real PostgreSQL: migrations, persistence, ordering,
reset, reply states, and two processes writing at once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from storage import Store, open_database
from storage.migrations import MIGRATIONS
from storage.records import ANSWERING, ASSISTANT, RECEIVED, USER
from tests.conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Every test here that uses the database runs on SQLite and on PostgreSQL."""
    return str(request.param)


async def test_migrations_run_once_in_order_and_enable_wal(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'nested' / 'bot.db'}"
    for _ in range(2):  # the second start finds everything applied
        engine = await open_database(url)
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT version, name FROM schema_migrations"))).all()
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
            tables = {
                r[0]
                for r in await conn.execute(
                    text("SELECT name FROM sqlite_master WHERE type='table'")
                )
            }
        await engine.dispose()
        assert [tuple(r) for r in rows] == [(m.version, m.name) for m in MIGRATIONS]
        assert mode == "wal"
        assert {"conversations", "messages", "schema_migrations"} <= tables


async def test_messages_survive_reopening_the_database(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    store = Store(await open_database(url))
    conv = await store.conversations.get_or_create("discord", "discord:42")
    await store.conversations.set_mode(conv.id, "roleplay")
    first = await store.messages.add(
        conv.id, USER, "hello", author_id="7", author_name="Ann", platform_message_id="m1"
    )
    await store.messages.add(conv.id, ASSISTANT, "hi Ann", reply_to_id=first, token_count=3)
    await store.close()

    store = Store(await open_database(url))
    again = await store.conversations.get_or_create("discord", "discord:42")
    history = await store.messages.history(again.id)
    await store.close()
    assert again.id == conv.id and again.mode == "roleplay"
    assert [(m.role, m.text, m.author_name) for m in history] == [
        (USER, "hello", "Ann"),
        (ASSISTANT, "hi Ann", None),
    ]
    assert history[0].platform_message_id == "m1" and history[1].token_count == 3


async def test_a_reply_sorts_right_after_the_message_it_answers(store: Store) -> None:
    conv = await store.conversations.get_or_create("telegram", "telegram:1")
    q1 = await store.messages.add(conv.id, USER, "first")
    q2 = await store.messages.add(conv.id, USER, "second (arrived while answering first)")
    await store.messages.add(conv.id, ASSISTANT, "answer to first", reply_to_id=q1)
    assert [m.text for m in await store.messages.history(conv.id)] == [
        "first",
        "answer to first",
        "second (arrived while answering first)",
    ]
    # What the first answer's prompt may see: nothing that came after it.
    assert [m.text for m in await store.messages.history(conv.id, upto_id=q1)] == [
        "first",
        "answer to first",
    ]
    assert q2 > q1


async def test_reset_keeps_messages_but_starts_a_new_history(store: Store) -> None:
    conv = await store.conversations.get_or_create("console", "console:me")
    await store.messages.add(conv.id, USER, "old")
    marker = await store.conversations.reset(conv.id)
    await store.messages.add(conv.id, USER, "new")
    assert [m.text for m in await store.messages.history(conv.id, after_id=marker)] == ["new"]
    assert await store.messages.count(conv.id) == 2
    assert (
        await store.conversations.get_or_create("console", "console:me")
    ).reset_after_id == marker


async def test_out_of_context_messages_are_stored_but_not_in_history(store: Store) -> None:
    conv = await store.conversations.get_or_create("console", "console:me")
    mid = await store.messages.add(conv.id, USER, "x" * 10)
    await store.messages.update(mid, in_context=False)
    assert await store.messages.history(conv.id) == []
    assert await store.messages.count(conv.id) == 1


async def test_migrations_run_once_on_postgresql(postgres: Any) -> None:
    url = await postgres.new_database()
    for _ in range(2):  # the second start finds everything applied
        engine = await open_database(url)
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT version, name FROM schema_migrations"))).all()
            tables = {
                r[0]
                for r in await conn.execute(
                    text("SELECT table_name FROM information_schema.tables")
                )
            }
        await engine.dispose()
        assert sorted(tuple(r) for r in rows) == [(m.version, m.name) for m in MIGRATIONS]
        assert {"conversations", "messages", "characters", "world_books"} <= tables


async def test_reply_states_and_recovery_queries(store: Store) -> None:
    conv = await store.conversations.get_or_create("telegram", "telegram:7")
    asked = await store.messages.add(
        conv.id, USER, "question", platform_message_id="70", reply_state=RECEIVED
    )
    other = await store.messages.add(conv.id, USER, "aside", platform_message_id="71")
    assert [u.message.id for u in await store.replies.unanswered("telegram")] == [asked]
    assert await store.replies.unanswered("discord") == []
    await store.replies.set_state(asked, ANSWERING, pieces=["900", "901"])
    (open_one,) = await store.replies.unanswered("telegram")
    assert open_one.pieces == ("900", "901") and open_one.conversation_key == "telegram:7"
    reply = await store.messages.add(
        conv.id, ASSISTANT, "answer", reply_to_id=asked, delivered=False
    )
    assert [r.delivered for r in await store.replies.replies_to(asked)] == [False]
    await store.replies.mark_delivered(reply, "900", asked)
    assert await store.replies.unanswered("telegram") == []
    assert [r.delivered for r in await store.replies.replies_to(asked)] == [True]
    found = await store.messages.find_platform(conv.id, "71")
    assert found is not None and found.id == other and found.reply_state is None
    assert await store.messages.find_platform(conv.id, "72") is None
    since = datetime.now(UTC) - timedelta(hours=1)
    assert await store.messages.recent_channels("telegram", since, 10) == [("telegram:7", "71")]


async def test_two_processes_writing_keep_each_conversations_order(database_url: str) -> None:
    # Two bot processes (two engines) share the database; each owns its conversations (the
    # sharding rule) and writes them in its own order, concurrently with the other.
    stores = [Store(await open_database(database_url)) for _ in range(2)]
    try:

        async def write(store: Store, key: str) -> None:
            conv = await store.conversations.get_or_create("discord", key)
            for i in range(40):
                asked = await store.messages.add(conv.id, USER, f"{key} q{i}")
                await store.messages.add(conv.id, ASSISTANT, f"{key} a{i}", reply_to_id=asked)

        keys = [f"discord:{n}" for n in range(4)]
        await asyncio.gather(*(write(stores[n % 2], key) for n, key in enumerate(keys)))
        for key in keys:
            conv = await stores[0].conversations.get_or_create("discord", key)
            texts = [m.text for m in await stores[0].messages.history(conv.id)]
            assert texts == [f"{key} {kind}{i}" for i in range(40) for kind in ("q", "a")]
    finally:
        for store in stores:
            await store.close()
