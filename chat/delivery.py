"""What reached the platform: the adapters' delivery reports, recorded as reply states.

Adapters report each new platform message of an answer (:meth:`Delivery.piece_sent`) and each
final delivery (:meth:`Delivery.delivered`); a :class:`adapters.streaming.DeliveryTracker`.
A command that rewrites the last reply first waits until that reply reached the platform
(:meth:`Delivery.shown`): only then are the messages that show it known.
"""

from __future__ import annotations

import asyncio
import logging

from chat.fairness import LruDict
from chat.faults import KillPoints
from chat.messages import OutgoingReply, ReplyKind
from storage.records import ANSWERING, StoredMessage
from storage.store import STORAGE_ERRORS, Store

log = logging.getLogger(__name__)

# A command that rewrites the last reply waits this long for it to reach the platform.
SHOWN_WAIT_S = 15.0
STILL_SENDING = "My last reply is still on its way to the chat; try again in a moment."
MAX_SENDING = 4096  # replies whose delivery is awaited, remembered at most


class Delivery:
    """Delivery reports, and the answers an adapter is still delivering (by question)."""

    def __init__(self, store: Store, kill_points: KillPoints) -> None:
        self.store = store
        self.kill_points = kill_points
        self._sending: LruDict[int, asyncio.Event] = LruDict(MAX_SENDING)

    async def shown(self, reply: StoredMessage) -> bool:
        """Wait (a while) until the answer ``reply`` reached the platform, if an adapter is
        delivering it, so that the messages showing it are known; False if it did not in
        time."""
        if reply.reply_to_id is None or reply.swipe_of is not None:
            return True
        sending = self._sending.get(reply.reply_to_id)
        if sending is None:
            return True
        try:
            await asyncio.wait_for(sending.wait(), SHOWN_WAIT_S)
        except TimeoutError:
            return False
        return True

    async def piece_sent(self, reply: OutgoingReply, pieces: list[str]) -> None:
        """A new platform message of the answer to ``reply.answers`` is showing."""
        if reply.answers is None or reply.kind is not ReplyKind.ANSWER:
            return
        if self._sending.get(reply.answers) is None:
            self._sending[reply.answers] = asyncio.Event()
        try:
            await self.store.replies.set_state(reply.answers, ANSWERING, pieces=pieces)
        except STORAGE_ERRORS as exc:
            log.warning("could not record the pieces of answer %s: %s", reply.answers, exc)
        self.kill_points.reached("streaming")

    async def delivered(self, reply: OutgoingReply, pieces: list[str]) -> None:
        """The final text of a stored reply reached the platform: a speaker's answer (its
        question is answered once every planned speaker's is), or another version or a
        continuation (where it shows is recorded)."""
        if reply.stored_id is None:
            return
        try:
            if reply.answers is None:
                await self.store.replies.set_pieces(reply.stored_id, pieces)
            else:
                await self.store.replies.mark_delivered(
                    reply.stored_id, pieces[0] if pieces else None, reply.answers, pieces
                )
        except STORAGE_ERRORS as exc:
            log.warning("could not record where reply %s shows: %s", reply.stored_id, exc)
        finally:
            if reply.answers is not None and (sending := self._sending.pop(reply.answers)):
                sending.set()
