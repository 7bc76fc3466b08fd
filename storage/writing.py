"""The one connection that writes, and the waiting out of a busy or locked database.

SQLite has a single writer: funnelling every write through one connection (readers use the
pool) means writers queue here instead of sleeping in SQLite's busy handler, and the connection
stays checked out, which saves a pool round trip per write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger(__name__)

T = TypeVar("T")
# A busy or locked database is waited out: SQLite's own busy timeout first, then these pauses.
BUSY_RETRY_DELAYS_S = (0.1, 0.3, 1.0, 2.0, 4.0)
# What a failing database raises through SQLAlchemy and the drivers (a value the driver cannot
# encode surfaces as ValueError).
STORAGE_ERRORS = (SQLAlchemyError, OSError, ValueError)


def now() -> datetime:
    return datetime.now(UTC)


def is_busy(exc: BaseException) -> bool:
    """A write that failed only because another connection holds the database."""
    text = str(exc).lower()
    return isinstance(exc, OperationalError) and (
        "locked" in text or "busy" in text or "deadlock" in text or "could not serialize" in text
    )


class Writer:
    """Write transactions on one connection, retried while the database is busy."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._lock = asyncio.Lock()
        self._conn: AsyncConnection | None = None

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        async with self._lock:
            if self._conn is None:
                self._conn = await self.engine.connect()
            async with self._conn.begin():
                yield self._conn

    async def write(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
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
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
