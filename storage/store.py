"""The one :class:`Store` the engine uses: a query group per table family, one writer."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from storage.queries.conversations import ConversationQueries
from storage.queries.documents import DocumentQueries
from storage.queries.library import LibraryQueries
from storage.queries.messages import MessageQueries
from storage.queries.reminders import ReminderQueries
from storage.queries.replies import ReplyQueries
from storage.queries.summaries import SummaryQueries
from storage.writing import STORAGE_ERRORS, Writer, is_busy

__all__ = ["STORAGE_ERRORS", "Store", "is_busy"]


class Store:
    """Queries over one database engine; safe to share between tasks.

    ``conversations``, ``messages``, ``replies`` (reply states), ``summaries``, ``library``
    (cards and world books), ``documents`` (posted files) and ``reminders`` each hold the
    queries on their tables; every write goes through one :class:`storage.writing.Writer`.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.writer = Writer(engine)
        self.conversations = ConversationQueries(engine, self.writer)
        self.messages = MessageQueries(engine, self.writer)
        self.replies = ReplyQueries(engine, self.writer)
        self.summaries = SummaryQueries(engine, self.writer)
        self.library = LibraryQueries(engine, self.writer)
        self.documents = DocumentQueries(engine, self.writer)
        self.reminders = ReminderQueries(engine, self.writer)

    async def ping(self) -> None:
        """One round trip to the database (raises one of :data:`STORAGE_ERRORS` if down)."""
        async with self.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")

    async def close(self) -> None:
        await self.messages.close()
        await self.writer.close()
        await self.engine.dispose()
