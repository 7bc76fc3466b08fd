"""Every query the bot makes: conversations and their messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Row, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.records import (
    ANSWERED,
    ASSISTANT,
    FAILED,
    OPEN_STATES,
    USER,
    Conversation,
    StoredMessage,
    Summary,
    Unanswered,
    conversation_of,
    message_of,
)
from storage.schema import characters, conversations, messages, summaries, world_books

log = logging.getLogger(__name__)

T = TypeVar("T")
# A busy or locked database is waited out: SQLite's own busy timeout first, then these pauses.
BUSY_RETRY_DELAYS_S = (0.1, 0.3, 1.0, 2.0, 4.0)


# What a failing database raises through SQLAlchemy and the drivers (a value the driver cannot
# encode surfaces as ValueError).
STORAGE_ERRORS = (SQLAlchemyError, OSError, ValueError)


def is_busy(exc: BaseException) -> bool:
    """A write that failed only because another connection holds the database."""
    text = str(exc).lower()
    return isinstance(exc, OperationalError) and (
        "locked" in text or "busy" in text or "deadlock" in text or "could not serialize" in text
    )


SUMMARIES_KEPT = 4  # per conversation; older ones are deleted as new ones arrive


def _now() -> datetime:
    return datetime.now(UTC)


class Store:
    """Queries over one database engine; safe to share between tasks."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._pending: list[tuple[dict[str, Any], asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._insert_sql: str | None = None
        self._insert_columns: list[tuple[str, Any]] = []
        self._write_conn: AsyncConnection | None = None

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """A transaction on the one connection that writes.

        SQLite has a single writer: funnelling every write through one connection (readers use
        the pool) means writers queue here instead of sleeping in SQLite's busy handler, and
        the connection stays checked out, which saves a pool round trip per write.
        """
        async with self._write_lock:
            if self._write_conn is None:
                self._write_conn = await self.engine.connect()
            async with self._write_conn.begin():
                yield self._write_conn

    async def _write(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``work`` in a write transaction, waiting out a busy or locked database."""
        for delay in (*BUSY_RETRY_DELAYS_S, None):
            try:
                async with self._writing() as conn:
                    return await work(conn)
            except OperationalError as exc:
                if delay is None or not is_busy(exc):
                    raise
                log.warning("database busy (%s): retrying in %.1fs", exc.orig or exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer
        if self._write_conn is not None:
            await self._write_conn.close()
            self._write_conn = None
        await self.engine.dispose()

    # -- conversations ----------------------------------------------------------------------

    async def get_conversation(self, key: str) -> Conversation | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(conversations).where(conversations.c.key == key))
            ).first()
        return conversation_of(row) if row else None

    async def conversation(self, platform: str, key: str) -> Conversation:
        """The conversation for ``key``, created (with no explicit mode) on first use."""
        found = await self.get_conversation(key)
        if found:
            return found
        now = _now()
        insert = conversations.insert().values(
            platform=platform,
            key=key,
            mode=None,
            character=None,
            settings="{}",
            reset_after_id=0,
            window_start_id=0,
            created_at=now,
            updated_at=now,
        )
        # Created concurrently by another task (IntegrityError): read it below.
        with contextlib.suppress(IntegrityError):
            await self._write(lambda conn: conn.execute(insert))
        created = await self.get_conversation(key)
        assert created is not None
        return created

    async def _update_conversation(self, conversation_id: int, **values: Any) -> None:
        statement = (
            update(conversations)
            .where(conversations.c.id == conversation_id)
            .values(**values, updated_at=_now())
        )
        await self._write(lambda conn: conn.execute(statement))

    async def set_mode(self, conversation_id: int, mode: str | None) -> None:
        await self._update_conversation(conversation_id, mode=mode)

    async def set_character(self, conversation_id: int, character: str | None) -> None:
        await self._update_conversation(conversation_id, character=character)

    async def set_settings(self, conversation_id: int, settings: Mapping[str, Any]) -> None:
        await self._update_conversation(conversation_id, settings=json.dumps(dict(settings)))

    async def set_window_start(self, conversation_id: int, message_id: int) -> None:
        await self._update_conversation(conversation_id, window_start_id=message_id)

    async def last_message_id(self, conversation_id: int) -> int:
        """The id of the newest stored message of the conversation (0 when there is none)."""
        async with self.engine.connect() as conn:
            found = await conn.execute(
                select(func.coalesce(func.max(messages.c.id), 0)).where(
                    messages.c.conversation_id == conversation_id
                )
            )
            return int(found.scalar_one())

    async def reset(self, conversation_id: int, boundary: int | None = None) -> int:
        """Start a new conversation after message ``boundary`` (default: the newest one).

        Nothing is deleted; messages at or before the boundary in conversation order (a reply
        counts where its question is) no longer belong to the history.
        """

        async def work(conn: AsyncConnection) -> int:
            last = boundary
            if last is None:
                last = (
                    await conn.execute(
                        select(func.coalesce(func.max(messages.c.id), 0)).where(
                            messages.c.conversation_id == conversation_id
                        )
                    )
                ).scalar_one()
            await conn.execute(
                update(conversations)
                .where(conversations.c.id == conversation_id)
                .values(reset_after_id=last, window_start_id=0, updated_at=_now())
            )
            return int(last)

        return await self._write(work)

    # -- messages -----------------------------------------------------------------------------

    async def add_message(
        self,
        conversation_id: int,
        role: str,
        text: str,
        *,
        author_id: str | None = None,
        author_name: str | None = None,
        token_count: int | None = None,
        platform_message_id: str | None = None,
        reply_to_id: int | None = None,
        in_context: bool = True,
        swipe_of: int | None = None,
        reply_state: str | None = None,
        delivered: bool | None = None,
    ) -> int:
        """Store a message and return its id once it is committed.

        Messages stored at the same moment (from different channels) are committed together in
        one transaction: SQLite has a single writer, so this is what lets many busy channels
        share it without waiting on each other's commits.
        """
        values = dict(
            conversation_id=conversation_id,
            role=role,
            text=text,
            author_id=author_id,
            author_name=author_name,
            token_count=token_count,
            platform_message_id=platform_message_id,
            reply_to_id=reply_to_id,
            in_context=in_context,
            swipe_of=swipe_of,
            reply_state=reply_state,
            reply_error=None,
            reply_pieces=None,
            delivered=delivered,
            created_at=_now(),
        )
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((values, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        return await done

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                ids = await self._insert_rows([values for values, _ in batch])
            except Exception:
                # One bad row must not cost the others theirs: store them one by one, so only
                # the rows that fail on their own report a failure to their callers.
                await self._write_each(batch)
                continue
            for (_, done), message_id in zip(batch, ids, strict=True):
                if not done.done():
                    done.set_result(message_id)

    async def _write_each(self, batch: list[tuple[dict[str, Any], asyncio.Future[int]]]) -> None:
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

        return await self._write(work)

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

    async def update_message(self, message_id: int, **values: Any) -> None:
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
        await self._write(lambda conn: conn.execute(statement))

    # -- reply states ---------------------------------------------------------------------------

    async def set_reply_state(
        self,
        message_id: int,
        state: str,
        *,
        error: str | None = None,
        pieces: list[str] | None = None,
    ) -> None:
        """Move a user message to ``state``; ``pieces`` replaces the streamed ids when given."""
        values: dict[str, Any] = {"reply_state": state, "reply_error": error}
        if pieces is not None:
            values["reply_pieces"] = json.dumps(pieces) if pieces else None
        statement = update(messages).where(messages.c.id == message_id).values(**values)
        await self._write(lambda conn: conn.execute(statement))

    async def close_replies(self, message_ids: list[int], error: str) -> None:
        """Move the given user messages to failed (``error`` says why), in one write."""
        if not message_ids:
            return
        statement = (
            update(messages)
            .where(messages.c.id.in_(message_ids))
            .values(reply_state=FAILED, reply_error=error, reply_pieces=None)
        )
        await self._write(lambda conn: conn.execute(statement))

    async def mark_delivered(
        self,
        reply_id: int,
        platform_id: str | None,
        answers: int,
        pieces: list[str] | None = None,
    ) -> None:
        """Reply ``reply_id`` reached the platform: it and its question are done, together."""

        async def work(conn: AsyncConnection) -> None:
            values: dict[str, Any] = {"delivered": True}
            if platform_id:
                values["platform_message_id"] = platform_id
                values["reply_pieces"] = json.dumps(pieces or [platform_id])
            await conn.execute(update(messages).where(messages.c.id == reply_id).values(**values))
            await conn.execute(
                update(messages)
                .where(messages.c.id == answers)
                .values(reply_state=ANSWERED, reply_error=None, reply_pieces=None)
            )

        await self._write(work)

    async def set_pieces(self, message_id: int, pieces: list[str]) -> None:
        """Record the platform messages a bot reply shows in (the first is its id)."""
        if not pieces:
            return
        statement = (
            update(messages)
            .where(messages.c.id == message_id)
            .values(platform_message_id=pieces[0], reply_pieces=json.dumps(pieces))
        )
        await self._write(lambda conn: conn.execute(statement))

    async def pieces_of(self, message_id: int) -> list[str]:
        """The platform messages a bot reply shows in, first to last (as far as known)."""
        query = select(messages.c.platform_message_id, messages.c.reply_pieces).where(
            messages.c.id == message_id
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return []
        if row.reply_pieces:
            return [str(p) for p in json.loads(row.reply_pieces)]
        return [row.platform_message_id] if row.platform_message_id else []

    async def find_platform_message(
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

    # -- edits, deletions and summaries ---------------------------------------------------------

    async def _platform_message(
        self, conn: AsyncConnection, conversation_id: int, platform_message_id: str
    ) -> Row[Any] | None:
        query = select(messages).where(
            messages.c.conversation_id == conversation_id,
            messages.c.platform_message_id == platform_message_id,
        )
        return (await conn.execute(query.order_by(messages.c.id).limit(1))).first()

    async def edit_platform_message(
        self, conversation_id: int, platform_message_id: str, text: str
    ) -> tuple[StoredMessage, StoredMessage] | None:
        """Replace the text of the message a platform message shows: (before, after), or None
        when it was never stored (or was deleted)."""

        async def work(conn: AsyncConnection) -> tuple[StoredMessage, StoredMessage] | None:
            row = await self._platform_message(conn, conversation_id, platform_message_id)
            if row is None or row.deleted_at is not None:
                return None
            await conn.execute(
                update(messages).where(messages.c.id == row.id).values(text=text, edited_at=_now())
            )
            before = message_of(row)
            return before, replace(before, text=text)

        return await self._write(work)

    async def delete_platform_message(
        self, conversation_id: int, platform_message_id: str
    ) -> StoredMessage | None:
        """Mark the message a platform message showed as deleted and take it out of the
        context; None when it was never stored (or already deleted)."""

        async def work(conn: AsyncConnection) -> StoredMessage | None:
            row = await self._platform_message(conn, conversation_id, platform_message_id)
            if row is None or row.deleted_at is not None:
                return None
            await conn.execute(
                update(messages)
                .where(messages.c.id == row.id)
                .values(in_context=False, deleted_at=_now())
            )
            return message_of(row)

        return await self._write(work)

    async def add_summary(
        self, conversation_id: int, first_id: int, last_id: int, text: str, token_count: int
    ) -> Summary:
        """Store a new summary; only the newest few of a conversation are kept."""

        async def work(conn: AsyncConnection) -> int:
            result = await conn.execute(
                summaries.insert()
                .values(
                    conversation_id=conversation_id,
                    first_id=first_id,
                    last_id=last_id,
                    text=text,
                    token_count=token_count,
                    created_at=_now(),
                )
                .returning(summaries.c.id)
            )
            new_id = int(result.scalar_one())
            kept = (
                select(summaries.c.id)
                .where(summaries.c.conversation_id == conversation_id)
                .order_by(summaries.c.id.desc())
                .limit(SUMMARIES_KEPT)
                .scalar_subquery()
            )
            await conn.execute(
                summaries.delete().where(
                    summaries.c.conversation_id == conversation_id, summaries.c.id.not_in(kept)
                )
            )
            return new_id

        new_id = await self._write(work)
        return Summary(new_id, first_id, last_id, text, token_count)

    async def summaries(self, conversation_id: int, after_id: int = 0) -> list[Summary]:
        """The conversation's kept summaries of messages after ``after_id`` (its reset), the
        one reaching furthest first."""
        query = (
            select(summaries)
            .where(summaries.c.conversation_id == conversation_id, summaries.c.first_id > after_id)
            .order_by(summaries.c.last_id.desc(), summaries.c.id.desc())
            .limit(SUMMARIES_KEPT)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [Summary(r.id, r.first_id, r.last_id, r.text, r.token_count) for r in rows]

    async def unanswered(
        self, platform: str, *, since: datetime | None = None, before: datetime | None = None
    ) -> list[Unanswered]:
        """User messages of ``platform`` still received or answering, oldest first."""
        query = (
            select(messages, conversations.c.key, conversations.c.platform.label("conv_platform"))
            .join(conversations, conversations.c.id == messages.c.conversation_id)
            .where(
                conversations.c.platform == platform,
                messages.c.role == USER,
                messages.c.reply_state.in_(OPEN_STATES),
            )
            .order_by(messages.c.id)
        )
        if since is not None:
            query = query.where(messages.c.created_at >= since)
        if before is not None:
            query = query.where(messages.c.created_at < before)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            Unanswered(
                message_of(r), r.key, r.conv_platform, tuple(json.loads(r.reply_pieces or "[]"))
            )
            for r in rows
        ]

    async def replies_to(self, message_id: int) -> list[StoredMessage]:
        """The bot replies stored for one user message (every version), oldest first."""
        query = (
            select(messages)
            .where(messages.c.reply_to_id == message_id, messages.c.role == ASSISTANT)
            .order_by(messages.c.id)
        )
        async with self.engine.connect() as conn:
            return [message_of(r) for r in (await conn.execute(query)).all()]

    async def recent_channels(
        self, platform: str, since: datetime, limit: int
    ) -> list[tuple[str, str]]:
        """(conversation key, platform id of its newest stored user message) for the
        ``limit`` conversations of ``platform`` most recently active since ``since``."""
        newest = (
            select(
                messages.c.conversation_id,
                func.max(messages.c.id).label("last_id"),
            )
            .where(messages.c.role == USER, messages.c.platform_message_id.is_not(None))
            .group_by(messages.c.conversation_id)
            .subquery()
        )
        query = (
            select(conversations.c.key, messages.c.platform_message_id)
            .join(newest, newest.c.conversation_id == conversations.c.id)
            .join(messages, messages.c.id == newest.c.last_id)
            .where(conversations.c.platform == platform, messages.c.created_at >= since)
            .order_by(newest.c.last_id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [(r.key, str(r.platform_message_id)) for r in (await conn.execute(query))]

    async def history(
        self, conversation_id: int, *, after_id: int = 0, upto_id: int | None = None
    ) -> list[StoredMessage]:
        """Messages the model may see, in conversation order.

        A reply sorts right after the message it answers, even when other messages arrived
        (and were stored) while it was being generated.  ``upto_id`` limits the history to what
        existed when the message being answered arrived.
        """
        position = func.coalesce(messages.c.reply_to_id, messages.c.id)
        query = select(messages).where(
            messages.c.conversation_id == conversation_id,
            messages.c.in_context.is_(True),
            position > after_id,
        )
        if upto_id is not None:
            query = query.where(position <= upto_id)
        query = query.order_by(position, messages.c.id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [message_of(r) for r in rows]

    async def recent_messages(
        self, conversation_id: int, after_id: int, limit: int
    ) -> list[StoredMessage]:
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

    async def last_reply(self, conversation_id: int, after_id: int = 0) -> StoredMessage | None:
        """The newest bot reply still in context (what /regenerate replaces)."""
        query = (
            select(messages)
            .where(
                messages.c.conversation_id == conversation_id,
                messages.c.role == ASSISTANT,
                messages.c.in_context.is_(True),
                func.coalesce(messages.c.reply_to_id, messages.c.id) > after_id,
            )
            .order_by(messages.c.id.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            r = (await conn.execute(query)).first()
        return message_of(r) if r is not None else None

    async def count_messages(self, conversation_id: int) -> int:
        async with self.engine.connect() as conn:
            return int(
                (
                    await conn.execute(
                        select(func.count()).where(messages.c.conversation_id == conversation_id)
                    )
                ).scalar_one()
            )

    async def swipes(self, conversation_id: int, group: int) -> list[StoredMessage]:
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

    async def choose_swipe(self, conversation_id: int, group: int, message_id: int) -> None:
        """Put version ``message_id`` of ``group`` in context and every other version out."""
        in_group = (messages.c.id == group) | (messages.c.swipe_of == group)
        statement = (
            update(messages)
            .where(messages.c.conversation_id == conversation_id, in_group)
            .values(in_context=messages.c.id == message_id)
        )
        await self._write(lambda conn: conn.execute(statement))

    # -- characters and world books -----------------------------------------------------------

    async def _save_named(self, table: Any, name: str, data: Mapping[str, Any]) -> None:
        payload = json.dumps(dict(data), ensure_ascii=False)
        now = _now()

        async def work(conn: AsyncConnection) -> None:
            found = (
                await conn.execute(select(table.c.id).where(table.c.name == name))
            ).scalar_one_or_none()
            if found is None:
                await conn.execute(
                    table.insert().values(name=name, data=payload, created_at=now, updated_at=now)
                )
            else:
                await conn.execute(
                    update(table).where(table.c.id == found).values(data=payload, updated_at=now)
                )

        await self._write(work)

    async def _load_named(self, table: Any) -> dict[str, dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(table.c.name, table.c.data))).all()
        return {r.name: json.loads(r.data) for r in rows}

    async def save_card(self, name: str, card: Mapping[str, Any]) -> None:
        await self._save_named(characters, name, card)

    async def cards(self) -> dict[str, dict[str, Any]]:
        return await self._load_named(characters)

    async def save_world_book(self, name: str, book: Mapping[str, Any]) -> None:
        await self._save_named(world_books, name, book)

    async def world_books(self) -> dict[str, dict[str, Any]]:
        return await self._load_named(world_books)
