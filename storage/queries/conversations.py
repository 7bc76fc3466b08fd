"""Queries on the ``conversations`` table: finding and creating rows, their settings."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.records import Conversation, conversation_of
from storage.schema import conversations, messages
from storage.writing import Writer, now


class ConversationQueries:
    def __init__(self, engine: AsyncEngine, writer: Writer) -> None:
        self.engine = engine
        self.writer = writer

    async def find(self, key: str) -> Conversation | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(conversations).where(conversations.c.key == key))
            ).first()
        return conversation_of(row) if row else None

    async def get_or_create(self, platform: str, key: str) -> Conversation:
        """The conversation for ``key``, created (with no explicit mode) on first use."""
        found = await self.find(key)
        if found:
            return found
        stamp = now()
        insert = conversations.insert().values(
            platform=platform,
            key=key,
            mode=None,
            character=None,
            settings="{}",
            reset_after_id=0,
            window_start_id=0,
            created_at=stamp,
            updated_at=stamp,
        )
        # Created concurrently by another task (IntegrityError): read it below.
        with contextlib.suppress(IntegrityError):
            await self.writer.write(lambda conn: conn.execute(insert))
        created = await self.find(key)
        assert created is not None
        return created

    async def _update(self, conversation_id: int, **values: Any) -> None:
        statement = (
            update(conversations)
            .where(conversations.c.id == conversation_id)
            .values(**values, updated_at=now())
        )
        await self.writer.write(lambda conn: conn.execute(statement))

    async def set_mode(self, conversation_id: int, mode: str | None) -> None:
        await self._update(conversation_id, mode=mode)

    async def set_character(self, conversation_id: int, character: str | None) -> None:
        await self._update(conversation_id, character=character)

    async def set_settings(self, conversation_id: int, settings: Mapping[str, Any]) -> None:
        await self._update(conversation_id, settings=json.dumps(dict(settings)))

    async def set_window_start(self, conversation_id: int, message_id: int) -> None:
        await self._update(conversation_id, window_start_id=message_id)

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
                .values(reset_after_id=last, window_start_id=0, updated_at=now())
            )
            return int(last)

        return await self.writer.write(work)
