"""Polling until the bot under test has done something (for the fake platform servers)."""

from __future__ import annotations

import asyncio
import socket
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
        found = [
            m.text for m in await store.messages.history(conversation_id) if m.role == "assistant"
        ]
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a stored reply")
        await asyncio.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
