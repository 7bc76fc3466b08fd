"""The adapter interface every platform implements, and the shared way to stream a reply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from chat.messages import OutgoingReply


@dataclass(frozen=True, slots=True)
class SentMessage:
    """A platform message the adapter sent and may edit later."""

    conversation_key: str
    message_id: str
    text: str


class Adapter(Protocol):
    """A platform connection: ``start`` runs until ``stop``; ``send``/``edit`` deliver replies.

    Each implementation names its platform limits as class constants (``MAX_MESSAGE_CHARS``).
    """

    name: str

    @property
    def connected(self) -> bool:
        """Whether the platform connection is up now (for the readiness check)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def stop_intake(self) -> None:
        """Take no new messages (answers in flight go on); the first step of a graceful stop."""
        ...

    async def send(self, reply: OutgoingReply) -> SentMessage: ...

    async def edit(self, sent: SentMessage, reply: OutgoingReply) -> SentMessage: ...


async def deliver(adapter: Adapter, replies: AsyncIterator[OutgoingReply]) -> list[SentMessage]:
    """Send each reply's first snapshot and edit it with the later ones; a final snapshot
    closes that reply, and the next snapshot starts a new message."""
    done: list[SentMessage] = []
    sent: SentMessage | None = None
    async for reply in replies:
        if sent is None:
            sent = await adapter.send(reply)
        else:
            sent = await adapter.edit(sent, reply)
        if reply.final:
            done.append(sent)
            sent = None
    return done
