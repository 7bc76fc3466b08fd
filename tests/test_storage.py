"""Storage on a real SQLite file: migrations, WAL, persistence, ordering and reset."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from storage import Store, open_database
from storage.migrations import MIGRATIONS
from storage.store import ASSISTANT, USER


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
    conv = await store.conversation("discord", "discord:42")
    await store.set_mode(conv.id, "roleplay")
    first = await store.add_message(
        conv.id, USER, "hello", author_id="7", author_name="Ann", platform_message_id="m1"
    )
    await store.add_message(conv.id, ASSISTANT, "hi Ann", reply_to_id=first, token_count=3)
    await store.close()

    store = Store(await open_database(url))
    again = await store.conversation("discord", "discord:42")
    history = await store.history(again.id)
    await store.close()
    assert again.id == conv.id and again.mode == "roleplay"
    assert [(m.role, m.text, m.author_name) for m in history] == [
        (USER, "hello", "Ann"),
        (ASSISTANT, "hi Ann", None),
    ]
    assert history[0].platform_message_id == "m1" and history[1].token_count == 3


async def test_a_reply_sorts_right_after_the_message_it_answers(store: Store) -> None:
    conv = await store.conversation("telegram", "telegram:1")
    q1 = await store.add_message(conv.id, USER, "first")
    q2 = await store.add_message(conv.id, USER, "second (arrived while answering first)")
    await store.add_message(conv.id, ASSISTANT, "answer to first", reply_to_id=q1)
    assert [m.text for m in await store.history(conv.id)] == [
        "first",
        "answer to first",
        "second (arrived while answering first)",
    ]
    # What the first answer's prompt may see: nothing that came after it.
    assert [m.text for m in await store.history(conv.id, upto_id=q1)] == [
        "first",
        "answer to first",
    ]
    assert q2 > q1


async def test_reset_keeps_messages_but_starts_a_new_history(store: Store) -> None:
    conv = await store.conversation("console", "console:me")
    await store.add_message(conv.id, USER, "old")
    marker = await store.reset(conv.id)
    await store.add_message(conv.id, USER, "new")
    assert [m.text for m in await store.history(conv.id, after_id=marker)] == ["new"]
    assert await store.count_messages(conv.id) == 2
    assert (await store.conversation("console", "console:me")).reset_after_id == marker


async def test_out_of_context_messages_are_stored_but_not_in_history(store: Store) -> None:
    conv = await store.conversation("console", "console:me")
    mid = await store.add_message(conv.id, USER, "x" * 10)
    await store.update_message(mid, in_context=False)
    assert await store.history(conv.id) == []
    assert await store.count_messages(conv.id) == 1
