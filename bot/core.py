"""The conversation core: persist, route, build the prompt, stream the reply, persist it.

Adapters call :meth:`ConversationCore.respond` with an :class:`IncomingMessage` and render the
:class:`OutgoingReply` snapshots it yields.  Within one conversation, messages are stored and
answered in arrival order, one at a time; different conversations only share the model queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Protocol

from ai_model.base import ChatModel, ModelError
from bot.messages import IncomingMessage, OutgoingReply, ReplyKind
from bot.prompt import PromptTooLong, TurnEncoder, clean_name, fit_window
from bot.settings import ROLE_FOR_MODE, Mode, Settings, parse_mode
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

    async def set_character(self, platform: str, key: str, name: str) -> Conversation:
        conv = await self.conversation(platform, key)
        await self.store.set_character(conv.id, name)
        conv = self._conversations[key] = replace(conv, character=name)
        return conv

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

    async def respond(self, msg: IncomingMessage) -> AsyncIterator[OutgoingReply]:
        """Store ``msg`` and, if it addresses the bot, yield the streamed reply to it."""
        channel = self._channel(msg.conversation_key)
        previous: asyncio.Future[None] | None = None
        mine: asyncio.Future[None] | None = None
        if msg.addresses_bot:
            # Taking the ticket before the first await fixes the answering order on arrival.
            previous = channel.tail
            mine = channel.tail = asyncio.get_running_loop().create_future()
        try:
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
            if mine is None:
                return
            if previous is not None and not previous.done():
                await asyncio.wait({previous})
            async for reply in self._answer(msg, user_id):
                yield reply
        finally:
            if mine is not None and not mine.done():
                mine.set_result(None)
            if channel.tail is mine and mine is not None:
                channel.tail = None

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
