"""The conversation core: persist, route, build the prompt, stream the reply, persist it.

Adapters call :meth:`ConversationCore.respond` with an :class:`IncomingMessage` and render the
:class:`OutgoingReply` snapshots it yields.  Within one conversation, messages are stored and
answered in arrival order, one at a time; different conversations only share the model queue.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Protocol

from ai_model.base import ChatModel, ModelError
from bot.messages import IncomingMessage, OutgoingReply, ReplyKind
from bot.prompt import PromptTooLong, TurnEncoder, clean_name, fit_window
from bot.settings import ROLE_FOR_MODE, Character, Mode, Settings, parse_mode
from storage.store import ASSISTANT, NOTICE, USER, Conversation, Store

log = logging.getLogger(__name__)

APOLOGY = (
    "Sorry, something went wrong while I was writing the reply. Your message is saved; "
    "please try again in a moment."
)


class ModelProvider(Protocol):
    """Where the core gets the model of a role (``ai_model.registry.ModelRegistry``)."""

    async def get(self, role: str) -> ChatModel: ...


@dataclass(slots=True)
class _Ticket:
    """A place in a conversation's answering queue."""

    channel: _Channel
    previous: asyncio.Future[None] | None
    mine: asyncio.Future[None]

    async def wait(self) -> None:
        if self.previous is not None and not self.previous.done():
            await asyncio.wait({self.previous})

    def release(self) -> None:
        if not self.mine.done():
            self.mine.set_result(None)
        if self.channel.tail is self.mine:
            self.channel.tail = None


@dataclass(slots=True)
class _Channel:
    """Per-conversation ordering: stores happen in arrival order, answers one at a time."""

    intake: asyncio.Lock = field(default_factory=asyncio.Lock)
    tail: asyncio.Future[None] | None = None


