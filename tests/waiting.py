"""Polling until the bot under test has done something (for the fake platform servers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from storage import Store


async def wait_until(predicate: Callable[[], object], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the bot")
        await asyncio.sleep(0.05)


async def stored_replies(store: Store, conversation_id: int, within: float = 30.0) -> list[str]:
    """The bot replies stored in a conversation, once there is at least one."""
    deadline = time.monotonic() + within
    while True:
        found = [m.text for m in await store.history(conversation_id) if m.role == "assistant"]
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a stored reply")
        await asyncio.sleep(0.05)
