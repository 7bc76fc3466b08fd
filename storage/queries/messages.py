"""Queries on the ``messages`` table: storing, editing, deleting and reading the history."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.records import ASSISTANT, USER, StoredMessage, message_of
from storage.schema import conversations, messages
from storage.writing import Writer, now

POSITION = func.coalesce(messages.c.reply_to_id, messages.c.id)  # a reply sorts after its question


class MessageQueries:
    def __init__(self, engine: AsyncEngine, writer: Writer) -> None:
        self.engine = engine
        self.writer = writer
        self._pending: list[tuple[dict[str, Any], asyncio.Future[int]]] = []
        self._inserting: asyncio.Task[None] | None = None
        self._insert_sql: str | None = None
        self._insert_columns: list[tuple[str, Any]] = []

    async def close(self) -> None:
        if self._inserting is not None:
            await self._inserting

    # -- storing ------------------------------------------------------------------------------

    @staticmethod
    def row(conversation_id: int, message: StoredMessage) -> dict[str, Any]:
        return dict(
            conversation_id=conversation_id,
            role=message.role,
            text=message.text,
            author_id=message.author_id,
            author_name=message.author_name,
            token_count=message.token_count,
            platform_message_id=message.platform_message_id,
            reply_to_id=message.reply_to_id,
            in_context=message.in_context,
            swipe_of=message.swipe_of,
            reply_state=message.reply_state,
            reply_error=None,
            reply_pieces=None,
            reply_plan=None,
            delivered=message.delivered,
            created_at=now(),
        )

    async def add(self, conversation_id: int, role: str, text: str, **fields: Any) -> int:
        """Store a message (``fields``: those of :class:`StoredMessage`) and return its id once
        it is committed.

        Messages stored at the same moment (from different channels) are committed together in
        one transaction: SQLite has a single writer, so this is what lets many busy channels
        share it without waiting on each other's commits.
        """
        message = StoredMessage(0, role, text, **fields)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((self.row(conversation_id, message), done))
        if self._inserting is None or self._inserting.done():
            self._inserting = asyncio.create_task(self._insert_pending())
        return await done

    async def _insert_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                ids = await self._insert_rows([values for values, _ in batch])
            except Exception:
                # One bad row must not cost the others theirs: store them one by one, so only
                # the rows that fail on their own report a failure to their callers.
                await self._insert_each(batch)
                continue
            for (_, done), message_id in zip(batch, ids, strict=True):
                if not done.done():
                    done.set_result(message_id)

    async def _insert_each(self, batch: list[tuple[dict[str, Any], asyncio.Future[int]]]) -> None:
        for values, done in batch:
            try:
                (message_id,) = await self._insert_rows([values])
            except Exception as exc:  # this row's caller learns of its own failure
                if not done.done():
                    done.set_exception(exc)
                continue
            if not done.done():
                done.set_result(message_id)

    async def _insert_rows(self, rows: list[dict[str, Any]]) -> list[int]:
        async def work(conn: AsyncConnection) -> list[int]:
            return await self._insert(conn, rows)

        return await self.writer.write(work)

    async def _insert(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> list[int]:
        if conn.dialect.name == "sqlite":
            return await self._insert_sqlite(conn, rows)
        result = await conn.execute(
            messages.insert().returning(messages.c.id, sort_by_parameter_order=True), rows
        )
        return [int(i) for i in result.scalars()]

    async def _insert_sqlite(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> list[int]:
        """Insert message rows through the aiosqlite driver directly.

        This is the hot path of every conversation (two inserts per answered message), and
        SQLAlchemy's statement execution costs about twice the insert itself here.  The SQL
        and the value conversions still come from the table definition.
        """
        if self._insert_sql is None:
            columns = [c for c in messages.columns if c.name != "id"]
            self._insert_sql = (
                f"INSERT INTO messages ({', '.join(c.name for c in columns)}) "
                f"VALUES ({', '.join('?' for _ in columns)})"
            )
            self._insert_columns = [(c.name, c.type.bind_processor(conn.dialect)) for c in columns]
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        ids = []
        for row in rows:
            params = [
                convert(value) if convert is not None and value is not None else value
                for name, convert in self._insert_columns
                for value in (row.get(name),)
            ]
            cursor = await driver.execute(self._insert_sql, params)
            ids.append(int(cursor.lastrowid))
            await cursor.close()
        return ids

    async def update(self, message_id: int, **values: Any) -> None:
        allowed = {
            "token_count",
            "in_context",
            "platform_message_id",
            "text",
            "swipe_of",
            "reply_state",
            "reply_error",
            "delivered",
        }
        if unknown := set(values) - allowed:
            raise ValueError(f"cannot update message field(s): {sorted(unknown)}")
        statement = update(messages).where(messages.c.id == message_id).values(**values)
        await self.writer.write(lambda conn: conn.execute(statement))

    async def add_version(self, conversation_id: int, message: StoredMessage) -> int:
        """Store another version of a bot message (``message.swipe_of``) and make it the one
        in context, in one transaction: the history never holds two versions."""
        assert message.swipe_of is not None
        group = message.swipe_of
        values = self.row(conversation_id, replace(message, in_context=True))

        async def work(conn: AsyncConnection) -> int:
            new_id = int(
                (
                    await conn.execute(messages.insert().values(**values).returning(messages.c.id))
                ).scalar_one()
            )
            in_group = (messages.c.id == group) | (messages.c.swipe_of == group)
            await conn.execute(
                update(messages)
                .where(messages.c.conversation_id == conversation_id, in_group)
                .values(in_context=messages.c.id == new_id)
            )
            return new_id

        return await self.writer.write(work)

    # -- platform edits and deletions ---------------------------------------------------------

    async def _platform_row(
        self, conn: AsyncConnection, conversation_id: int, platform_message_id: str
    ) -> Row[Any] | None:
        query = select(messages).where(
            messages.c.conversation_id == conversation_id,
            messages.c.platform_message_id == platform_message_id,
        )
        return (await conn.execute(query.order_by(messages.c.id).limit(1))).first()

    async def find_platform(
        self, conversation_id: int, platform_message_id: str
    ) -> StoredMessage | None:
        """The user message stored for a platform message, if it was stored before."""
        query = select(messages).where(
            messages.c.conversation_id == conversation_id,
            messages.c.platform_message_id == platform_message_id,
            messages.c.role == USER,
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query.limit(1))).first()
        return message_of(row) if row is not None else None

    async def edit_platform(
        self, conversation_id: int, platform_message_id: str, text: str
    ) -> tuple[StoredMessage, StoredMessage] | None:
        """Replace the text of the message a platform message shows: (before, after), or None
        when it was never stored (or was deleted)."""

        async def work(conn: AsyncConnection) -> tuple[StoredMessage, StoredMessage] | None:
            row = await self._platform_row(conn, conversation_id, platform_message_id)
            if row is None or row.deleted_at is not None:
                return None
            await conn.execute(
                update(messages).where(messages.c.id == row.id).values(text=text, edited_at=now())
            )
            before = message_of(row)
            return before, replace(before, text=text)

        return await self.writer.write(work)

    async def delete_platform(
        self, conversation_id: int, platform_message_ids: Sequence[str]
    ) -> list[StoredMessage]:
        """Mark the messages these platform messages showed as deleted and take them out of
        the context, in one write; the ones stored (and not deleted before) are returned."""

        async def work(conn: AsyncConnection) -> list[StoredMessage]:
            rows = (
                await conn.execute(
                    select(messages).where(
                        messages.c.conversation_id == conversation_id,
                        messages.c.platform_message_id.in_(list(platform_message_ids)),
                        messages.c.deleted_at.is_(None),
                    )
                )
            ).all()
            if rows:
                await conn.execute(
                    update(messages)
                    .where(messages.c.id.in_([r.id for r in rows]))
                    .values(in_context=False, deleted_at=now())
                )
            return [message_of(r) for r in rows]

        return await self.writer.write(work)

    # -- reading ------------------------------------------------------------------------------

    async def get(self, message_id: int) -> StoredMessage | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(messages).where(messages.c.id == message_id))).first()
        return message_of(row) if row is not None else None

    async def is_deleted(self, message_id: int) -> bool:
        query = select(messages.c.deleted_at).where(messages.c.id == message_id)
        async with self.engine.connect() as conn:
            return (await conn.execute(query)).scalar_one_or_none() is not None

    async def last_id(self, conversation_id: int) -> int:
        """The id of the newest stored message of the conversation (0 when there is none)."""
        async with self.engine.connect() as conn:
            found = await conn.execute(
                select(func.coalesce(func.max(messages.c.id), 0)).where(
                    messages.c.conversation_id == conversation_id
                )
            )
            return int(found.scalar_one())

    async def history(
        self,
        conversation_id: int,
        *,
        after_id: int = 0,
        upto_id: int | None = None,
        newest: int | None = None,
    ) -> list[StoredMessage]:
        """Messages the model may see, in conversation order (the ``newest`` of them).

        A reply sorts right after the message it answers, even when other messages arrived
        (and were stored) while it was being generated.  ``upto_id`` limits the history to what
        existed when the message being answered arrived.
        """
        query = select(messages).where(
            messages.c.conversation_id == conversation_id,
            messages.c.in_context.is_(True),
            after_id < POSITION,
        )
        if upto_id is not None:
            query = query.where(upto_id >= POSITION)
        if newest is not None:
            query = query.order_by(POSITION.desc(), messages.c.id.desc()).limit(newest)
        else:
            query = query.order_by(POSITION, messages.c.id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        found = [message_of(r) for r in rows]
        if newest is not None:
            found.reverse()
        return found

    async def recent(self, conversation_id: int, after_id: int, limit: int) -> list[StoredMessage]:
        """The newest ``limit`` messages in context with ids above ``after_id``, oldest first."""
        query = (
            select(messages)
            .where(
                messages.c.conversation_id == conversation_id,
                messages.c.in_context.is_(True),
                messages.c.id > after_id,
            )
            .order_by(messages.c.id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [message_of(r) for r in reversed(rows)]

    async def search(
        self,
        conversation_id: int,
        after_id: int,
        words: Sequence[str],
        limit: int,
        before_id: int | None = None,
    ) -> list[StoredMessage]:
        """The newest ``limit`` user and bot messages since ``after_id`` (the reset) and before
        ``before_id`` (the question being answered) that hold every one of ``words`` (any
        case), newest first.  ``words`` are literal text: LIKE's wildcards in them are
        escaped."""

        def pattern(word: str) -> str:
            escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            return f"%{escaped.lower()}%"

        query = select(messages).where(
            messages.c.conversation_id == conversation_id,
            messages.c.id > after_id,
            *((messages.c.id < before_id,) if before_id is not None else ()),
            messages.c.role.in_((USER, ASSISTANT)),
            messages.c.deleted_at.is_(None),
            *(func.lower(messages.c.text).like(pattern(w), escape="\\") for w in words),
        )
        query = query.order_by(messages.c.id.desc()).limit(limit)
        async with self.engine.connect() as conn:
            return [message_of(r) for r in (await conn.execute(query)).all()]

    async def last_reply(self, conversation_id: int, after_id: int = 0) -> StoredMessage | None:
        """The newest bot reply still in context (what /regenerate replaces)."""
        query = (
            select(messages)
            .where(
                messages.c.conversation_id == conversation_id,
                messages.c.role == ASSISTANT,
                messages.c.in_context.is_(True),
                after_id < POSITION,
            )
            .order_by(messages.c.id.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            r = (await conn.execute(query)).first()
        return message_of(r) if r is not None else None

    async def count(self, conversation_id: int) -> int:
        query = select(func.count()).where(messages.c.conversation_id == conversation_id)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def versions(self, conversation_id: int, group: int) -> list[StoredMessage]:
        """Every version of one bot message, oldest first."""
        query = (
            select(messages)
            .where(
                messages.c.conversation_id == conversation_id,
                (messages.c.id == group) | (messages.c.swipe_of == group),
            )
            .order_by(messages.c.id)
        )
        async with self.engine.connect() as conn:
            return [message_of(r) for r in (await conn.execute(query)).all()]

    async def choose_version(self, conversation_id: int, group: int, message_id: int) -> None:
        """Put version ``message_id`` of ``group`` in context and every other version out."""
        in_group = (messages.c.id == group) | (messages.c.swipe_of == group)
        statement = (
            update(messages)
            .where(messages.c.conversation_id == conversation_id, in_group)
            .values(in_context=messages.c.id == message_id)
        )
        await self.writer.write(lambda conn: conn.execute(statement))

    async def recent_channels(
        self, platform: str, since: datetime, limit: int, before: datetime | None = None
    ) -> list[tuple[str, str]]:
        """(conversation key, platform id of its newest user message stored before
        ``before``) for the ``limit`` conversations of ``platform`` most recently active since
        ``since``."""
        newest = select(messages.c.conversation_id, func.max(messages.c.id).label("last_id")).where(
            messages.c.role == USER, messages.c.platform_message_id.is_not(None)
        )
        if before is not None:
            newest = newest.where(messages.c.created_at < before)
        newest_ids = newest.group_by(messages.c.conversation_id).subquery()
        query = (
            select(conversations.c.key, messages.c.platform_message_id)
            .join(newest_ids, newest_ids.c.conversation_id == conversations.c.id)
            .join(messages, messages.c.id == newest_ids.c.last_id)
            .where(conversations.c.platform == platform, messages.c.created_at >= since)
            .order_by(newest_ids.c.last_id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [(r.key, str(r.platform_message_id)) for r in (await conn.execute(query))]
