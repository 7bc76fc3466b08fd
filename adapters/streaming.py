"""Streaming a reply into platform messages: throttled edits, continuation messages, final pass.

Every platform adapter provides a :class:`MessageSink`; :func:`stream_reply` decides when to send
and when to edit, so the throttling and splitting rules live in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from adapters.text import split_message
from chat.messages import OutgoingReply

log = logging.getLogger(__name__)

# Pauses between attempts to deliver a finished reply: about 2 minutes of outage is waited out
# (then the reply stays stored, undelivered, and the next start delivers it).
DELIVERY_RETRY_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


class MessageSink(Protocol):
    """Sends and edits the messages of one reply.  ``final`` marks the last write of a chunk."""

    async def send_chunk(self, text: str, reply: OutgoingReply, final: bool) -> str: ...

    async def edit_chunk(
        self, message_id: str, text: str, reply: OutgoingReply, final: bool
    ) -> None: ...

    async def delete_chunk(self, message_id: str) -> None: ...


class DeliveryTracker(Protocol):
    """Told what reached the platform (the core records it; see ``chat.core``).

    Both are called only for replies that answer a stored message (``reply.answers``), and
    never raise: a failure to record is the tracker's to log.
    """

    async def piece_sent(self, reply: OutgoingReply, pieces: list[str]) -> None: ...

    async def delivered(self, reply: OutgoingReply, pieces: list[str]) -> None: ...


class DeliveredOnly:
    """A tracker that reports final deliveries but not the pieces: for messages a restart
    could not edit (a Discord interaction's response expires with its token)."""

    def __init__(self, tracker: DeliveryTracker) -> None:
        self.tracker = tracker

    async def piece_sent(self, reply: OutgoingReply, pieces: list[str]) -> None:
        return None

    async def delivered(self, reply: OutgoingReply, pieces: list[str]) -> None:
        await self.tracker.delivered(reply, pieces)


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
    retry_delays: tuple[float, ...] = DELIVERY_RETRY_S


async def stream_reply(
    replies: AsyncIterator[OutgoingReply],
    sink: MessageSink,
    limits: StreamLimits,
    clock: Callable[[], float] = time.monotonic,
    *,
    tracker: DeliveryTracker | None = None,
    resume: Sequence[str] = (),
    versions_in_place: bool = True,
) -> list[str]:
    """Render reply snapshots into messages; return the platform ids of all messages sent.

    Intermediate snapshots are written at most once per ``edit_interval`` and only after
    ``min_new_chars`` new characters; the final snapshot is always written, each chunk once more
    with ``final=True`` so the sink can apply formatting.

    Delivery never decides the reply: when a send or an edit fails, the snapshots are still read
    to the end (so the reply is written and stored), and each final text is then delivered with
    retries (``limits.retry_delays``), editing what was shown before the failure.

    ``tracker`` hears of each new message of an answer and of its final delivery.  ``resume``
    lists messages an earlier run streamed the answer into: the first reply edits them
    (deleting any it no longer needs) instead of sending new ones.  A reply that names the
    messages it ``replaces`` (chosen by the engine in the conversation's turn) is written into
    them: always when it grows there (/continue), and for a new version (/regenerate, /swipe)
    when ``versions_in_place`` (else it is posted anew).
    """
    all_ids: list[str] = []
    # (message id, text it shows) of the current reply
    sent: list[tuple[str, str]] = [(message_id, "") for message_id in resume]
    undelivered: list[tuple[OutgoingReply, list[tuple[str, str]]]] = []
    last_write = float("-inf")
    written = 0
    broken = False

    async def write(reply: OutgoingReply, final: bool, shown: list[tuple[str, str]]) -> None:
        chunks = split_message(reply.text, limits.max_chars) or ["…"]
        for i, chunk in enumerate(chunks):
            if i < len(shown):
                message_id, text = shown[i]
                if text != chunk or final:
                    await sink.edit_chunk(message_id, chunk, reply, final)
                    shown[i] = (message_id, chunk)
            else:
                message_id = await sink.send_chunk(chunk, reply, final)
                shown.append((message_id, chunk))
                all_ids.append(message_id)
                if tracker is not None and reply.answers is not None:
                    await tracker.piece_sent(reply, [m for m, _ in shown])
        if final:
            # Messages an earlier, longer version was streamed into: no stub stays behind.
            while len(shown) > len(chunks):
                message_id, _ = shown.pop()
                try:
                    await sink.delete_chunk(message_id)
                except Exception as exc:  # cosmetic by now: the answer itself is shown
                    log.warning("could not delete message %s: %r", message_id, exc)
            if tracker is not None and (reply.answers is not None or reply.stored_id is not None):
                await tracker.delivered(reply, [m for m, _ in shown])

    async for reply in _ahead(replies):
        if not sent and reply.replaces and (reply.grows or versions_in_place):
            sent = [(message_id, "") for message_id in reply.replaces]
        if broken:
            if reply.final:
                undelivered.append((reply, sent))
                sent = []
            continue
        try:
            if reply.final:
                await write(reply, True, sent)
                # Several replies may follow one message (a greeting, then several
                # characters): the next snapshot starts new messages.
                sent, last_write, written = [], float("-inf"), 0
                continue
            now = clock()
            if now - last_write < limits.edit_interval:
                continue
            if len(reply.text) - written < limits.min_new_chars and written:
                continue
            if not reply.text.strip():
                continue
            await write(reply, False, sent)
            last_write, written = clock(), len(reply.text)
        except Exception as exc:  # the platform's failure, of whatever kind
            log.warning(
                "delivery in %s failed (%r): the reply is finished first, then delivered",
                reply.conversation_key,
                exc,
            )
            broken = True
            if reply.final:
                undelivered.append((reply, sent))
                sent = []
    for reply, shown in undelivered:
        await _with_retries(write, reply, shown, limits)
    return all_ids


async def _ahead(replies: AsyncIterator[OutgoingReply]) -> AsyncIterator[OutgoingReply]:
    """``replies``, read to the end in a task of their own as fast as they come.

    A slow or hanging platform call then never holds up the generation or the storing of the
    reply.  A snapshot the writer had no time for is replaced by the next one (each carries
    the whole text so far); final snapshots are always kept, in order.
    """
    buffer: deque[OutgoingReply] = deque()
    ready = asyncio.Event()
    finished = False
    failure: Exception | None = None

    async def pump() -> None:
        nonlocal finished, failure
        try:
            async for reply in replies:
                if buffer and not buffer[-1].final and not reply.final:
                    buffer[-1] = reply
                else:
                    buffer.append(reply)
                ready.set()
        except Exception as exc:  # the writer re-raises it once it has caught up
            failure = exc
        finally:
            finished = True
            ready.set()

    task = asyncio.create_task(pump())
    try:
        while buffer or not finished:
            if not buffer:
                ready.clear()
                await ready.wait()
                continue
            yield buffer.popleft()
        if failure is not None:
            raise failure
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _with_retries(
    write: Callable[[OutgoingReply, bool, list[tuple[str, str]]], Awaitable[None]],
    reply: OutgoingReply,
    shown: list[tuple[str, str]],
    limits: StreamLimits,
) -> bool:
    for delay in (*limits.retry_delays, None):
        try:
            await write(reply, True, shown)
            return True
        except Exception as exc:
            if delay is None:
                # Stored all the same: /regenerate and /swipe still reach it.
                log.error(
                    "could not deliver the reply %s in %s: %r",
                    reply.stored_id,
                    reply.conversation_key,
                    exc,
                )
                return False
            await asyncio.sleep(delay)
    return False


FINISH_DELIVERY_S = 5.0  # at a stop, how long handlers whose answer is written may deliver it


async def finish_then_cancel(tasks: set[asyncio.Task[Any]], within: float) -> None:
    """Let running handlers finish (their answers are usually written and only being
    delivered) for up to ``within`` seconds, then cancel the rest and wait for them: none may
    touch the database after it is closed."""
    running = [task for task in tasks if not task.done()]
    if running and within > 0:
        await asyncio.wait(running, timeout=within)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
