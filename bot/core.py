"""The conversation core: persist, route, build the prompt, stream the reply, persist it.

Adapters call :meth:`ConversationCore.respond` with an :class:`IncomingMessage` and render the
:class:`OutgoingReply` snapshots it yields.  Within one conversation, messages are stored and
answered in arrival order, one at a time; different conversations only share the model queue.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from ai_model.base import ChatModel, ModelError
from ai_model.config import SamplingSettings
from bot.assembly import LORE_SCAN, Scene, assemble, pinned_limit
from bot.characters import (
    Character,
    CharacterLibrary,
    apply_macros,
    shipped_characters,
)
from bot.fairness import LruDict, RateLimiter, Verdict
from bot.history import HistoryCache, position
from bot.library import Imported, Library
from bot.lorebook import Lorebook, match_entries
from bot.messages import IncomingMessage, OutgoingReply, ReplyKind
from bot.prompt import PromptTooLong, TurnEncoder, clean_name
from bot.scene import (
    choose_speakers,
    clean_reply,
)
from bot.settings import ROLE_FOR_MODE, Mode, Settings, parse_mode
from storage.store import ASSISTANT, NOTICE, USER, Conversation, Store, StoredMessage

log = logging.getLogger(__name__)

APOLOGY = (
    "Sorry, something went wrong while I was writing the reply. Your message is saved; "
    "please try again in a moment."
)
NOT_STORED = (
    "Sorry, I could not save your message because of a storage problem on my side. "
    "Please send it again in a moment."
)
RATE_LIMITED = (
    "You are sending messages faster than I can read them (at most {limit} a minute). "
    "I will skip your messages for a moment; please slow down."
)
QUEUE_FULL = (
    "I am still answering earlier messages here. I have saved yours as part of the "
    "conversation, but I will not answer it separately."
)
SLOW_STORAGE = (
    "Saving messages is slow on my side right now. Yours is not lost: I will answer as soon "
    "as I can."
)
SLOW_STORAGE_S = 2.0  # storing a message for longer than this gets the sender a notice
RESTARTING = (
    "I am restarting right now and could not take your message. Please send it again in a minute."
)
USER_BUSY = (
    "I am still working on your earlier message. I have saved this one as part of the "
    "conversation; please wait for my answer before sending more."
)
MAX_CAST = 8  # characters in one scene; further names are ignored
MAX_CONVERSATIONS_CACHED = 4096  # conversation rows and queues kept in memory
# What a failing database raises through SQLAlchemy and the drivers (a value the driver cannot
# encode surfaces as ValueError).
STORAGE_ERRORS = (SQLAlchemyError, OSError, ValueError)


class ModelProvider(Protocol):
    """Where the core gets the model of a role (``ai_model.registry.ModelRegistry``)."""

    async def get(self, role: str) -> ChatModel: ...


@dataclass(slots=True)
class _Ticket:
    """A place in a conversation's answering queue."""

    channel: _Channel
    previous: asyncio.Future[None] | None
    mine: asyncio.Future[None]
    user: str | None = None  # who the answer is for, counted against their pending share

    async def wait(self) -> None:
        if self.previous is not None and not self.previous.done():
            await asyncio.wait({self.previous})

    def release(self) -> None:
        if not self.mine.done():
            self.mine.set_result(None)
            self.channel.waiting -= 1
        if self.channel.tail is self.mine:
            self.channel.tail = None


@dataclass(slots=True)
class _Channel:
    """Per-conversation ordering: stores happen in arrival order, answers one at a time."""

    intake: asyncio.Lock = field(default_factory=asyncio.Lock)
    tail: asyncio.Future[None] | None = None
    waiting: int = 0  # answers queued or running

    def busy(self) -> bool:
        return self.waiting > 0 or self.intake.locked()


