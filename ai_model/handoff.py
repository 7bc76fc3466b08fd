"""Text pieces handed from a generation thread to the coroutine streaming them."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator

from ai_model.base import GenerationError

DONE = object()  # the last item a generation hands over


class Mailbox:
    """Items posted from threads to the queues of one event loop, handed over by a thread of
    its own.

    A thread that wakes the loop itself (``call_soon_threadsafe`` writes to the loop's wake-up
    pipe, releasing the GIL for the write) hands the GIL to the woken loop and waits until the
    loop is done with the item: 0.15 ms a token for the batched scheduler on 2 cores, 1.3 % of
    a step.  Posting only sets an event, which releases no GIL; the mailbox's thread wakes the
    loop once the poster next releases the GIL (in ``llama_decode``), so the loop takes the
    pieces while the next token is computed.  Items posted before the loop is woken ride on
    one wake-up.  (On 2 cores the loop's work then shares the cores with the decode: four
    streams gained 1.1 % tokens/s, one stream nothing measurable.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[object], object]] = []
        self._due = threading.Event()
        threading.Thread(target=self._wake, name="handoff", daemon=True).start()

    def post(self, queue: asyncio.Queue[object], item: object) -> None:
        """Thread-safe; RuntimeError if the loop is closed."""
        if self._loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append((queue, item))
        self._due.set()

    def _wake(self) -> None:
        while not self._loop.is_closed():
            if not self._due.wait(timeout=1.0):
                continue
            self._due.clear()
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # closed meanwhile: nobody will take the items
                break
        _mailboxes.pop(self._loop, None)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
    weakref.WeakKeyDictionary()
)


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The one mailbox of ``loop`` (called on the loop's thread)."""
    found = _mailboxes.get(loop)
    if found is None:
        found = _mailboxes[loop] = Mailbox(loop)
    return found


class Handoff:
    """A thread calls :meth:`emit` with text pieces, an exception, then :data:`DONE`; the
    event loop iterates :meth:`pieces`.  ``cancel`` is set once nobody listens any more (the
    consumer stopped, or the loop closed), so the thread can stop generating."""

    def __init__(self) -> None:
        self._mailbox = mailbox(asyncio.get_running_loop())
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self.cancel = threading.Event()

    def emit(self, item: object) -> None:
        """Thread-safe."""
        try:
            self._mailbox.post(self._queue, item)
        except RuntimeError:  # the loop closed while we generated: nobody is listening
            self.cancel.set()

    async def pieces(self) -> AsyncIterator[str]:
        """The text pieces until :data:`DONE`; an emitted exception becomes a GenerationError."""
        try:
            while True:
                item = await self._queue.get()
                if item is DONE:
                    return
                if isinstance(item, Exception):
                    raise GenerationError(f"generation failed: {item}") from item
                assert isinstance(item, str)
                yield item
        finally:
            self.cancel.set()
