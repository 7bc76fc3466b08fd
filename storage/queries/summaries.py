"""Queries on the ``summaries`` table: the rolling summaries of what left the window."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.records import Summary
from storage.schema import summaries
from storage.writing import Writer, now

SUMMARIES_KEPT = 4  # per conversation; older ones are deleted as new ones arrive


class SummaryQueries:
    def __init__(self, engine: AsyncEngine, writer: Writer) -> None:
        self.engine = engine
        self.writer = writer

    async def add(
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
                    created_at=now(),
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

        new_id = await self.writer.write(work)
        return Summary(new_id, first_id, last_id, text, token_count)

    async def of(self, conversation_id: int, after_id: int = 0) -> list[Summary]:
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
