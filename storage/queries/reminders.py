"""Queries on ``reminders`` and ``user_timezones``: setting, listing and cancelling reminders,
and claiming the due ones so that each is delivered by one process only.

A claim is one conditional ``UPDATE … RETURNING``: of two processes sharing the database, the
second finds the row no longer ``pending`` and takes nothing (on PostgreSQL it re-reads the
row after the first commits).  A claim older than ``stale_before`` belongs to a process that
died while delivering, and may be taken again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.records import CANCELLED, DELIVERED, GAVE_UP, PENDING, SENDING, Reminder
from storage.schema import conversations, reminders, user_timezones
from storage.writing import Writer, now

OPEN = (PENDING, SENDING)


def utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes: every stored time is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _reminder(row: Row[Any]) -> Reminder:
    return Reminder(
        id=row.id,
        conversation_key=row.key,
        platform=row.platform,
        user_id=row.user_id,
        user_name=row.user_name,
        text=row.text,
        due_at=utc(row.due_at),
        recurrence=row.recurrence,
        timezone=row.timezone,
        state=row.state,
        attempts=row.attempts,
        fired=row.fired,
    )


_COLUMNS = (
    reminders.c.id,
    conversations.c.key,
    reminders.c.platform,
    reminders.c.user_id,
    reminders.c.user_name,
    reminders.c.text,
    reminders.c.due_at,
    reminders.c.recurrence,
    reminders.c.timezone,
    reminders.c.state,
    reminders.c.attempts,
    reminders.c.fired,
)


def _joined() -> Any:
    return select(*_COLUMNS).join(conversations, conversations.c.id == reminders.c.conversation_id)


class ReminderQueries:
    def __init__(self, engine: AsyncEngine, writer: Writer) -> None:
        self.engine = engine
        self.writer = writer

    async def add(
        self,
        conversation_id: int,
        platform: str,
        user_id: str,
        user_name: str,
        text: str,
        due_at: datetime,
        recurrence: str | None,
        timezone: str,
    ) -> int:
        async def work(conn: AsyncConnection) -> int:
            result = await conn.execute(
                reminders.insert()
                .values(
                    conversation_id=conversation_id,
                    platform=platform,
                    user_id=user_id,
                    user_name=user_name,
                    text=text,
                    due_at=utc(due_at),
                    recurrence=recurrence,
                    timezone=timezone,
                    state=PENDING,
                    attempts=0,
                    fired=0,
                    created_at=now(),
                )
                .returning(reminders.c.id)
            )
            return int(result.scalar_one())

        return await self.writer.write(work)

    async def open_counts(
        self, conversation_id: int, platform: str, user_id: str
    ) -> tuple[int, int]:
        """How many reminders are still to come: in the conversation, and the user's anywhere."""
        async with self.engine.connect() as conn:
            here = await conn.scalar(
                select(func.count())
                .select_from(reminders)
                .where(reminders.c.conversation_id == conversation_id, reminders.c.state.in_(OPEN))
            )
            mine = await conn.scalar(
                select(func.count())
                .select_from(reminders)
                .where(
                    reminders.c.platform == platform,
                    reminders.c.user_id == user_id,
                    reminders.c.state.in_(OPEN),
                )
            )
        return int(here or 0), int(mine or 0)

    async def of_conversation(self, conversation_id: int) -> list[Reminder]:
        """The conversation's reminders still to come, soonest first."""
        query = (
            _joined()
            .where(reminders.c.conversation_id == conversation_id, reminders.c.state.in_(OPEN))
            .order_by(reminders.c.due_at, reminders.c.id)
        )
        async with self.engine.connect() as conn:
            return [_reminder(row) for row in await conn.execute(query)]

    async def get(self, reminder_id: int) -> Reminder | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(_joined().where(reminders.c.id == reminder_id))).first()
        return _reminder(row) if row is not None else None

    async def cancel(self, reminder_id: int, conversation_id: int) -> bool:
        """Cancel a reminder still to come; False if it was delivered or cancelled meanwhile."""

        async def work(conn: AsyncConnection) -> bool:
            result = await conn.execute(
                update(reminders)
                .where(
                    reminders.c.id == reminder_id,
                    reminders.c.conversation_id == conversation_id,
                    reminders.c.state.in_(OPEN),
                )
                .values(state=CANCELLED)
            )
            return bool(result.rowcount)

        return await self.writer.write(work)

    async def claim_due(
        self,
        platforms: tuple[str, ...],
        owner: str,
        at: datetime,
        stale_before: datetime,
        limit: int,
    ) -> list[Reminder]:
        """Claim (for ``owner``) up to ``limit`` reminders due by ``at`` on ``platforms``, and
        those whose claim is older than ``stale_before``."""
        claimable = or_(
            and_(reminders.c.state == PENDING, reminders.c.due_at <= utc(at)),
            and_(reminders.c.state == SENDING, reminders.c.claimed_at < utc(stale_before)),
        )
        due = (
            select(reminders.c.id)
            .where(reminders.c.platform.in_(platforms), claimable)
            .order_by(reminders.c.due_at)
            .limit(limit)
        )
        candidates = due.scalar_subquery()

        # A read first: an idle bot looks every second, and must not write every second.
        async with self.engine.connect() as conn:
            if (await conn.execute(due)).first() is None:
                return []

        async def work(conn: AsyncConnection) -> list[int]:
            result = await conn.execute(
                update(reminders)
                .where(reminders.c.id.in_(candidates), claimable)
                .values(state=SENDING, claimed_by=owner, claimed_at=utc(at))
                .returning(reminders.c.id)
            )
            return [int(i) for i in result.scalars()]

        claimed = await self.writer.write(work)
        if not claimed:
            return []
        query = _joined().where(reminders.c.id.in_(claimed)).order_by(reminders.c.due_at)
        async with self.engine.connect() as conn:
            return [_reminder(row) for row in await conn.execute(query)]

    async def delivered(self, reminder_id: int, owner: str, next_due: datetime | None) -> bool:
        """The claimed reminder reached its conversation: done, or (recurring) pending again
        at ``next_due``.  False when the claim was lost (cancelled meanwhile)."""
        values: dict[str, Any] = {
            "fired": reminders.c.fired + 1,
            "attempts": 0,
            "claimed_by": None,
            "delivered_at": now(),
            "last_error": None,
        }
        if next_due is None:
            values["state"] = DELIVERED
        else:
            values.update(state=PENDING, due_at=utc(next_due))
        return await self._update_claimed(reminder_id, owner, values)

    async def not_delivered(
        self, reminder_id: int, owner: str, error: str, retry_at: datetime | None
    ) -> bool:
        """The platform refused it: try again at ``retry_at``, or give up (None)."""
        values: dict[str, Any] = {
            "attempts": reminders.c.attempts + 1,
            "claimed_by": None,
            "last_error": error[:500],
        }
        if retry_at is None:
            values["state"] = GAVE_UP
        else:
            values.update(state=PENDING, due_at=utc(retry_at))
        return await self._update_claimed(reminder_id, owner, values)

    async def _update_claimed(self, reminder_id: int, owner: str, values: dict[str, Any]) -> bool:
        async def work(conn: AsyncConnection) -> bool:
            result = await conn.execute(
                update(reminders)
                .where(
                    reminders.c.id == reminder_id,
                    reminders.c.state == SENDING,
                    reminders.c.claimed_by == owner,
                )
                .values(**values)
            )
            return bool(result.rowcount)

        return await self.writer.write(work)

    # -- time zones ---------------------------------------------------------------------------

    async def user_timezone(self, platform: str, user_id: str) -> str | None:
        async with self.engine.connect() as conn:
            found = await conn.scalar(
                select(user_timezones.c.timezone).where(
                    user_timezones.c.platform == platform, user_timezones.c.user_id == user_id
                )
            )
        return str(found) if found is not None else None

    async def set_user_timezone(self, platform: str, user_id: str, zone: str | None) -> None:
        async def work(conn: AsyncConnection) -> None:
            await conn.execute(
                user_timezones.delete().where(
                    user_timezones.c.platform == platform, user_timezones.c.user_id == user_id
                )
            )
            if zone is not None:
                await conn.execute(
                    user_timezones.insert().values(
                        platform=platform, user_id=user_id, timezone=zone, updated_at=now()
                    )
                )

        await self.writer.write(work)
