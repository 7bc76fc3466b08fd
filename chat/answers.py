"""The answer pipeline: store the message, route it, build the prompt, stream the reply,
store it.

Adapters call :meth:`Answers.respond` with an :class:`IncomingMessage` and render the
:class:`OutgoingReply` snapshots it yields; they report what reached the platform to
:class:`chat.delivery.Delivery`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Protocol

from ai_model.base import ChatModel, ModelError
from chat.access import Access, Requester
from chat.conversations import Conversations
from chat.delivery import Delivery
from chat.edits import DELETED, Edits
from chat.faults import KillPoints
from chat.limits import shorten
from chat.messages import IncomingMessage, OutgoingReply, ReplyKind, notice
from chat.metrics import Metrics
from chat.prompt.building import Built, PromptBuilder
from chat.prompt.history import HistoryCache
from chat.prompt.memory import MemoryKeeper
from chat.prompt.too_long import too_long
from chat.prompt.window import PromptTooLong, clean_name
from chat.queues import USER_BUSY, Arrival, Queues, Ticket
from chat.roleplay.characters import Character, CharacterLibrary
from chat.roleplay.scene import choose_speakers
from chat.settings import ROLE_FOR_MODE, Mode, Settings
from chat.shown import shown, tokens_of_reply
from chat.tools.registry import Tools
from chat.tools.rounds import GAVE_UP, ToolRounds, ToolUse, tools_on
from chat.turn_texts import (
    APOLOGY,
    NO_REPLY,
    NOT_STORED,
    RESTARTING,
    SLOW_STORAGE,
    SLOW_STORAGE_S,
    Once,
    trace_wanted,
)
from storage.records import (
    ASSISTANT,
    FAILED,
    RECEIVED,
    USER,
    Conversation,
    StoredMessage,
)
from storage.store import STORAGE_ERRORS, Store

log = logging.getLogger(__name__)
Rounds = ToolRounds | None


class ModelProvider(Protocol):
    """Where the engine gets the model of a role (``ai_model.registry.ModelRegistry``)."""

    async def get(self, role: str) -> ChatModel: ...


class Answers:
    """Turns incoming messages into streamed, persisted, tracked replies."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        models: ModelProvider,
        conversations: Conversations,
        queues: Queues,
        prompts: PromptBuilder,
        history: HistoryCache,
        memory: MemoryKeeper,
        edits: Edits,
        characters: CharacterLibrary,
        delivery: Delivery,
        *,
        kill_points: KillPoints,
        access: Access,
        metrics: Metrics,
        rng: random.Random,
        opening: Callable[[Conversation, bool, str], Awaitable[OutgoingReply | None]],
        tools: Tools | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.conversations = conversations
        self.queues = queues
        self.prompts = prompts
        self.history = history
        self.memory = memory
        self.edits = edits
        self.characters = characters
        self.delivery = delivery
        self.kill_points = kill_points
        self.access = access
        self.metrics = metrics
        self.rng = rng
        self._opening = opening  # the scene's greeting, for a roleplay conversation not opened
        # What the office model may do (chat.tools.builtin), and where.
        self.tool_use = ToolUse(tools or Tools([]), settings.tools, store)
        self.closing = False  # set by a graceful stop: no new work is taken

    async def respond(
        self,
        msg: IncomingMessage,
        on_stored: Callable[[], None] | None = None,
        arrival: Arrival | None = None,
    ) -> AsyncIterator[OutgoingReply]:
        """Store ``msg`` and, if it is for the bot, yield the streamed reply to it.

        A message is for the bot when the adapter says it addresses the bot (DM, mention, reply,
        command) or, in a roleplay channel, when it names a character of the scene.  The first
        snapshot yielded is an empty "accepted" one, sent before waiting for the turn, so
        adapters can show a typing indicator at once; nothing is yielded for messages only
        stored.  A roleplay conversation that has not started yet first gets its greeting.

        ``arrival`` is the message's place in its conversation's order, taken when it arrived
        (without one, the call itself is the arrival).  ``on_stored`` is called once the
        message is safely stored, or once it is clear that it will not be (refused, or stored
        before: a platform may deliver a message twice after a crash, and the second delivery
        is skipped).  Adapters confirm the message to the platform only then.

        Refusals are notices: over the rate limit (the message is not stored), too many
        answers already queued here or for this user (stored, not answered), or a storage
        failure (nothing stored, the user is asked to send it again).
        """
        settled = Once(on_stored)
        key = msg.conversation_key
        arrival = arrival or self.queues.arrive(key)
        ticket: Ticket | None = None
        user: StoredMessage | None = None
        counts = self.metrics
        counts.received.labels(msg.platform).inc()
        try:
            if self.closing:
                counts.refused.labels(msg.platform, "closing").inc()
                settled()
                arrival.settle()
                yield notice(key, RESTARTING, msg.platform_message_id)
                return
            self.kill_points.reached("received")
            who = Requester(msg.platform, msg.author_id, key, msg.is_dm, msg.roles, msg.guild_id)
            if not self.access.permits(who):  # not stored, no model time; a DM is told
                counts.refused.labels(msg.platform, "access").inc()
                settled()
                arrival.settle()
                if msg.addresses_bot and (text := self.access.notice(who)):
                    yield notice(key, text, msg.platform_message_id)
                return
            allowed, told = self.queues.admit(msg.platform, msg.author_id)
            if not allowed:
                settled()
                arrival.settle()
                if told:
                    yield notice(key, told, msg.platform_message_id)
                return
            opening: OutgoingReply | None = None
            refusal: str | None = None
            user_key = f"{msg.platform}:{msg.author_id}"
            async with arrival:  # stored, and its turn taken, in arrival order
                try:
                    conv = await self.conversations.get(msg.platform, key)
                    if await self._seen_before(conv, msg):
                        return
                    early = self.edits.arrived(key, msg.platform_message_id)
                    if early is DELETED:
                        return  # deleted before we got to store it: as if never sent
                    if isinstance(early, str):
                        msg = replace(msg, text=early)  # edited before we got to store it
                    roleplay = self.conversations.mode_of(conv, msg.is_dm) == "roleplay"
                    if roleplay and not conv.settings.get("opened"):
                        name = clean_name(msg.author_name)
                        opening = await self._opening(conv, msg.is_dm, name)
                        conv = await self.conversations.get(msg.platform, key)
                    reply_all = self.settings.platform(msg.platform).roleplay_reply_all
                    named = roleplay and (
                        reply_all or self.conversations.names_cast(conv, msg.text)
                    )
                    wanted = msg.addresses_bot or named
                    if wanted:
                        refusal = self.queues.refusal(key, user_key)
                    storing = asyncio.ensure_future(
                        self.history.save(
                            conv,
                            StoredMessage(
                                0,
                                USER,
                                msg.text,
                                author_id=msg.author_id,
                                author_name=msg.author_name,
                                platform_message_id=msg.platform_message_id,
                                reply_state=RECEIVED if wanted and refusal is None else None,
                            ),
                        )
                    )
                    # A busy or locked database is waited out; say so rather than go quiet.
                    if not (await asyncio.wait({storing}, timeout=SLOW_STORAGE_S))[0]:
                        yield notice(key, SLOW_STORAGE, msg.platform_message_id)
                    user = await storing
                except STORAGE_ERRORS as exc:
                    log.error("could not store a message in %s: %s", key, exc)
                    counts.storage_errors.inc()
                    refusal = NOT_STORED
                else:
                    if wanted and refusal is None:
                        ticket = self.queues.ticket(key, user_key)
                    elif not wanted:  # chatter: its turn is encoded now, not at the mention
                        await self.prompts.prepare(conv, "roleplay" if roleplay else "work", user)
                finally:
                    settled()
            if opening is not None:
                yield opening
            if refusal is not None:
                reason = {NOT_STORED: "not_stored", USER_BUSY: "user_busy"}
                counts.refused.labels(msg.platform, reason.get(refusal, "queue_full")).inc()
                yield notice(key, refusal, msg.platform_message_id)
            if ticket is None or user is None:
                return
            self.kill_points.reached("stored")
            yield OutgoingReply(key, "", reply_to=msg.platform_message_id)
            await ticket.wait()
            async for reply in self.answer_turn(
                msg.platform, key, msg.is_dm, user, msg.platform_message_id, asker=msg
            ):
                yield reply
        finally:
            settled()
            arrival.settle()
            if ticket is not None:
                ticket.release()

    async def _seen_before(self, conv: Conversation, msg: IncomingMessage) -> bool:
        """Whether this platform message was stored already (delivered again after a crash:
        it is answered, or recovered at start-up, from its first delivery)."""
        if msg.platform_message_id is None:
            return False
        found = await self.store.messages.find_platform(conv.id, msg.platform_message_id)
        if found is not None:
            log.info("%s: message %s was stored before; skipped", conv.key, msg.platform_message_id)
        return found is not None

    async def answer_turn(
        self,
        platform: str,
        key: str,
        is_dm: bool,
        user: StoredMessage,
        reply_to: str | None,
        plan: Sequence[str | None] | None = None,
        done: Sequence[str | None] = (),
        asker: IncomingMessage | None = None,
    ) -> AsyncIterator[OutgoingReply]:
        """The answers to stored message ``user``, once its turn has come.

        The turn's speakers are chosen and stored first (its plan); each speaker's reply then
        has its own delivery state, and the message is answered once every one of them was
        delivered.  After a restart, ``plan`` is the stored one and ``done`` the speakers whose
        replies already exist: only the others speak.  A message deleted while it waited gets
        no answer.  A turn that ends with a notice instead of an answer moves the message to
        failed, with the reason.  ``asker`` is ``user`` as it arrived (its author's rights and
        mentions, for the tools), when it arrived in this process.
        """
        if self.edits.was_deleted(user.id):
            await self._set_state(user.id, FAILED, "deleted")
            log.info("%s: message %s was deleted before its answer started", key, user.id)
            return
        conv = await self.conversations.get(platform, key)
        mode = self.conversations.mode_of(conv, is_dm)
        if plan is None:
            plan = self._plan(conv, mode, user.text)
            try:
                await self.store.replies.start(user.id, plan)
            except STORAGE_ERRORS as exc:  # the answer matters more than its bookkeeping
                log.warning("could not record the turn of message %s: %s", user.id, exc)
        answered = bool(done)
        left = list(done)
        for name in plan:
            if name in left:
                left.remove(name)  # spoken before the restart
                continue
            char = self.characters.find(name) if name is not None else None
            if mode == "roleplay" and char is None:
                char = self.conversations.cast_of(conv)[0]
            final: OutgoingReply | None = None
            replies = self.answer(key, platform, mode, user.id, char, reply_to, asker=asker)
            async for reply in replies:
                if reply.final and reply.kind is not ReplyKind.ANSWER and not answered:
                    await self._set_state(user.id, FAILED, f"{reply.kind.value}: {reply.text}")
                final = reply
                yield reply
            if final is None or final.kind is not ReplyKind.ANSWER:
                break  # a refusal or an apology ends the turn: the next would answer nothing
            answered = True

    def _plan(self, conv: Conversation, mode: Mode, text: str) -> list[str | None]:
        """Who answers, in order: the office assistant, or the scene's speakers."""
        if mode == "work":
            return [None]
        cast = self.conversations.cast_of(conv)
        last = conv.settings.get("last_speaker")
        return [c.name for c in choose_speakers(cast, text, last, self.rng)]

    async def _set_state(self, user_id: int, state: str, error: str | None = None) -> None:
        try:
            await self.store.replies.set_state(user_id, state, error=error and shorten(error, 500))
        except STORAGE_ERRORS as exc:  # the answer matters more than its bookkeeping
            log.warning("could not record message %s as %s: %s", user_id, state, exc)

    async def answer(
        self,
        key: str,
        platform: str,
        mode: Mode,
        user_id: int,
        char: Character | None,
        reply_to: str | None,
        version_of: StoredMessage | None = None,
        asker: IncomingMessage | None = None,
    ) -> AsyncIterator[OutgoingReply]:
        """One speaker's reply to message ``user_id`` (``asker``: see :meth:`answer_turn`);
        with ``version_of``, a new version of that stored reply (/regenerate)."""
        conv = await self.conversations.get(platform, key)
        speaker = char.name if char is not None else None
        # A new version answers nothing new: only first answers are tracked.
        answers = user_id if version_of is None else None
        replaces: tuple[str, ...] = ()
        if version_of is not None:
            replaces = tuple(await self.store.replies.pieces_of(version_of.id))
        base = OutgoingReply(
            key, "", speaker=speaker, reply_to=reply_to, answers=answers, replaces=replaces
        )
        group = version_of.swipe_group if version_of is not None else None
        sampling, role = self.prompts.sampling(mode, char), ROLE_FOR_MODE[mode]
        others: list[str] = []
        reasoning: tuple[str, str] | None = None
        text = ""
        began = time.monotonic()
        outcome = self.metrics.failed.labels(platform, role)
        rounds: Rounds = None
        try:
            model = await self.models.get(role)
            model.upcoming(key)  # its prompt follows: it may join the same step as others
            if tools_on(conv, mode == "roleplay", self.settings.tools):
                rounds = await self.tool_use.rounds(model, platform, key, user_id, asker)

            def prompt() -> Awaitable[Built]:
                tools = rounds.prompt if rounds else None
                reserve = sampling.max_tokens
                return self.prompts.build(conv, model, user_id, char, reserve, group, tools)

            try:
                built = await prompt()
            except PromptTooLong as exc:
                outcome.inc()
                text = await too_long(self.store, self.history, conv, model, user_id, exc)
                yield replace(base, text=text, final=True, kind=ReplyKind.NOTICE)
                return
            conv = built.conv
            others = [s.strip("\n:") for s in built.stops]
            reasoning = model.template.reasoning
            async with self.memory.replying(key, role):
                while True:  # one generation, or one per tool round
                    text, sent = "", 0
                    grammar = rounds.next_grammar if rounds is not None else None
                    pieces = model.stream(
                        built.tokens, sampling, built.stops, slot=key, grammar=grammar
                    )
                    async for piece in pieces:
                        if not text and piece:
                            self.metrics.first_token.labels(role).observe(time.monotonic() - began)
                        text += piece
                        # A call is the bot's business, not the user's.
                        seen = rounds.visible(text) if rounds is not None else text
                        if len(seen) <= sent:
                            continue
                        delta, sent = seen[sent:], len(seen)
                        yield replace(base, text=shown(seen, char, others, reasoning), delta=delta)
                    if rounds is None or not await rounds.after(text):
                        break
                    try:
                        built = await prompt()
                    except PromptTooLong:
                        rounds.gave_up = "their results do not fit in my context window"
                        break
        except (ModelError, RuntimeError, *STORAGE_ERRORS) as exc:
            log.error("generation failed in %s: %s", key, exc, exc_info=trace_wanted(exc))
            if isinstance(exc, STORAGE_ERRORS):
                self.metrics.storage_errors.inc()
            outcome.inc()
            yield replace(base, text=APOLOGY, final=True, kind=ReplyKind.ERROR)
            return
        if rounds is not None and rounds.gave_up:
            outcome.inc()
            text = GAVE_UP.format(why=rounds.gave_up)
            yield replace(base, text=text, final=True, kind=ReplyKind.NOTICE)
            return
        if rounds is not None:
            text = rounds.answer_text(text)
        reply = shown(text, char, others, reasoning).strip()
        if not reply:
            outcome.inc()
            yield replace(base, text=NO_REPLY, final=True, kind=ReplyKind.NOTICE)
            return
        try:
            reply_tokens, generated = await asyncio.to_thread(tokens_of_reply, model, key, reply)
        except ModelError as exc:  # a remote tokenizer went away: the reply is still good
            log.warning("could not count the reply's tokens in %s: %s", key, exc)
            reply_tokens, generated = len(reply) // 3 + 1, ()
        # The documents the reply drew on and the tools that ran: the bot's lines, counted
        # roughly (the model's own tokens stay as generated).
        footer = rounds.footer() if rounds is not None else ""
        for line in (built.excerpts.sources_line(reply), footer):
            if line:
                reply, reply_tokens = f"{reply}\n\n{line}", reply_tokens + len(line) // 3 + 1
        message = StoredMessage(
            0,
            ASSISTANT,
            reply,
            author_name=speaker,
            token_count=reply_tokens,
            reply_to_id=user_id,
            swipe_of=group,
            delivered=False if answers is not None else None,
        )
        try:
            conv = await self.conversations.get(platform, key)
            if group is None:
                stored = await self.history.save(conv, message)
            else:  # the new version replaces the old one in one write
                stored = replace(
                    message, id=await self.store.messages.add_version(conv.id, message)
                )
                self.history.forget(key)
        except STORAGE_ERRORS as exc:
            log.error("could not store the reply in %s: %s", key, exc)
            self.metrics.storage_errors.inc()
            outcome.inc()
            yield replace(base, text=APOLOGY, final=True, kind=ReplyKind.ERROR)
            return
        self.metrics.answered.labels(platform, role).inc()
        self.metrics.tokens.labels(role).inc(reply_tokens)
        self.metrics.reply.labels(role).observe(time.monotonic() - began)
        if generated:
            # The KV cache holds exactly these tokens: the next prompt matches it to the end.
            self.prompts.encoder(model).remember_reply(stored, generated)
        if char is not None:
            await self.conversations.update_settings(conv, last_speaker=char.name)
        self.kill_points.reached("replied")
        yield replace(base, text=reply, final=True, stored_id=stored.id)
