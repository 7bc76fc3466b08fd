"""Queries on ``documents`` and ``document_chunks``: storing a read file, listing and forgetting
a conversation's files, and the full-text search over its chunks.

The search is the database's own: FTS5 ranked by ``bm25()`` on SQLite; on PostgreSQL a
``tsvector`` column with ``websearch_to_tsquery`` finds the candidates, ranked by BM25 here
(:func:`bm25`).  Callers give plain search terms; each backend quotes them its own way, so
nothing a user types is query syntax.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Row, bindparam, delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.records import ChunkHit, Document
from storage.schema import document_chunks, documents
from storage.writing import Writer, now


@dataclass(frozen=True, slots=True)
class NewChunk:
    ordinal: int
    page: int | None
    char_start: int
    char_end: int
    text: str
    search_text: str
    token_count: int


@dataclass(frozen=True, slots=True)
class NewDocument:
    name: str
    kind: str
    size: int
    pages: int | None
    chars: int
    poster_id: str
    poster_name: str
    platform_message_id: str | None


_SQLITE_SEARCH = text(
    "SELECT c.id, c.document_id, d.name, c.page, c.text, c.search_text, c.token_count, "
    "hits.rank FROM "
    "(SELECT rowid AS id, bm25(document_index, 0.0, 1.0) AS rank FROM document_index "
    "WHERE document_index MATCH :query ORDER BY rank LIMIT :limit) AS hits "
    "JOIN document_chunks c ON c.id = hits.id JOIN documents d ON d.id = c.document_id "
    "WHERE c.conversation_id = :conversation_id ORDER BY hits.rank"
)
COMMON_FROM = 500  # chunks a term must be in before it may be left out of a search
COUNTS_KEPT_S = 60.0
_SQLITE_FREQUENCIES = text("SELECT term, doc FROM document_terms WHERE term IN :terms").bindparams(
    bindparam("terms", expanding=True)
)
_POSTGRES_SEARCH = text(
    "SELECT c.id, c.document_id, d.name, c.page, c.text, c.search_text, c.token_count, "
    "-ts_rank_cd(c.search, q) AS rank "
    "FROM document_chunks c JOIN documents d ON d.id = c.document_id, "
    "websearch_to_tsquery('simple', :query) q "
    "WHERE c.conversation_id = :conversation_id AND c.search @@ q "
    "ORDER BY rank LIMIT :limit"
)


def _document(r: Row[Any], chunks: int = 0) -> Document:
    return Document(
        int(r.id),
        r.name,
        r.kind,
        int(r.size),
        r.pages,
        int(r.chars),
        r.poster_id,
        r.poster_name,
        chunks,
    )


class DocumentQueries:
    def __init__(self, engine: AsyncEngine, writer: Writer) -> None:
        self.engine = engine
        self.writer = writer
        # SQLite: how many chunks hold a term, and in all (see _telling).
        self._counts: dict[str, int] = {}
        self._chunks = 0
        self._counted_at = 0.0
        self._pg_counts: dict[tuple[int, str], int] = {}  # PostgreSQL: per conversation

    async def add(
        self, conversation_id: int, doc: NewDocument, chunks: Sequence[NewChunk]
    ) -> Document:
        """Store a document and its chunks in one write."""

        async def work(conn: AsyncConnection) -> int:
            result = await conn.execute(
                documents.insert()
                .values(
                    conversation_id=conversation_id,
                    name=doc.name,
                    kind=doc.kind,
                    size=doc.size,
                    pages=doc.pages,
                    chars=doc.chars,
                    poster_id=doc.poster_id,
                    poster_name=doc.poster_name,
                    platform_message_id=doc.platform_message_id,
                    created_at=now(),
                )
                .returning(documents.c.id)
            )
            doc_id = int(result.scalar_one())
            if chunks:
                await conn.execute(
                    document_chunks.insert(),
                    [
                        {
                            "document_id": doc_id,
                            "conversation_id": conversation_id,
                            "ordinal": c.ordinal,
                            "page": c.page,
                            "char_start": c.char_start,
                            "char_end": c.char_end,
                            "text": c.text,
                            "search_text": c.search_text,
                            "token_count": c.token_count,
                        }
                        for c in chunks
                    ],
                )
            return doc_id

        doc_id = await self.writer.write(work)
        return Document(
            doc_id,
            doc.name,
            doc.kind,
            doc.size,
            doc.pages,
            doc.chars,
            doc.poster_id,
            doc.poster_name,
            len(chunks),
        )

    async def of(self, conversation_id: int) -> list[Document]:
        """The conversation's documents, oldest first, with their chunk counts."""
        counts = (
            select(document_chunks.c.document_id, func.count().label("n"))
            .where(document_chunks.c.conversation_id == conversation_id)
            .group_by(document_chunks.c.document_id)
            .subquery()
        )
        query = (
            select(documents, func.coalesce(counts.c.n, 0).label("n"))
            .outerjoin(counts, counts.c.document_id == documents.c.id)
            .where(documents.c.conversation_id == conversation_id)
            .order_by(documents.c.id)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_document(r, int(r.n)) for r in rows]

    async def totals(self, conversation_id: int) -> tuple[int, int]:
        """How many documents and chunks the conversation holds."""
        async with self.engine.connect() as conn:
            docs = await conn.scalar(
                select(func.count())
                .select_from(documents)
                .where(documents.c.conversation_id == conversation_id)
            )
            chunks = await conn.scalar(
                select(func.count())
                .select_from(document_chunks)
                .where(document_chunks.c.conversation_id == conversation_id)
            )
        return int(docs or 0), int(chunks or 0)

    async def forget(self, conversation_id: int, document_ids: Sequence[int]) -> int:
        """Delete these documents of the conversation and their chunks; how many went."""
        if not document_ids:
            return 0

        async def work(conn: AsyncConnection) -> int:
            mine = select(documents.c.id).where(
                documents.c.conversation_id == conversation_id,
                documents.c.id.in_(list(document_ids)),
            )
            found = [int(i) for i in (await conn.execute(mine)).scalars()]
            if found:
                # Chunks first: SQLite's index follows them by trigger, whatever the FK setting.
                await conn.execute(
                    delete(document_chunks).where(document_chunks.c.document_id.in_(found))
                )
                await conn.execute(delete(documents).where(documents.c.id.in_(found)))
            return len(found)

        return await self.writer.write(work)

    async def of_messages(
        self, conversation_id: int, platform_message_ids: Sequence[str]
    ) -> list[int]:
        """The ids of the documents that came with these platform messages."""
        query = select(documents.c.id).where(
            documents.c.conversation_id == conversation_id,
            documents.c.platform_message_id.in_(list(platform_message_ids)),
        )
        async with self.engine.connect() as conn:
            return [int(i) for i in (await conn.execute(query)).scalars()]

    async def forget_all(self, conversation_id: int) -> int:
        query = select(documents.c.id).where(documents.c.conversation_id == conversation_id)
        async with self.engine.connect() as conn:
            ids = [int(i) for i in (await conn.execute(query)).scalars()]
        return await self.forget(conversation_id, ids)

    async def _telling(self, conn: AsyncConnection, terms: Sequence[str]) -> list[str]:
        """``terms`` without those in a quarter of many chunks or more.  bm25 weighs a term
        by its rarity: such a term adds little to a chunk's rank (nothing from half the
        chunks up), yet it would make the search score most chunks.  The counts are the
        index's own, kept for a minute (an approximate count only moves that line)."""
        if time.monotonic() - self._counted_at > COUNTS_KEPT_S:
            self._counts.clear()
            self._chunks = int(
                await conn.scalar(select(func.count()).select_from(document_chunks)) or 0
            )
            self._counted_at = time.monotonic()
        unknown = [t for t in terms if t not in self._counts]
        if unknown:
            rows = await conn.execute(_SQLITE_FREQUENCIES, {"terms": unknown})
            self._counts.update(dict.fromkeys(unknown, 0))
            self._counts.update({str(r.term): int(r.doc) for r in rows})
            if len(self._counts) > 100_000:
                self._counted_at = 0.0  # cleared at the next search
        counts = self._counts
        kept = [t for t in terms if counts[t] < max(COMMON_FROM, self._chunks / 4)]
        return kept or sorted(terms, key=lambda t: counts[t])[:2]

    async def search(
        self, conversation_id: int, terms: Sequence[str], limit: int
    ) -> list[ChunkHit]:
        """The conversation's chunks that best match any of ``terms`` (plain words), best
        first."""
        if not terms or limit <= 0:
            return []
        async with self.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                terms = await self._telling(conn, terms)
                # Each term a quoted string: FTS5 syntax in them is only text.  The scope term
                # keeps the search in its conversation (the join checks it again).
                either = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
                query = f'scope : "c{int(conversation_id)}" AND search_text : ({either})'

                statement = _SQLITE_SEARCH
            else:
                return await self._postgres_search(conn, conversation_id, terms, limit)
            params = {"query": query, "conversation_id": conversation_id, "limit": limit}
            rows = (await conn.execute(statement, params)).all()
        return [_hit(r) for r in rows]

    async def _postgres_search(
        self, conn: AsyncConnection, conversation_id: int, terms: Sequence[str], limit: int
    ) -> list[ChunkHit]:
        """PostgreSQL finds the candidates; they are ranked by BM25 here, since
        ``ts_rank_cd`` does not weigh a term by how rare it is (a common word would count as
        much as the subject of the question)."""
        total, counts = await self._postgres_counts(conn, conversation_id, terms)
        # As on SQLite: terms too common to rank would make every chunk a candidate.
        kept = [t for t in terms if counts[t] < max(COMMON_FROM, total / 4)]
        kept = kept or sorted(terms, key=lambda t: counts[t])[:2]
        # websearch_to_tsquery never fails on its input; terms are words already.
        query = " or ".join(kept)
        params = {"query": query, "conversation_id": conversation_id, "limit": max(50, 8 * limit)}
        rows = (await conn.execute(_POSTGRES_SEARCH, params)).all()
        if not rows:
            return []
        hits = [_hit(r) for r in rows]
        scored = bm25([h.terms.split() for h in hits], terms, counts, total)
        ranked = sorted(zip(scored, hits, strict=True), key=lambda pair: -pair[0])[:limit]
        return [replace(h, rank=-score) for score, h in ranked]

    async def _postgres_counts(
        self, conn: AsyncConnection, conversation_id: int, terms: Sequence[str]
    ) -> tuple[int, dict[str, int]]:
        """The conversation's chunks, and how many hold each term (kept for a minute)."""
        if time.monotonic() - self._counted_at > COUNTS_KEPT_S or len(self._pg_counts) > 100_000:
            self._pg_counts.clear()
            self._counted_at = time.monotonic()
        unknown = [t for t in terms if (conversation_id, t) not in self._pg_counts]
        if unknown or (conversation_id, "") not in self._pg_counts:
            held = "SELECT count(*) FROM document_chunks WHERE conversation_id = :c"
            parts = [f"({held}) AS total"] + [
                f"({held} AND search @@ plainto_tsquery('simple', :t{i})) AS n{i}"
                for i in range(len(unknown))
            ]
            values: dict[str, object] = {"c": conversation_id}
            values.update({f"t{i}": t for i, t in enumerate(unknown)})
            row = (await conn.execute(text("SELECT " + ", ".join(parts)), values)).one()
            self._pg_counts[(conversation_id, "")] = int(row.total)
            for i, term in enumerate(unknown):
                self._pg_counts[(conversation_id, term)] = int(getattr(row, f"n{i}"))
        counts = {t: self._pg_counts[(conversation_id, t)] for t in terms}
        return self._pg_counts[(conversation_id, "")], counts


