"""Text pieces handed from a generation thread to the coroutine streaming them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from ai_model.base import GenerationError

DONE = object()  # the last item a generation hands over


class Handoff:
    """A thread calls :meth:`emit` with text pieces, an exception, then :data:`DONE`; the
    event loop iterates :meth:`pieces`.  ``cancel`` is set once nobody listens any more (the
    consumer stopped, or the loop closed), so the thread can stop generating."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self.cancel = threading.Event()

    def emit(self, item: object) -> None:
        """Thread-safe."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
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