class ConversationCore:
    """Turns incoming messages into streamed, persisted replies."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        models: ModelProvider,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.rng = rng or random.Random()
        fixed = [*shipped_characters(), *settings.characters.values()]
        self.characters = CharacterLibrary(fixed, default=settings.default_character)
        self.library = Library(store, self.characters, {c.name for c in fixed})
        self.world_books: dict[str, Lorebook] = self.library.world_books
        self._channels: LruDict[str, _Channel] = LruDict(MAX_CONVERSATIONS_CACHED, _Channel.busy)
        self._conversations: LruDict[str, Conversation] = LruDict(MAX_CONVERSATIONS_CACHED)
        self._encoders: dict[int, tuple[ChatModel, TurnEncoder]] = {}
        self._pending: dict[str, int] = {}  # user -> answers queued or running for them
        self.rate_limiter = RateLimiter(settings.rate_limit)
        self.history = HistoryCache(store)
        self.closing = False  # set by a graceful stop: no new work is taken

    async def drain(self, grace_s: float) -> int:
        """Stop taking messages; wait up to ``grace_s`` seconds for the answers in flight.

        Returns how many conversations were still answering when the time ran out.
        """
        self.closing = True
        deadline = asyncio.get_running_loop().time() + grace_s
        while True:
            busy = sum(1 for key in list(self._channels) if self._channel(key).busy())
            if not busy or asyncio.get_running_loop().time() >= deadline:
                return busy
            await asyncio.sleep(0.05)

    # -- characters and world books (shared by every conversation: owners only) ---------------

    def is_owner(self, platform: str, user_id: str) -> bool:
        """Whether this platform user may change what all conversations share."""
        return self.settings.is_owner(platform, user_id)

    async def load_library(self) -> None:
        await self.library.load()

    async def import_card(self, card: dict[str, object], *, replace: bool = False) -> Imported:
        """Check and store a parsed card (any version); :class:`CardError` says why not."""
        model = await self.models.get("character")
        reserve = self.settings.models["character"].sampling.max_tokens
        return await self.library.import_card(
            card, replace=replace, model=model, encoder=self._encoder(model), reserve=reserve
        )

    async def import_world_book(self, name: str, book: dict[str, object]) -> Lorebook:
        return await self.library.import_world_book(name, book)

    async def attach_world_book(self, platform: str, key: str, name: str | None) -> bool:
        """Give a channel a world book (None detaches it); False if no such book exists."""
        if name is not None and name.lower() not in self.world_books:
            return False
        async with self._turn(key):
            await self._update_settings(platform, key, world_book=name)
        return True

    # -- conversation state -----------------------------------------------------------------

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

    # Conversation commands take the conversation's turn like messages do: they act after the
    # answers queued before them, and messages sent after them are answered under their effect.

    @asynccontextmanager
    async def _turn(self, key: str) -> AsyncIterator[None]:
        ticket = self._ticket(key)
        try:
            await ticket.wait()
            yield
        finally:
            ticket.release()

    async def set_mode(self, platform: str, key: str, mode: Mode) -> Conversation:
        async with self._turn(key):
            conv = await self.conversation(platform, key)
            await self.store.set_mode(conv.id, mode)
            conv = self._conversations[key] = replace(conv, mode=mode)
        return conv

    async def set_character(self, platform: str, key: str, name: str) -> Character | None:
        """Give the conversation the named character; None (and no change) if it is unknown."""
        async with self._turn(key):
            return await self._set_character(platform, key, name)

    async def _set_character(self, platform: str, key: str, name: str) -> Character | None:
        char = self.characters.find(name)
        if char is None:
            return None
        conv = await self.conversation(platform, key)
        await self.store.set_character(conv.id, char.name)
        self._conversations[key] = replace(conv, character=char.name)
        await self._update_settings(platform, key, cast=None, opened=None)
        return char

    async def set_cast(self, platform: str, key: str, names: list[str]) -> list[Character] | None:
        """Put several characters in the channel's scene; None if a name is unknown."""
        names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))[:MAX_CAST]
        found = [self.characters.find(n) for n in names]
        if not found or any(c is None for c in found):
            return None
        cast = [c for c in found if c is not None]
        async with self._turn(key):
            await self._set_character(platform, key, cast[0].name)
            await self._update_settings(platform, key, cast=[c.name for c in cast])
        return cast

    async def character_of(self, platform: str, key: str) -> Character:
        return self.cast_of(await self.conversation(platform, key))[0]

    async def reset(self, platform: str, key: str) -> None:
        """Start afresh: earlier messages stay stored but no longer reach the model.

        The boundary is where the command arrived: a message sent after it belongs to the new
        conversation even when it is stored while earlier answers are still being written, and
        those answers (to messages before it) do not.
        """
        channel = self._channel(key)
        async with channel.intake:
            conv = await self.conversation(platform, key)
            boundary = await self.store.last_message_id(conv.id)
            ticket = self._ticket(key)
        try:
            await ticket.wait()
            await self.store.reset(conv.id, boundary)
            self.history.forget(key)
            conv = self._conv(key)
            self._conversations[key] = replace(conv, reset_after_id=boundary, window_start_id=0)
            await self._update_settings(platform, key, opened=None)
        finally:
            ticket.release()

    async def help_text(self, platform: str, key: str, is_dm: bool) -> str:
        conv = await self.conversation(platform, key)
        if self.mode_of(conv, is_dm) == "roleplay":
            names = ", ".join(c.display_name for c in self.cast_of(conv))
            who = f"I play {names} (roleplay mode)."
        else:
            who = "I am the office assistant here (work mode)."
        return (
            f"{who}\n"
            "Commands:\n"
            "  /mode roleplay|work  switch this conversation's mode\n"
            "  /character [name]    show or choose the character\n"
            "  /regenerate          write my last reply again (earlier versions are kept)\n"
            "  /swipe [back]        show the next (or previous) version of my last reply\n"
            "  /reset               start a fresh conversation (history stays stored)\n"
            "  /help                this text"
        )

    async def remember_platform_id(self, stored_id: int, platform_message_id: str) -> None:
        """Record which platform message shows a stored reply (so it can be edited later)."""
        await self.store.update_message(stored_id, platform_message_id=platform_message_id)

    async def last_reply_message_id(self, platform: str, key: str) -> str | None:
        """The platform message showing the newest reply in context, if known."""
        conv = await self.conversation(platform, key)
        last = await self.store.last_reply(conv.id, after_id=conv.reset_after_id)
        return last.platform_message_id if last is not None else None

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
        )
        stored = replace(message, id=message_id)
        current = self._conversations.get(conv.key) or conv
        self.history.added(conv.key, stored, after=current.reset_after_id)
        return stored

    # -- greetings and swipes -----------------------------------------------------------------

    async def open_scene(
        self, platform: str, key: str, is_dm: bool, user: str = "you"
    ) -> OutgoingReply | None:
        """Post the character's greeting if this roleplay conversation has not started yet."""
        conv = await self.conversation(platform, key)
        if self.mode_of(conv, is_dm) != "roleplay" or conv.settings.get("opened"):
            return None
        return await self._open(conv, is_dm, user)

    async def _open(self, conv: Conversation, is_dm: bool, user: str) -> OutgoingReply | None:
        char = self.cast_of(conv)[0]
        greetings = [apply_macros(g, char.display_name, user) for g in char.greetings(not is_dm)]
        await self._update_settings(conv.platform, conv.key, opened=True)
        if not greetings:
            return None
        first = await self._store(
            conv, StoredMessage(0, ASSISTANT, greetings[0], author_name=char.name)
        )
        for alternative in greetings[1:]:  # offered as swipes
            await self._store(
                conv,
                StoredMessage(
                    0,
                    ASSISTANT,
                    alternative,
                    author_name=char.name,
                    in_context=False,
                    swipe_of=first.id,
                ),
            )
        return OutgoingReply(
            conv.key,
            greetings[0],
            final=True,
            speaker=char.name,
            swipe=(1, len(greetings)) if len(greetings) > 1 else None,
        )

    async def greeting(self, platform: str, key: str, is_dm: bool) -> OutgoingReply:
        """What /start says: the character's greeting in roleplay, an introduction otherwise."""
        opened = await self.open_scene(platform, key, is_dm)
        if opened is not None:
            return opened
        conv = await self.conversation(platform, key)
        if self.mode_of(conv, is_dm) == "roleplay":
            char = self.cast_of(conv)[0]
            text = char.greeting or f"*{char.display_name} looks up and smiles.*"
            return OutgoingReply(
                key, apply_macros(text, char.display_name, "you"), final=True, speaker=char.name
            )
        text = (
            "Hello! I am the office assistant. Ask me anything: drafts, summaries, plans. "
            "Send /help for the commands."
        )
        return OutgoingReply(key, text, final=True)

    async def swipe(self, platform: str, key: str, step: int = 1) -> OutgoingReply:
        """Bring back another stored version of the last reply (or greeting)."""
        async with self._turn(key):
            return await self._swipe(platform, key, step)

    async def _swipe(self, platform: str, key: str, step: int) -> OutgoingReply:
        conv = await self.conversation(platform, key)
        last = await self.store.last_reply(conv.id, after_id=conv.reset_after_id)
        if last is None:
            return OutgoingReply(
                key, "There is no reply of mine yet.", final=True, kind=ReplyKind.NOTICE
            )
        versions = await self.store.swipes(conv.id, last.swipe_group)
        if len(versions) < 2:
            return OutgoingReply(
                key,
                "There is only one version; /regenerate writes another.",
                final=True,
                kind=ReplyKind.NOTICE,
            )
        index = next(i for i, v in enumerate(versions) if v.id == last.id)
        chosen = versions[(index + step) % len(versions)]
        await self.store.choose_swipe(conv.id, last.swipe_group, chosen.id)
        self.history.forget(key)
        return OutgoingReply(
            key,
            chosen.text,
            final=True,
            speaker=chosen.author_name,
            swipe=(versions.index(chosen) + 1, len(versions)),
            stored_id=chosen.id,
        )

    # -- answering ----------------------------------------------------------------------------

    def _channel(self, key: str) -> _Channel:
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = _Channel()
        return channel

    def _ticket(self, key: str, user: str | None = None) -> _Ticket:
        """Take the next answering turn of ``key`` (synchronously: arrival order is kept)."""
        channel = self._channel(key)
        loop = asyncio.get_running_loop()
        ticket = _Ticket(channel, channel.tail, loop.create_future(), user)
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

    async def respond(self, msg: IncomingMessage) -> AsyncIterator[OutgoingReply]:
        """Store ``msg`` and, if it is for the bot, yield the streamed reply to it.

        A message is for the bot when the adapter says it addresses the bot (DM, mention, reply,
        command) or, in a roleplay channel, when it names a character of the scene.  The first
        snapshot yielded is an empty "accepted" one, sent before waiting for the turn, so
        adapters can show a typing indicator at once; nothing is yielded for messages only
        stored.  A roleplay conversation that has not started yet first gets its greeting.

        Refusals are notices: over the rate limit (the message is not stored), too many
        answers already queued here or for this user (stored, not answered), or a storage
        failure (nothing stored, the user is asked to send it again).
        """
        key = msg.conversation_key
        if self.closing:
            yield self._notice(key, RESTARTING, msg.platform_message_id)
            return
        allowed, notice = self.admit(msg.platform, msg.author_id)
        if not allowed:
            if notice:
                yield self._notice(key, notice, msg.platform_message_id)
            return
        channel = self._channel(key)
        ticket: _Ticket | None = None
        opening: OutgoingReply | None = None
        refusal: str | None = None
        user_key = f"{msg.platform}:{msg.author_id}"
        try:
            # The intake lock is first come, first served: messages are stored, and their
            # answering turns taken, in arrival order.
            async with channel.intake:
                try:
                    conv = await self.conversation(msg.platform, key)
                    roleplay = self.mode_of(conv, msg.is_dm) == "roleplay"
                    if roleplay and not conv.settings.get("opened"):
                        opening = await self._open(conv, msg.is_dm, clean_name(msg.author_name))
                        conv = await self.conversation(msg.platform, key)
                    storing = asyncio.ensure_future(
                        self._store(
                            conv,
                            StoredMessage(
                                0,
                                USER,
                                msg.text,
                                author_id=msg.author_id,
                                author_name=msg.author_name,
                                platform_message_id=msg.platform_message_id,
                            ),
                        )
                    )
                    # A busy or locked database is waited out; say so rather than go quiet.
                    if not (await asyncio.wait({storing}, timeout=SLOW_STORAGE_S))[0]:
                        yield self._notice(key, SLOW_STORAGE, msg.platform_message_id)
                    user = await storing
                except STORAGE_ERRORS as exc:
                    log.error("could not store a message in %s: %s", key, exc)
                    refusal = NOT_STORED
                else:
                    user_id = user.id
                    reply_all = self.settings.platform(msg.platform).roleplay_reply_all
                    named = roleplay and (reply_all or self._names_cast(conv, msg.text))
                    if msg.addresses_bot or named:
                        refusal = self._queue_refusal(key, user_key)
                        if refusal is None:
                            ticket = self._ticket(key, user_key)
            if opening is not None:
                yield opening
            if refusal is not None:
                yield self._notice(key, refusal, msg.platform_message_id)
            if ticket is None:
                return
            yield OutgoingReply(key, "", reply_to=msg.platform_message_id)
            await ticket.wait()
            conv = self._conv(key)
            mode = self.mode_of(conv, msg.is_dm)
            if mode == "work":
                speakers: list[Character | None] = [None]
            else:
                cast = self.cast_of(conv)
                last = conv.settings.get("last_speaker")
                speakers = list(choose_speakers(cast, msg.text, last, self.rng))
            for char in speakers:
                async for reply in self._answer(key, mode, user_id, char, msg.platform_message_id):
                    yield reply
        finally:
            if ticket is not None:
                ticket.release()

    @staticmethod
    def _notice(key: str, text: str, reply_to: str | None = None) -> OutgoingReply:
        return OutgoingReply(key, text, final=True, kind=ReplyKind.NOTICE, reply_to=reply_to)

    def _names_cast(self, conv: Conversation, text: str) -> bool:
        return any(
            re.search(rf"(?<!\w){re.escape(c.display_name)}(?!\w)", text, re.IGNORECASE)
            for c in self.cast_of(conv)
        )

    async def regenerate(
        self, platform: str, key: str, is_dm: bool, user_id: str | None = None
    ) -> AsyncIterator[OutgoingReply]:
        """Write the last reply again; earlier versions stay stored for /swipe.

        The old version stays the one in context until the new one is stored, so a failed
        generation loses nothing.  ``user_id`` (who asked) is held to the fair-share limits.
        """
        user_key = None
        if user_id is not None:
            allowed, notice = self.admit(platform, user_id)
            if not allowed:
                if notice:
                    yield self._notice(key, notice)
                return
            user_key = f"{platform}:{user_id}"
            if refusal := self._queue_refusal(key, user_key):
                yield self._notice(key, refusal)
                return
        ticket = self._ticket(key, user_key)
        try:
            await ticket.wait()
            conv = await self.conversation(platform, key)
            last = await self.store.last_reply(conv.id, after_id=conv.reset_after_id)
            if last is None:
                yield OutgoingReply(
                    key,
                    "There is no reply of mine to regenerate yet.",
                    final=True,
                    kind=ReplyKind.NOTICE,
                )
                return
            if last.reply_to_id is None:  # a greeting: its versions come from the card
                yield await self._swipe(platform, key, 1)
                return
            char = self.characters.find(last.author_name) if last.author_name else None
            mode = self.mode_of(conv, is_dm)
            async for reply in self._answer(
                key, mode, last.reply_to_id, char, None, swipe_of=last.swipe_group
            ):
                yield reply
        finally:
            ticket.release()

    def _encoder(self, model: ChatModel) -> TurnEncoder:
        entry = self._encoders.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, TurnEncoder(model, model.template))
            self._encoders[id(model)] = entry
        return entry[1]

    def _sampling(self, mode: Mode, char: Character | None) -> SamplingSettings:
        base = self.settings.models[ROLE_FOR_MODE[mode]].sampling
        if char is None or not char.sampling:
            return base
        overrides = {
            k: int(v) if k == "repeat_last_n" else float(v) for k, v in char.sampling.items()
        }
        return replace(base, **overrides)  # type: ignore[arg-type]

    async def build_prompt(
        self,
        conv: Conversation,
        model: ChatModel,
        upto_id: int,
        char: Character | None,
        reserve: int,
        replacing: int | None = None,
    ) -> tuple[list[int], list[str], Conversation]:
        """Token ids of the prompt answering message ``upto_id``, stop strings, updated conv.

        ``replacing`` names a reply's version group that the new reply will replace: none of
        its versions is part of the prompt.
        """
        # What existed when message ``upto_id`` arrived, since the reset and the window start
        # (the cache is in conversation order: usually nothing, or little, is past the end).
        history = await self.history.get(conv)
        end = len(history)
        while end and position(history[end - 1])[0] > upto_id:
            end -= 1
        shown = history[:end]
        if replacing is not None:
            shown = [m for m in shown if m.swipe_group != replacing]
        scene = None
        if char is not None:
            book = self.world_books.get(str(conv.settings.get("world_book", "")).lower())
            persona = str(conv.settings.get("persona", ""))
            scene = Scene(char, self.cast_of(conv), book, persona)
            if scene.books:
                # Regex keys come from cards: matched off the event loop, each under a timeout.
                recent = [m.text for m in shown[-LORE_SCAN:]]
                lore = await asyncio.to_thread(match_entries, scene.books, recent)
                scene = replace(scene, lore=lore)
        prompt = assemble(
            model,
            self._encoder(model),
            shown,
            system_prompt=self.settings.system_prompt,
            scene=scene,
            window_start=conv.window_start_id,
            reserve=reserve,
        )
        start = prompt.window.start
        if start != conv.window_start_id:
            await self.store.set_window_start(conv.id, start)
            conv = self._conversations[conv.key] = replace(conv, window_start_id=start)
            self.history.window_moved(conv.key, start)
        return prompt.tokens, prompt.stops, conv

    async def _answer(
        self,
        key: str,
        mode: Mode,
        user_id: int,
        char: Character | None,
        reply_to: str | None,
        swipe_of: int | None = None,
    ) -> AsyncIterator[OutgoingReply]:
        conv = self._conv(key)
        speaker = char.name if char is not None else None
        base = OutgoingReply(key, "", speaker=speaker, reply_to=reply_to)
        sampling = self._sampling(mode, char)
        others: list[str] = []
        text = ""
        try:
            model = await self.models.get(ROLE_FOR_MODE[mode])
            try:
                tokens, stops, conv = await self.build_prompt(
                    conv, model, user_id, char, sampling.max_tokens, replacing=swipe_of
                )
            except PromptTooLong as exc:
                yield await self._too_long(conv, model, user_id, exc, base)
                return
            others = [s.strip("\n:") for s in stops]
            async for piece in model.stream(tokens, sampling, stops, slot=key):
                text += piece
                shown = clean_reply(text, char.display_name, others) if char else text
                yield replace(base, text=shown, delta=piece)
        except (ModelError, RuntimeError, *STORAGE_ERRORS) as exc:
            log.error("generation failed in %s: %s", key, exc, exc_info=_trace(exc))
            yield replace(base, text=APOLOGY, final=True, kind=ReplyKind.ERROR)
            return
        reply = clean_reply(text, char.display_name, others) if char else text.strip()
        if not reply:
            yield replace(
                base, text="(no reply — try rephrasing)", final=True, kind=ReplyKind.NOTICE
            )
            return
        reply_tokens = len(model.tokenize(reply.encode("utf-8"), add_bos=False, special=False))
        try:
            stored = await self._store(
                conv,
                StoredMessage(
                    0,
                    ASSISTANT,
                    reply,
                    author_name=speaker,
                    token_count=reply_tokens,
                    reply_to_id=user_id,
                    swipe_of=swipe_of,
                ),
            )
            if swipe_of is not None:  # the new version is stored: now it may replace the old
                await self.store.choose_swipe(conv.id, swipe_of, stored.id)
                self.history.forget(key)
        except STORAGE_ERRORS as exc:
            log.error("could not store the reply in %s: %s", key, exc)
            yield replace(base, text=APOLOGY, final=True, kind=ReplyKind.ERROR)
            return
        generated = model.generated(key)
        if generated and model.detokenize(generated).strip() == reply:
            # The KV cache holds exactly these tokens: the next prompt matches it to the end.
            self._encoder(model).remember_reply(stored, generated)
        if char is not None:
            await self._update_settings(conv.platform, key, last_speaker=char.name)
        yield replace(base, text=reply, final=True, stored_id=stored.id)

    async def _too_long(
        self,
        conv: Conversation,
        model: ChatModel,
        user_id: int,
        exc: PromptTooLong,
        base: OutgoingReply,
    ) -> OutgoingReply:
        history_room = model.n_ctx - pinned_limit(model.n_ctx)
        if exc.needed <= history_room:
            # The message would fit any sound set-up: the character, its lore or persona take
            # the room.  The message stays in the conversation.
            notice = (
                f"I cannot answer right now: this conversation's character set-up leaves room "
                f"for only {max(exc.available, 0)} tokens and your message takes about "
                f"{exc.needed}. Your message is saved; an admin can choose another character."
            )
            log.warning("%s: the pinned prompt leaves no room for the history", conv.key)
        else:
            notice = (
                f"Your message is too long for me to read: it takes about {exc.needed} tokens "
                f"and I have room for {history_room}. It is saved; please send a shorter "
                "version or split it into parts."
            )
            # Keep it stored, but out of the model's view: it could never fit the window.
            await self.store.update_message(user_id, in_context=False, token_count=exc.needed)
            self.history.forget(conv.key)
        await self.store.add_message(conv.id, NOTICE, notice, reply_to_id=user_id, in_context=False)
        return replace(base, text=notice, final=True, kind=ReplyKind.NOTICE)


def _trace(exc: BaseException) -> bool:
    """Whether a failure deserves a traceback in the log: not for the expected kinds."""
    return not isinstance(exc, ModelError | SQLAlchemyError | OSError)
