"""Queries on the shared library: imported character cards and world books."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Table, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.schema import characters, world_books
from storage.writing import Writer, now


class LibraryQueries:
    def __init__(self, engine: AsyncEngine, writer: Writer) -> None:
        self.engine = engine
        self.writer = writer

    async def _save(self, table: Table, name: str, data: Mapping[str, Any]) -> None:
        payload = json.dumps(dict(data), ensure_ascii=False)
        stamp = now()

        async def work(conn: AsyncConnection) -> None:
            found = (
                await conn.execute(select(table.c.id).where(table.c.name == name))
            ).scalar_one_or_none()
            if found is None:
                await conn.execute(
                    table.insert().values(
                        name=name, data=payload, created_at=stamp, updated_at=stamp
                    )
                )
            else:
                await conn.execute(
                    update(table).where(table.c.id == found).values(data=payload, updated_at=stamp)
                )

        await self.writer.write(work)

    async def _load(self, table: Table) -> dict[str, dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(table.c.name, table.c.data))).all()
        return {r.name: json.loads(r.data) for r in rows}

    async def save_card(self, name: str, card: Mapping[str, Any]) -> None:
        await self._save(characters, name, card)

    async def cards(self) -> dict[str, dict[str, Any]]:
        return await self._load(characters)

    async def save_world_book(self, name: str, book: Mapping[str, Any]) -> None:
        await self._save(world_books, name, book)

    async def world_books(self) -> dict[str, dict[str, Any]]:
        return await self._load(world_books)
