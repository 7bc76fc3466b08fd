"""Per-conversation state and its queues: who answers next, and each user's fair share.

Within one conversation, messages are stored and answered in arrival order, one at a time, and
conversation commands take their turn among them; different conversations only share the model
queue.  :class:`ConversationState` is the base of the core: the commands
(:mod:`chat.actions`) and the answer pipeline (:mod:`chat.core`) build on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from ai_model.base import ChatModel, ModelError
from chat.roleplay.characters import Character, CharacterLibrary, shipped_characters
from chat.fairness import LruDict, RateLimiter, Verdict
from chat.faults import KillPoints
from chat.prompt.history import HistoryCache
from chat.roleplay.library import Library
from chat.roleplay.lorebook import Lorebook
from chat.prompt.memory import MemoryKeeper
from chat.messages import OutgoingReply, ReplyKind
from chat.prompt.window import TurnEncoder
from chat.settings import Mode, Settings, parse_mode
from storage.records import Conversation, StoredMessage
from storage.store import Store

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
APOLOGY = (
    "Sorry, something went wrong while I was writing the reply. Your message is saved; "
    "please try again in a moment."
)
MAX_CONVERSATIONS_CACHED = 4096  # conversation rows and queues kept in memory


def trace_wanted(exc: BaseException) -> bool:
    """Whether a failure deserves a traceback in the log: not for the expected kinds."""
    return not isinstance(exc, ModelError | SQLAlchemyError | OSError)


class ModelProvider(Protocol):
    """Where the core gets the model of a role (``ai_model.registry.ModelRegistry``)."""

    async def get(self, role: str) -> ChatModel: ...


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
    """Per-conversation ordering: stores happen in arrival order, answers one at a time."""

    intake: asyncio.Lock = field(default_factory=asyncio.Lock)
    tail: asyncio.Future[None] | None = None
    waiting: int = 0  # answers queued or running

    def busy(self) -> bool:
        return self.waiting > 0 or self.intake.locked()


class ConversationState:
    """Conversations, their queues, the shared library, and the fair-share bookkeeping."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        models: ModelProvider,
        *,
        rng: random.Random | None = None,
        kill_points: KillPoints | None = None,
    ) -> None:
        self.settings = settings
        self.kill_points = kill_points or KillPoints()
        self.store = store
        self.models = models
        self.rng = rng or random.Random()
        fixed = [*shipped_characters(), *settings.characters.values()]
        self.characters = CharacterLibrary(fixed, default=settings.default_character)
        self.library = Library(store, self.characters, {c.name for c in fixed})
        self.world_books: dict[str, Lorebook] = self.library.world_books
        self._channels: LruDict[str, ChannelQueue] = LruDict(
            MAX_CONVERSATIONS_CACHED, ChannelQueue.busy
        )
        self._conversations: LruDict[str, Conversation] = LruDict(MAX_CONVERSATIONS_CACHED)
        self._encoders: dict[int, tuple[ChatModel, TurnEncoder]] = {}
        self._pending: dict[str, int] = {}  # user -> answers queued or running for them
        self.rate_limiter = RateLimiter(settings.rate_limit)
        self.history = HistoryCache(store)
        self._answering: dict[str, int] = {}  # role -> replies generating on its model
        self.memory = MemoryKeeper(
            store, models.get, idle=lambda key: not self._channel(key).busy(), room=self._room
        )
        self.closing = False  # set by a graceful stop: no new work is taken
        # Messages stored from now on are this run's to answer; older ones, recovery's.
        self.started_at = datetime.now(UTC)

    async def drain(self, grace_s: float) -> int:
        """Stop taking messages; wait up to ``grace_s`` seconds for the answers in flight.

        Returns how many conversations were still answering when the time ran out.
        """
        self.closing = True
        await self.memory.close()
        deadline = asyncio.get_running_loop().time() + grace_s
        while True:
            busy = sum(1 for key in list(self._channels) if self._channel(key).busy())
            if not busy or asyncio.get_running_loop().time() >= deadline:
                return busy
            await asyncio.sleep(0.05)

    def _room(self, role: str) -> bool:
        """Whether ``role``'s model is free for background work: no reply generating on it.
        (Even with free sequences, a summary's prompt chunks would share the replies' decode
        steps, and on a CPU every token in a step costs the replies time.)"""
        return self._answering.get(role, 0) == 0

    @asynccontextmanager
    async def _generating(self, key: str, role: str) -> AsyncIterator[None]:
        """A reply generates in ``key`` on ``role``'s model: summaries make way."""
        self._answering[role] = self._answering.get(role, 0) + 1
        try:
            self.memory.make_room(role)
            await self.memory.quiet(key)
            yield
        finally:
            self._answering[role] -= 1
            self.memory.notify()

    def is_owner(self, platform: str, user_id: str) -> bool:
        """Whether this platform user may change what all conversations share."""
        return self.settings.is_owner(platform, user_id)

    async def conversation(self, platform: str, key: str) -> Conversation:
        conv = self._conversations.get(key)
        if conv is None:
            conv = await self.store.conversation(platform, key)
            self._conversations[key] = conv
        return conv

    def _conv(self, key: str) -> Conversation:
        """The conversation of a queue that is running (loaded moments ago by its intake)."""
        conv = self._conversations.get(key)
        assert conv is not None, f"{key} was forgotten while a message of it was in flight"
        return conv

    async def _update_settings(self, platform: str, key: str, **changes: object) -> Conversation:
        conv = await self.conversation(platform, key)
        settings = {k: v for k, v in {**conv.settings, **changes}.items() if v is not None}
        await self.store.set_settings(conv.id, settings)
        conv = self._conversations[key] = replace(conv, settings=settings)
        return conv

    def mode_of(self, conv: Conversation, is_dm: bool) -> Mode:
        stored = parse_mode(conv.mode or "")
        if stored is not None:
            return stored
        platform = self.settings.platform(conv.platform)
        return platform.dm_mode if is_dm else platform.default_mode

    def cast_of(self, conv: Conversation) -> list[Character]:
        """The characters of the channel's scene: the chosen one, or several for a group."""
        names = conv.settings.get("cast") or [conv.character]
        return [self.characters.get(name) for name in names]

    async def _store(self, conv: Conversation, message: StoredMessage) -> StoredMessage:
        """Store ``message`` (its id is assigned) and keep the history cache in step."""
        message_id = await self.store.add_message(
            conv.id,
            message.role,
            message.text,
            author_id=message.author_id,
            author_name=message.author_name,
            token_count=message.token_count,
            platform_message_id=message.platform_message_id,
            reply_to_id=message.reply_to_id,
            in_context=message.in_context,
            swipe_of=message.swipe_of,
            reply_state=message.reply_state,
            delivered=message.delivered,
        )
        stored = replace(message, id=message_id)
        current = self._conversations.get(conv.key) or conv
        self.history.added(conv.key, stored, after=current.reset_after_id)
        return stored

    def _encoder(self, model: ChatModel) -> TurnEncoder:
        entry = self._encoders.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, TurnEncoder(model, model.template))
            self._encoders[id(model)] = entry
        return entry[1]

    def _channel(self, key: str) -> ChannelQueue:
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = ChannelQueue()
        return channel

    def _ticket(self, key: str, user: str | None = None) -> Ticket:
        """Take the next answering turn of ``key`` (synchronously: arrival order is kept)."""
        channel = self._channel(key)
        loop = asyncio.get_running_loop()
        ticket = Ticket(
            channel, channel.tail, loop.create_future(), user, lambda: self.memory.wake(key)
        )
        self.memory.interrupt(key)  # a summary never runs while the conversation has a turn
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
    async def _turn(self, key: str) -> AsyncIterator[None]:
        ticket = self._ticket(key)
        try:
            await ticket.wait()
            yield
        finally:
            ticket.release()

    async def _in_turn(
        self,
        platform: str,
        key: str,
        user_id: str | None,
        work: AsyncGenerator[OutgoingReply, None],
    ) -> AsyncIterator[OutgoingReply]:
        """Run ``work``, a command that makes the model write (``user_id`` asked; None: the bot
        itself), in the conversation's answering queue under the fair-share rules, or say why
        not.  ``work`` has not started yet: refused, it never runs."""
        user_key = None
        try:
            if user_id is not None:
                allowed, notice = self.admit(platform, user_id)
                if not allowed:
                    if notice:  # otherwise they were told before: dropped quietly
                        yield self._notice(key, notice)
                    return
                user_key = f"{platform}:{user_id}"
                if refusal := self._queue_refusal(key, user_key):
                    yield self._notice(key, refusal)
                    return
            ticket = self._ticket(key, user_key)
            try:
                await ticket.wait()
                async for reply in work:
                    yield reply
            finally:
                ticket.release()
        finally:
            await work.aclose()

    def _queue_refusal(self, key: str, user: str) -> str | None:
        """Why a new answer may not be queued for ``user`` in ``key`` now (None: it may)."""
        platform, _, user_id = user.partition(":")
        if self.is_owner(platform, user_id):
            return None
        if self._pending.get(user, 0) >= self.settings.max_pending_per_user:
            return USER_BUSY
        if self._channel(key).waiting >= self.settings.max_queued:
            return QUEUE_FULL
        return None

    def admit(self, platform: str, user_id: str) -> tuple[bool, str | None]:
        """Apply the per-user rate limit to an input: (let it through?, notice to send).

        Over the limit the user gets one notice; later inputs in the same minute are dropped
        quietly (and logged), since answering each would be the flood the limit stops.
        """
        if self.is_owner(platform, user_id):
            return True, None  # owners run the bot; their inputs are not rationed
        verdict = self.rate_limiter.check(f"{platform}:{user_id}")
        if verdict is Verdict.ALLOW:
            return True, None
        if verdict is Verdict.DROP:
            log.info("rate limit: dropped an input of %s:%s", platform, user_id)
            return False, None
        return False, RATE_LIMITED.format(limit=self.settings.rate_limit)

    @staticmethod
    def _notice(key: str, text: str, reply_to: str | None = None) -> OutgoingReply:
        return OutgoingReply(key, text, final=True, kind=ReplyKind.NOTICE, reply_to=reply_to)