def bm25(
    chunks: Sequence[Sequence[str]],
    terms: Sequence[str],
    counts: dict[str, int],
    total: int,
    k1: float = 1.2,
    b: float = 0.75,
) -> list[float]:
    """Okapi BM25 of each chunk (its terms) for ``terms``, given how many of ``total`` chunks
    hold each term; the IDF is floored above zero, as FTS5 does."""
    lengths = [len(c) for c in chunks]
    average = (sum(lengths) / len(lengths)) if lengths else 1.0
    idf = {
        t: max(1e-6, math.log((total - counts.get(t, 0) + 0.5) / (counts.get(t, 0) + 0.5)))
        for t in terms
    }
    scores = []
    for chunk, length in zip(chunks, lengths, strict=True):
        frequencies = Counter(chunk)
        score = 0.0
        for term in terms:
            f = frequencies.get(term, 0)
            if f:
                score += idf[term] * f * (k1 + 1) / (f + k1 * (1 - b + b * length / average))
        scores.append(score)
    return scores


def _hit(r: Row[Any]) -> ChunkHit:
    return ChunkHit(
        int(r.id),
        int(r.document_id),
        str(r.name),
        r.page,
        str(r.text),
        int(r.token_count),
        str(r.search_text),
        float(r.rank),
    )
