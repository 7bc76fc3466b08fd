"""The documents bench (``python -m bot bench --documents``): reading a 200-page PDF, searching
10,000 chunks of one conversation, and the first token with excerpts against without.

Everything runs the bot's own path: the reading process, chunking in the embedded model's
tokens, the SQLite full-text index, the prompt with its excerpts, the real embedded model.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ai_model.config import ModelSettings
from ai_model.registry import ModelRegistry
from bot.bench.common import bench_settings, first_token_s, log, sentence
from bot.bench.corpus import corpus
from chat.core import ConversationCore
from chat.documents.limits import DocumentSettings
from chat.messages import Attachment, IncomingMessage
from storage import Store, open_database

PDF_PAGES = 200
SEARCH_CHUNKS = 10_000
SEARCHES = 300
TTFT_REPEATS = 5


def text_pdf(pages: list[list[str]]) -> bytes:
    """A plain PDF of text lines in Helvetica, one list of lines per page (no library)."""
    objects: list[bytes] = [b"", b"", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        ops = [b"BT /F1 10 Tf 12 TL 50 760 Td"]
        for line in lines:
            safe = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(b"(" + safe.encode("latin-1", "replace") + b") Tj T*")
        ops.append(b"ET")
        stream = b"\n".join(ops)
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        content = len(objects)
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % content
        )
        kids.append(b"%d 0 R" % len(objects))
    objects[0] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[1] = b"<< /Type /Pages /Kids [" + b" ".join(kids) + b"] /Count %d >>" % len(kids)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def vocabulary(rng: random.Random, size: int = 5000) -> tuple[list[str], list[float]]:
    """Pseudo-words with Zipf frequencies (a word's weight is 1 / its rank), as in prose: a
    few words are in most chunks, most words in few."""
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "dri", "nel", "po", "qua", "zen"]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words, [1 / rank for rank in range(1, size + 1)]


def _file(name: str, data: bytes) -> Attachment:
    async def read() -> bytes:
        return data

    return Attachment(name, len(data), read)


def _posted(key: str) -> IncomingMessage:
    return IncomingMessage("bench", key, "u1", "Ann", "", is_dm=True)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(quick: bool = False) -> dict[str, Any]:
    rng = random.Random(5)
    results: dict[str, Any] = {"quick": quick}
    with tempfile.TemporaryDirectory(prefix="localbot-docs-bench-") as folder:
        base = ModelSettings()
        model = replace(base, sampling=replace(base.sampling, max_tokens=16, temperature=0.0))
        settings = bench_settings(Path(folder) / "bench.db", model)
        settings = replace(
            settings, documents=DocumentSettings(max_chunks=SEARCH_CHUNKS * 2, max_documents=100)
        )
        registry = ModelRegistry(settings.models)
        store = Store(await open_database(settings.database_url))
        core = ConversationCore(settings, store, registry)
        await registry.get("office")

        # Reading: a 200-page PDF, through the reading process, the chunker and the index.
        pages = 20 if quick else PDF_PAGES
        pdf = text_pdf([[sentence(rng, 12) for _ in range(40)] for _ in range(pages)])
        start = time.perf_counter()
        lines = await core.postings.receive(_posted("ingest"), [_file("big.pdf", pdf)])
        ingest_s = time.perf_counter() - start
        assert lines and lines[0].startswith("Read big.pdf"), lines
        conv = await core.conversations.get("bench", "ingest")
        chunks = (await store.documents.totals(conv.id))[1]
        results.update(
            pdf_pages=pages,
            pdf_mb=round(len(pdf) / 1e6, 2),
            ingest_s=round(ingest_s, 2),
            ingest_chunks=chunks,
            ingest_chunks_per_s=round(chunks / ingest_s, 1),
        )
        log(f"ingest: {pages} pages, {chunks} chunks in {ingest_s:.2f} s")

        # Searching 10,000 chunks of one conversation (stored directly: the reading is above).
        from chat.documents.terms import search_text
        from storage.queries.documents import NewChunk, NewDocument

        conv = await core.conversations.get("bench", "search")
        total = 1000 if quick else SEARCH_CHUNKS
        per_doc = 250
        words, weights = vocabulary(rng)
        for d in range(total // per_doc):
            texts = [" ".join(rng.choices(words, weights, k=150)) for _ in range(per_doc)]
            await store.documents.add(
                conv.id,
                NewDocument(f"d{d}.txt", "text", 1, None, 1, "u1", "Ann", None),
                [NewChunk(i, None, 0, len(t), t, search_text(t), 200) for i, t in enumerate(texts)],
            )
        times = []
        for _ in range(100 if quick else SEARCHES):
            question = " ".join(rng.choices(words, weights, k=6))
            start = time.perf_counter()
            await core.documents.search(conv.id, [question])
            times.append((time.perf_counter() - start) * 1000)
        # The same 200 questions as the tests' corpus, its 50 files among those chunks.
        generated = corpus()
        for name, body in generated.documents:
            await core.postings.receive(_posted("search"), [_file(name, body.encode())])
        found = 0
        for question, fact, name in generated.questions:
            hits = await core.documents.search(conv.id, [question])
            found += any(fact in h.text and h.document_name == name for h in hits)
        results["search_recall_at_10k"] = round(found / len(generated.questions), 3)
        results.update(
            search_chunks=total,
            search_p50_ms=round(statistics.median(times), 2),
            search_p99_ms=round(_pct(times, 0.99), 2),
        )
        log(
            f"search over {total} chunks: p50 {results['search_p50_ms']} ms, "
            f"p99 {results['search_p99_ms']} ms, recall {results['search_recall_at_10k']}"
        )

        # First token in one warm conversation: the same questions before its document is
        # posted (no excerpts) and after (excerpts placed before each question).
        key = "ttft"
        questions = [
            "what do the clauses say about the budget meeting?",
            "which clause covers the client invoice?",
            "is there a clause about travel and weather?",
        ]
        await first_token_s(core, key, "hello")  # the conversation is evaluated once
        repeats = 2 if quick else TTFT_REPEATS
        without = [await first_token_s(core, key, questions[i % 3]) for i in range(repeats)]
        doc = "\n".join(f"Clause {i}. " + sentence(rng, 30) for i in range(60))
        await core.postings.receive(_posted(key), [_file("clauses.txt", doc.encode())])
        with_docs = [await first_token_s(core, key, questions[i % 3]) for i in range(repeats)]
        results.update(
            ttft_without_documents_s=round(statistics.median(without), 3),
            ttft_with_documents_s=round(statistics.median(with_docs), 3),
        )
        results["ttft_documents_ratio"] = round(
            results["ttft_with_documents_s"] / results["ttft_without_documents_s"], 2
        )
        log(f"first token: without {without}, with {with_docs}")
        office = await registry.get("office")
        for a in list(office.scheduler.admissions)[-6:]:  # type: ignore[attr-defined]
            log(f"admission {a.event}: reused {a.reused}, computed {a.computed}")
        await core.memory.close()
        registry.close()
        await store.close()
    return results


def main(quick: bool = False) -> int:
    print(json.dumps(asyncio.run(run(quick)), sort_keys=True))
    return 0
