"""Streaming a reply into platform messages: throttled edits, continuation messages, final pass.

Every platform adapter provides a :class:`MessageSink`; :func:`stream_reply` decides when to send
and when to edit, so the throttling and splitting rules live in one place.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from adapters.text import split_message
from bot.messages import OutgoingReply


class MessageSink(Protocol):
    """Sends and edits the messages of one reply.  ``final`` marks the last write of a chunk."""

    async def send_chunk(self, text: str, reply: OutgoingReply, final: bool) -> str: ...

    async def edit_chunk(
        self, message_id: str, text: str, reply: OutgoingReply, final: bool
    ) -> None: ...


async def chain(
    first: OutgoingReply, rest: AsyncIterator[OutgoingReply]
) -> AsyncIterator[OutgoingReply]:
    """``first`` followed by ``rest`` (to put back a snapshot read ahead)."""
    yield first
    async for reply in rest:
        yield reply


async def single(reply: OutgoingReply) -> AsyncIterator[OutgoingReply]:
    """A complete reply as a one-snapshot stream."""
    yield reply


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """A platform's message size and how often a streamed reply may be edited."""

    max_chars: int
    edit_interval: float = 1.0
    min_new_chars: int = 20


async def stream_reply(
    replies: AsyncIterator[OutgoingReply],
    sink: MessageSink,
    limits: StreamLimits,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """Render reply snapshots into messages; return the platform ids of all messages sent.

    Intermediate snapshots are written at most once per ``edit_interval`` and only after
    ``min_new_chars`` new characters; the final snapshot is always written, each chunk once more
    with ``final=True`` so the sink can apply formatting.
    """
    all_ids: list[str] = []
    sent: list[tuple[str, str]] = []  # (message id, text it shows) of the current reply
    last_write = float("-inf")
    written = 0

    async def write(reply: OutgoingReply, final: bool) -> None:
        chunks = split_message(reply.text, limits.max_chars) or ["…"]
        for i, chunk in enumerate(chunks):
            if i < len(sent):
                message_id, shown = sent[i]
                if shown != chunk or final:
                    await sink.edit_chunk(message_id, chunk, reply, final)
                    sent[i] = (message_id, chunk)
            else:
                message_id = await sink.send_chunk(chunk, reply, final)
                sent.append((message_id, chunk))
                all_ids.append(message_id)

    async for reply in replies:
        if reply.final:
            await write(reply, True)
            # Several replies may follow one message (a greeting, then several characters):
            # the next snapshot starts new messages.
            sent, last_write, written = [], float("-inf"), 0
            continue
        now = clock()
        if now - last_write < limits.edit_interval:
            continue
        if len(reply.text) - written < limits.min_new_chars and written:
            continue
        if not reply.text.strip():
            continue
        await write(reply, False)
        last_write, written = clock(), len(reply.text)
    return all_ids
