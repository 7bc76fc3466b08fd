"""Each conversation's order, and each user's fair share of the model.

Within one conversation, what arrives (messages, commands, edits) takes effect in arrival
order: every event takes its :class:`Arrival` at once, synchronously, when the platform hands it
over, and does its intake (storing a message, taking the boundary of a /reset) only after the
events before it did theirs, even when it first waits on the network (a rights check).  Answers
then take their turns one at a time (:class:`Ticket`); different conversations only share the
model queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType

from chat.fairness import LruDict, RateLimiter, Verdict
from chat.messages import OutgoingReply, notice
from chat.metrics import Metrics
from chat.settings import Settings

log = logging.getLogger(__name__)

RATE_LIMITED = (
    "You are sending messages faster than I can read them (at most {limit} a minute). "
    "I will skip your messages for a moment; please slow down."
)
QUEUE_FULL = (
    "I am still answering earlier messages here. I have saved yours as part of the "
    "conversation, but I will not answer it separately."
)
USER_BUSY = (
    "I am still working on your earlier message. I have saved this one as part of the "
    "conversation; please wait for my answer before sending more."
)
MAX_CONVERSATIONS_CACHED = 4096  # conversation queues kept in memory (busy ones are kept anyway)


class Arrival:
    """A place in a conversation's intake order, taken when an event arrives.

    ``async with arrival:`` waits for the events that arrived before it to finish their intake,
    and ends this one's.  An arrival that is never entered must be :meth:`settle`\\ d (adapters
    do it when their handler ends), or the events after it would wait for ever.
    """

    __slots__ = ("_mine", "_previous")

    def __init__(self, previous: asyncio.Future[None] | None, mine: asyncio.Future[None]):
        self._previous = previous
        self._mine = mine

    async def __aenter__(self) -> Arrival:
        if self._previous is not None and not self._previous.done():
            await asyncio.wait({self._previous})
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.settle()

    def settle(self) -> None:
        if not self._mine.done():
            self._mine.set_result(None)

    @property
    def settled(self) -> bool:
        return self._mine.done()


@dataclass(slots=True)
class Ticket:
    """A place in a conversation's answering queue."""

    channel: ChannelQueue
    previous: asyncio.Future[None] | None
    mine: asyncio.Future[None]
    user: str | None = None  # who the answer is for, counted against their pending share
    on_release: Callable[[], None] | None = None

    async def wait(self) -> None:
        if self.previous is not None and not self.previous.done():
            await asyncio.wait({self.previous})

    def release(self) -> None:
        if not self.mine.done():
            self.mine.set_result(None)
            self.channel.waiting -= 1
        if self.channel.tail is self.mine:
            self.channel.tail = None
        if self.on_release is not None:
            self.on_release()


@dataclass(slots=True)
class ChannelQueue:
    """One conversation's intake order and answering queue."""

    intake_tail: asyncio.Future[None] | None = None
    tail: asyncio.Future[None] | None = None
    waiting: int = 0  # answers queued or running
    arriving: int = 0  # events that took an arrival and have not settled it

    def busy(self) -> bool:
        return self.waiting > 0 or self.arriving > 0


