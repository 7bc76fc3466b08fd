"""Engine creation: SQLite in WAL mode (or any SQLAlchemy async URL), migrations at start-up."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from storage.migrations import migrate

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers proceed while a reply is being written; NORMAL sync is durable in WAL mode
    # across application crashes, and foreign keys are off by default in SQLite.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def create_engine(url: str) -> AsyncEngine:
    """An async engine for ``url``; for a SQLite file the folder is created and WAL enabled."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    if parsed.get_backend_name() == "sqlite":
        # Two connections: the store writes through one (SQLite has a single writer) and reads
        # through the other; WAL lets them work at the same time.
        engine = create_async_engine(url, pool_size=2, max_overflow=0)
    else:
        engine = create_async_engine(url)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


async def open_database(url: str) -> AsyncEngine:
    """Create the engine and bring the schema up to date."""
    engine = create_engine(url)
    async with engine.begin() as conn:
        applied = await conn.run_sync(migrate)
    for name in applied:
        log.info("database migration applied: %s", name)
    return engine
