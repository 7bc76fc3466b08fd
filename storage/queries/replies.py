"""Queries on reply states: the life of a user message that expects an answer.

A user message moves received → answering → answered (or failed).  A turn can have several
speakers (a group scene); its plan, the speakers in order, is stored with the question, each
speaker's reply carries its own delivery state, and the question is answered once every
planned speaker's reply reached the platform.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.records import (
    ANSWERED,
    ASSISTANT,
    FAILED,
    OPEN_STATES,
    USER,
    StoredMessage,
    Unanswered,
    message_of,
)
from storage.schema import conversations, messages
from storage.writing import Writer


class ReplyQueries:
    def __init__(self, engine: AsyncEngine, writer: Writer) -> None:
        self.engine = engine
        self.writer = writer

    async def set_state(
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
        await self.writer.write(lambda conn: conn.execute(statement))

    async def start(self, message_id: int, plan: Sequence[str | None]) -> None:
        """The turn answering ``message_id`` begins: these speakers, in this order."""
        statement = (
            update(messages)
            .where(messages.c.id == message_id)
            .values(reply_state="answering", reply_error=None, reply_plan=json.dumps(list(plan)))
        )
        await self.writer.write(lambda conn: conn.execute(statement))

    async def close(self, message_ids: list[int], error: str) -> None:
        """Move the given user messages to failed (``error`` says why), in one write."""
        if not message_ids:
            return
        statement = (
            update(messages)
            .where(messages.c.id.in_(message_ids))
            .values(reply_state=FAILED, reply_error=error, reply_pieces=None)
        )
        await self.writer.write(lambda conn: conn.execute(statement))

    async def mark_delivered(
        self,
        reply_id: int,
        platform_id: str | None,
        answers: int,
        pieces: list[str] | None = None,
    ) -> bool:
        """Reply ``reply_id`` reached the platform.  Its question is answered, in the same
        write, once every speaker its plan names has a delivered reply; returns whether."""

        async def work(conn: AsyncConnection) -> bool:
            values: dict[str, Any] = {"delivered": True}
            if platform_id:
                values["platform_message_id"] = platform_id
                values["reply_pieces"] = json.dumps(pieces or [platform_id])
            await conn.execute(update(messages).where(messages.c.id == reply_id).values(**values))
            plan = (
                await conn.execute(select(messages.c.reply_plan).where(messages.c.id == answers))
            ).scalar_one_or_none()
            planned = len(json.loads(plan)) if plan else 1
            delivered = (
                await conn.execute(
                    select(func.count()).where(
                        messages.c.reply_to_id == answers,
                        messages.c.role == ASSISTANT,
                        messages.c.delivered.is_(True),
                        messages.c.swipe_of.is_(None),
                    )
                )
            ).scalar_one()
            if delivered < planned:
                # The next speaker streams its own pieces: the question keeps none of these.
                await conn.execute(
                    update(messages).where(messages.c.id == answers).values(reply_pieces=None)
                )
                return False
            await conn.execute(
                update(messages)
                .where(messages.c.id == answers)
                .values(reply_state=ANSWERED, reply_error=None, reply_pieces=None)
            )
            return True

        return await self.writer.write(work)

    async def set_pieces(self, message_id: int, pieces: list[str]) -> None:
        """Record the platform messages a bot reply shows in (the first is its id)."""
        if not pieces:
            return
        statement = (
            update(messages)
            .where(messages.c.id == message_id)
            .values(platform_message_id=pieces[0], reply_pieces=json.dumps(pieces))
        )
        await self.writer.write(lambda conn: conn.execute(statement))

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
                message_of(r),
                r.key,
                r.conv_platform,
                tuple(json.loads(r.reply_pieces or "[]")),
                tuple(json.loads(r.reply_plan)) if r.reply_plan else None,
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