class Queues:
    """The conversations' queues and the fair-share rules (rate limit, queued answers)."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_ticket: Callable[[str], None] = lambda _key: None,
        on_release: Callable[[str], None] = lambda _key: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._on_ticket = on_ticket  # memory: a summary never runs beside a turn
        self._on_release = on_release  # memory: the conversation may be quiet now
        self._channels: LruDict[str, ChannelQueue] = LruDict(
            MAX_CONVERSATIONS_CACHED, ChannelQueue.busy
        )
        self._pending: dict[str, int] = {}  # user -> answers queued or running for them
        self.rate_limiter = RateLimiter(settings.rate_limit)

    def __len__(self) -> int:
        return len(self._channels)

    @property
    def capacity(self) -> int:
        return self._channels.capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._channels.capacity = value

    def channel(self, key: str) -> ChannelQueue:
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = ChannelQueue()
        return channel

    def busy(self, key: str) -> bool:
        channel = self._channels.get(key)
        return channel is not None and channel.busy()

    def busy_count(self) -> int:
        return sum(1 for key in list(self._channels) if self.busy(key))

    # -- order --------------------------------------------------------------------------------

    def arrive(self, key: str) -> Arrival:
        """Take the next place in ``key``'s intake order (synchronously: call it when the event
        arrives, before anything is awaited)."""
        channel = self.channel(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        arrival = Arrival(channel.intake_tail, mine)
        channel.intake_tail = mine
        channel.arriving += 1

        def settled(_f: asyncio.Future[None]) -> None:
            channel.arriving -= 1
            if channel.intake_tail is mine:
                channel.intake_tail = None

        mine.add_done_callback(settled)
        return arrival

    def ticket(self, key: str, user: str | None = None) -> Ticket:
        """Take the next answering turn of ``key`` (synchronously: arrival order is kept)."""
        channel = self.channel(key)
        loop = asyncio.get_running_loop()
        ticket = Ticket(
            channel, channel.tail, loop.create_future(), user, lambda: self._on_release(key)
        )
        self._on_ticket(key)
        channel.tail = ticket.mine
        channel.waiting += 1
        if user is not None:
            self._pending[user] = self._pending.get(user, 0) + 1
            ticket.mine.add_done_callback(lambda _f: self._done_pending(user))
        return ticket

    def _done_pending(self, user: str) -> None:
        left = self._pending.get(user, 0) - 1
        if left > 0:
            self._pending[user] = left
        else:
            self._pending.pop(user, None)

    @asynccontextmanager
    async def turn(self, key: str, arrival: Arrival | None = None) -> AsyncIterator[None]:
        """The conversation's turn, after everything that arrived before (``arrival``)."""
        async with arrival or self.arrive(key):
            ticket = self.ticket(key)
            try:
                await ticket.wait()
                yield
            finally:
                ticket.release()

    async def in_turn(
        self,
        platform: str,
        key: str,
        user_id: str | None,
        work: AsyncGenerator[OutgoingReply, None],
        arrival: Arrival | None = None,
    ) -> AsyncIterator[OutgoingReply]:
        """Run ``work``, a command that makes the model write (``user_id`` asked; None: the bot
        itself), in the conversation's answering queue under the fair-share rules, or say why
        not.  ``work`` has not started yet: refused, it never runs."""
        user_key = None
        try:
            async with arrival or self.arrive(key):
                if user_id is not None:
                    allowed, told = self.admit(platform, user_id)
                    if not allowed:
                        if told:  # otherwise they were told before: dropped quietly
                            yield notice(key, told)
                        return
                    user_key = f"{platform}:{user_id}"
                    if refusal := self.refusal(key, user_key):
                        yield notice(key, refusal)
                        return
                ticket = self.ticket(key, user_key)
            try:
                await ticket.wait()
                async for reply in work:
                    yield reply
            finally:
                ticket.release()
        finally:
            await work.aclose()

    # -- fair shares --------------------------------------------------------------------------

    def refusal(self, key: str, user: str) -> str | None:
        """Why a new answer may not be queued for ``user`` in ``key`` now (None: it may)."""
        platform, _, user_id = user.partition(":")
        if self.settings.is_owner(platform, user_id):
            return None
        if self._pending.get(user, 0) >= self.settings.max_pending_per_user:
            return USER_BUSY
        if self.channel(key).waiting >= self.settings.max_queued:
            return QUEUE_FULL
        return None

    def admit(self, platform: str, user_id: str) -> tuple[bool, str | None]:
        """Apply the per-user rate limit to an input: (let it through?, notice to send).

        Over the limit the user gets one notice; later inputs in the same minute are dropped
        quietly (and logged), since answering each would be the flood the limit stops.
        """
        if self.settings.is_owner(platform, user_id):
            return True, None  # owners run the bot; their inputs are not rationed
        verdict = self.rate_limiter.check(f"{platform}:{user_id}")
        if verdict is Verdict.ALLOW:
            return True, None
        self.metrics.refused.labels(platform, "rate_limited").inc()
        if verdict is Verdict.DROP:
            log.info("rate limit: dropped an input of %s:%s", platform, user_id)
            return False, None
        return False, RATE_LIMITED.format(limit=self.settings.rate_limit)