class ConversationCore:
    """Turns incoming messages into streamed, persisted replies."""

    def __init__(self, settings: Settings, store: Store, models: ModelProvider) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self._channels: dict[str, _Channel] = {}
        self._conversations: dict[str, Conversation] = {}
        self._encoders: dict[int, tuple[ChatModel, TurnEncoder]] = {}

    # -- conversation state -----------------------------------------------------------------

    async def conversation(self, platform: str, key: str) -> Conversation:
        conv = self._conversations.get(key)
        if conv is None:
            conv = await self.store.conversation(platform, key)
            self._conversations[key] = conv
        return conv

    def mode_of(self, conv: Conversation, is_dm: bool) -> Mode:
        stored = parse_mode(conv.mode or "")
        if stored is not None:
            return stored
        platform = self.settings.platform(conv.platform)
        return platform.dm_mode if is_dm else platform.default_mode

    async def set_mode(self, platform: str, key: str, mode: Mode) -> Conversation:
        conv = await self.conversation(platform, key)
        await self.store.set_mode(conv.id, mode)
        conv = self._conversations[key] = replace(conv, mode=mode)
        return conv

    async def set_character(self, platform: str, key: str, name: str) -> Character | None:
        """Give the conversation the named character; None (and no change) if it is unknown."""
        char = self.settings.characters.get(name.strip().lower())
        if char is None:
            return None
        conv = await self.conversation(platform, key)
        await self.store.set_character(conv.id, char.name)
        self._conversations[key] = replace(conv, character=char.name)
        return char

    async def character_of(self, platform: str, key: str) -> Character:
        conv = await self.conversation(platform, key)
        return self.settings.character(conv.character)

    async def greeting(self, platform: str, key: str, is_dm: bool) -> OutgoingReply:
        """What /start says: the character's greeting in roleplay, an introduction otherwise."""
        conv = await self.conversation(platform, key)
        if self.mode_of(conv, is_dm) == "roleplay":
            char = self.settings.character(conv.character)
            text = char.greeting or f"*{char.name} looks up and smiles.*"
            return OutgoingReply(key, text, final=True, speaker=char.name)
        text = (
            "Hello! I am the office assistant. Ask me anything: drafts, summaries, plans. "
            "Send /help for the commands."
        )
        return OutgoingReply(key, text, final=True)

    async def reset(self, platform: str, key: str) -> None:
        """Start afresh: earlier messages stay stored but no longer reach the model."""
        conv = await self.conversation(platform, key)
        last = await self.store.reset(conv.id)
        self._conversations[key] = replace(conv, reset_after_id=last, window_start_id=0)

    async def help_text(self, platform: str, key: str, is_dm: bool) -> str:
        conv = await self.conversation(platform, key)
        mode = self.mode_of(conv, is_dm)
        if mode == "roleplay":
            who = f"I play {self.settings.character(conv.character).name} (roleplay mode)."
        else:
            who = "I am the office assistant here (work mode)."
        return (
            f"{who}\n"
            "Commands:\n"
            "  /mode roleplay|work  switch this conversation's mode\n"
            "  /reset               start a fresh conversation (history stays stored)\n"
            "  /help                this text"
        )

    # -- answering ----------------------------------------------------------------------------

    def _channel(self, key: str) -> _Channel:
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = _Channel()
        return channel

    def _ticket(self, key: str) -> _Ticket:
        """Take the next answering turn of ``key`` (synchronously: arrival order is kept)."""
        channel = self._channel(key)
        ticket = _Ticket(channel, channel.tail, asyncio.get_running_loop().create_future())
        channel.tail = ticket.mine
        return ticket

    async def respond(self, msg: IncomingMessage) -> AsyncIterator[OutgoingReply]:
        """Store ``msg`` and, if it is for the bot, yield the streamed reply to it.

        A message is for the bot when the adapter says it addresses the bot (DM, mention, reply,
        command) or, in a roleplay channel, when it names the character.  The first snapshot
        yielded is an empty "accepted" one, sent before waiting for the turn, so adapters can
        show a typing indicator at once; nothing is yielded for messages only stored.
        """
        channel = self._channel(msg.conversation_key)
        ticket: _Ticket | None = None
        try:
            # The intake lock is first come, first served: messages are stored, and their
            # answering turns taken, in arrival order.
            async with channel.intake:
                conv = await self.conversation(msg.platform, msg.conversation_key)
                user_id = await self.store.add_message(
                    conv.id,
                    USER,
                    msg.text,
                    author_id=msg.author_id,
                    author_name=msg.author_name,
                    platform_message_id=msg.platform_message_id,
                )
                if msg.addresses_bot or self._names_character(conv, msg):
                    ticket = self._ticket(msg.conversation_key)
            if ticket is None:
                return
            yield OutgoingReply(msg.conversation_key, "", reply_to=msg.platform_message_id)
            await ticket.wait()
            async for reply in self._answer(msg, user_id):
                yield reply
        finally:
            if ticket is not None:
                ticket.release()

    def _names_character(self, conv: Conversation, msg: IncomingMessage) -> bool:
        if self.mode_of(conv, msg.is_dm) != "roleplay":
            return False
        name = self.settings.character(conv.character).name
        return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", msg.text, re.IGNORECASE) is not None

    async def regenerate(
        self, platform: str, key: str, is_dm: bool
    ) -> AsyncIterator[OutgoingReply]:
        """Answer the last answered message again; the replaced reply stays stored."""
        ticket = self._ticket(key)
        try:
            await ticket.wait()
            conv = await self.conversation(platform, key)
            last = await self.store.last_reply(conv.id, after_id=conv.reset_after_id)
            if last is None or last.reply_to_id is None:
                yield OutgoingReply(
                    key,
                    "There is no reply of mine to regenerate yet.",
                    final=True,
                    kind=ReplyKind.NOTICE,
                )
                return
            # Out of context, not deleted: earlier versions stay in the database.
            await self.store.update_message(last.id, in_context=False)
            question = IncomingMessage(platform, key, "", "", "", is_dm=is_dm)
            async for reply in self._answer(question, last.reply_to_id):
                yield reply
        finally:
            ticket.release()

    def _encoder(self, model: ChatModel) -> TurnEncoder:
        entry = self._encoders.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, TurnEncoder(model, model.template))
            self._encoders[id(model)] = entry
        return entry[1]

    def system_text(self, conv: Conversation, mode: Mode) -> str:
        if mode == "work":
            return self.settings.system_prompt
        char = self.settings.character(conv.character)
        return (
            f"You are {char.name}. {char.description}\n"
            f"This is a roleplay chat; each player's message starts with their name. "
            f"Reply only as {char.name}, in character. Never write lines for the players."
        )

    async def build_prompt(
        self, conv: Conversation, model: ChatModel, mode: Mode, upto_id: int
    ) -> tuple[list[int], list[str], Conversation]:
        """Token ids of the prompt answering message ``upto_id``, stop strings, updated conv."""
        encoder = self._encoder(model)
        sampling = self.settings.models[ROLE_FOR_MODE[mode]].sampling
        pinned = [*model.bos, *encoder.system(self.system_text(conv, mode))]
        cue = encoder.cue()
        budget = model.n_ctx - sampling.max_tokens - len(pinned) - len(cue)
        # Only what the window can still include is read: since the reset and the window start.
        history = await self.store.history(
            conv.id, after_id=max(conv.reset_after_id, conv.window_start_id - 1), upto_id=upto_id
        )
        turns = [encoder.turn(m) for m in history]
        window = fit_window(turns, budget=budget, start=conv.window_start_id)
        if window.start != conv.window_start_id:
            await self.store.set_window_start(conv.id, window.start)
            conv = self._conversations[conv.key] = replace(conv, window_start_id=window.start)
        tokens = list(pinned)
        for turn in window.turns:
            tokens.extend(turn.tokens)
        tokens.extend(cue)
        # Group scenes: stop before the model starts writing a player's next line.
        speakers = {clean_name(m.author_name) for m in history[-20:] if m.role == USER}
        stops = [f"\n{name}:" for name in sorted(speakers)]
        return tokens, stops, conv

    async def _answer(self, msg: IncomingMessage, user_id: int) -> AsyncIterator[OutgoingReply]:
        key = msg.conversation_key
        conv = await self.conversation(msg.platform, key)
        mode = self.mode_of(conv, msg.is_dm)
        role = ROLE_FOR_MODE[mode]
        speaker = self.settings.character(conv.character).name if mode == "roleplay" else None
        base = OutgoingReply(key, "", speaker=speaker, reply_to=msg.platform_message_id)
        text = ""
        try:
            model = await self.models.get(role)
            try:
                tokens, stops, conv = await self.build_prompt(conv, model, mode, user_id)
            except PromptTooLong as exc:
                yield await self._too_long(conv, user_id, exc, base)
                return
            sampling = self.settings.models[role].sampling
            async for piece in model.stream(tokens, sampling, stops):
                text += piece
                yield replace(base, text=text, delta=piece)
        except (ModelError, OSError, RuntimeError, ValueError):
            log.exception("generation failed in %s", key)
            yield replace(base, text=APOLOGY, final=True, kind=ReplyKind.ERROR)
            return
        reply = text.strip()
        if not reply:
            yield replace(
                base, text="(no reply — try rephrasing)", final=True, kind=ReplyKind.NOTICE
            )
            return
        reply_tokens = len(model.tokenize(reply.encode("utf-8"), add_bos=False, special=False))
        await self.store.add_message(
            conv.id,
            ASSISTANT,
            reply,
            author_name=speaker,
            token_count=reply_tokens,
            reply_to_id=user_id,
        )
        yield replace(base, text=reply, final=True)

    async def _too_long(
        self, conv: Conversation, user_id: int, exc: PromptTooLong, base: OutgoingReply
    ) -> OutgoingReply:
        notice = (
            f"Your message is too long for me to read: it takes about {exc.needed} tokens and "
            f"I have room for {exc.available}. It is saved; please send a shorter version "
            "or split it into parts."
        )
        # Keep it stored, but out of the model's view: it could never fit the window.
        await self.store.update_message(user_id, in_context=False, token_count=exc.needed)
        await self.store.add_message(conv.id, NOTICE, notice, reply_to_id=user_id, in_context=False)
        return replace(base, text=notice, final=True, kind=ReplyKind.NOTICE)
