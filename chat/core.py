"""The answer pipeline: persist, route, build the prompt, stream the reply, persist it.

Adapters call :meth:`ConversationCore.respond` with an :class:`IncomingMessage` and render the
:class:`OutgoingReply` snapshots it yields.  The core is assembled from parts that each read top
to bottom: the conversation commands (:mod:`chat.actions`), prompt building
(:mod:`chat.prompt.building`), /continue (:mod:`chat.continuation`), /summarize (:mod:`chat.summarize`),
platform edits and deletions (:mod:`chat.edits`), and the queues and fair shares
(:mod:`chat.conversations`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import replace

from ai_model.base import ChatModel, ModelError
from chat.prompt.assembly import pinned_limit
from chat.roleplay.characters import Character
from chat.actions import ConversationCommands
from chat.continuation import Continuation
from chat.conversations import APOLOGY, ModelProvider, Ticket, trace_wanted
from chat.edits import DELETED, FollowsEdits
from chat.limits import shorten
from chat.messages import IncomingMessage, OutgoingReply, ReplyKind
from chat.prompt.window import PromptTooLong, clean_name
from chat.roleplay.scene import choose_speakers, clean_reply, strip_name_tag
from chat.settings import ROLE_FOR_MODE, Mode
from chat.summarize import Summaries
from storage.records import (
    ANSWERING,
    ASSISTANT,
    FAILED,
    NOTICE,
    RECEIVED,
    USER,
    Conversation,
    StoredMessage,
)
from storage.store import STORAGE_ERRORS

__all__ = ["APOLOGY", "ConversationCore", "ModelProvider"]

log = logging.getLogger(__name__)

NOT_STORED = (
    "Sorry, I could not save your message because of a storage problem on my side. "
    "Please send it again in a moment."
)
SLOW_STORAGE = (
    "Saving messages is slow on my side right now. Yours is not lost: I will answer as soon "
    "as I can."
)
SLOW_STORAGE_S = 2.0  # storing a message for longer than this gets the sender a notice
RESTARTING = (
    "I am restarting right now and could not take your message. Please send it again in a minute."
)


def _shown(text: str, char: Character | None, others: Sequence[str]) -> str:
    """A reply as users see it: without a leading ``Name:`` of anyone in the conversation (the
    model imitates the names in front of turns), and in roleplay cut where it starts writing
    another speaker's lines."""
    if char is not None:
        return clean_reply(text, char.display_name, others)
    return strip_name_tag(text, [*others, "Assistant"])


class ConversationCore(ConversationCommands, FollowsEdits, Summaries, Continuation):
    """Turns incoming messages into streamed, persisted replies."""

    async def respond(
        self, msg: IncomingMessage, on_stored: Callable[[], None] | None = None
    ) -> AsyncIterator[OutgoingReply]:
        """Store ``msg`` and, if it is for the bot, yield the streamed reply to it.

        A message is for the bot when the adapter says it addresses the bot (DM, mention, reply,
        command) or, in a roleplay channel, when it names a character of the scene.  The first
        snapshot yielded is an empty "accepted" one, sent before waiting for the turn, so
        adapters can show a typing indicator at once; nothing is yielded for messages only
        stored.  A roleplay conversation that has not started yet first gets its greeting.

        ``on_stored`` is called once the message is safely stored, or once it is clear that it
        will not be (refused, or stored before: a platform may deliver a message twice after a
        crash, and the second delivery is skipped).  Adapters confirm the message to the
        platform only then.

        Refusals are notices: over the rate limit (the message is not stored), too many
        answers already queued here or for this user (stored, not answered), or a storage
        failure (nothing stored, the user is asked to send it again).
        """
        settled = _Once(on_stored)
        key = msg.conversation_key
        ticket: Ticket | None = None
        try:
            if self.closing:
                settled()
                yield self._notice(key, RESTARTING, msg.platform_message_id)
                return
            self.kill_points.reached("received")
            allowed, notice = self.admit(msg.platform, msg.author_id)
            if not allowed:
                settled()
                if notice:
                    yield self._notice(key, notice, msg.platform_message_id)
                return
            channel = self._channel(key)
            opening: OutgoingReply | None = None
            refusal: str | None = None
            user_key = f"{msg.platform}:{msg.author_id}"
            # The intake lock is first come, first served: messages are stored, and their
            # answering turns taken, in arrival order.
            async with channel.intake:
                try:
                    conv = await self.conversation(msg.platform, key)
                    if await self._seen_before(conv, msg):
                        return
                    early = self.arrived(key, msg.platform_message_id)
                    if early is DELETED:
                        return  # deleted before we got to store it: as if never sent
                    if isinstance(early, str):
                        msg = replace(msg, text=early)  # edited before we got to store it
                    roleplay = self.mode_of(conv, msg.is_dm) == "roleplay"
                    if roleplay and not conv.settings.get("opened"):
                        opening = await self._open(conv, msg.is_dm, clean_name(msg.author_name))
                        conv = await self.conversation(msg.platform, key)
                    reply_all = self.settings.platform(msg.platform).roleplay_reply_all
                    named = roleplay and (reply_all or self._names_cast(conv, msg.text))
                    wanted = msg.addresses_bot or named
                    if wanted:
                        refusal = self._queue_refusal(key, user_key)
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
                                reply_state=RECEIVED if wanted and refusal is None else None,
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
                    if wanted and refusal is None:
                        ticket = self._ticket(key, user_key)
                finally:
                    settled()
            if opening is not None:
                yield opening
            if refusal is not None:
                yield self._notice(key, refusal, msg.platform_message_id)
            if ticket is None:
                return
            self.kill_points.reached("stored")
            yield OutgoingReply(key, "", reply_to=msg.platform_message_id)
            await ticket.wait()
            async for reply in self.answer_turn(
                key, msg.is_dm, user.id, msg.text, msg.platform_message_id
            ):
                yield reply
        finally:
            settled()
            if ticket is not None:
                ticket.release()

    async def _seen_before(self, conv: Conversation, msg: IncomingMessage) -> bool:
        """Whether this platform message was stored already (delivered again after a crash:
        it is answered, or recovered at start-up, from its first delivery)."""
        if msg.platform_message_id is None:
            return False
        found = await self.store.find_platform_message(conv.id, msg.platform_message_id)
        if found is not None:
            log.info("%s: message %s was stored before; skipped", conv.key, msg.platform_message_id)
        return found is not None

    async def answer_turn(
        self, key: str, is_dm: bool, user_id: int, text: str, reply_to: str | None
    ) -> AsyncIterator[OutgoingReply]:
        """The answers to stored message ``user_id``, once its turn has come.

        Moves the message to answering, and to failed (with the reason) when the turn ends
        with a notice instead of an answer; delivery reports move it to answered.
        """
        conv = self._conv(key)
        mode = self.mode_of(conv, is_dm)
        if mode == "work":
            speakers: list[Character | None] = [None]
        else:
            cast = self.cast_of(conv)
            last = conv.settings.get("last_speaker")
            speakers = list(choose_speakers(cast, text, last, self.rng))
        await self._set_state(user_id, ANSWERING)
        answered = False
        for char in speakers:
            final: OutgoingReply | None = None
            async for reply in self._answer(key, mode, user_id, char, reply_to):
                if reply.final and reply.kind is not ReplyKind.ANSWER and not answered:
                    await self._set_state(user_id, FAILED, f"{reply.kind.value}: {reply.text}")
                final = reply
                yield reply
            if final is None or final.kind is not ReplyKind.ANSWER:
                break  # a refusal or an apology ends the turn: the next would answer nothing
            answered = True

    async def _set_state(self, user_id: int, state: str, error: str | None = None) -> None:
        try:
            await self.store.set_reply_state(user_id, state, error=error and shorten(error, 500))
        except STORAGE_ERRORS as exc:  # the answer matters more than its bookkeeping
            log.warning("could not record message %s as %s: %s", user_id, state, exc)

    # -- delivery reports (adapters.streaming.DeliveryTracker) -------------------------------

    async def piece_sent(self, reply: OutgoingReply, pieces: list[str]) -> None:
        """A new platform message of the answer to ``reply.answers`` is showing."""
        if reply.answers is None or reply.kind is not ReplyKind.ANSWER:
            return
        try:
            await self.store.set_reply_state(reply.answers, ANSWERING, pieces=pieces)
        except STORAGE_ERRORS as exc:
            log.warning("could not record the pieces of answer %s: %s", reply.answers, exc)
        self.kill_points.reached("streaming")

    async def delivered(self, reply: OutgoingReply, pieces: list[str]) -> None:
        """The final text of a stored reply reached the platform: an answer (its question is
        answered), or another version or continuation (where it shows is recorded)."""
        if reply.stored_id is None:
            return
        if reply.answers is None:
            try:
                await self.store.set_pieces(reply.stored_id, pieces)
            except STORAGE_ERRORS as exc:
                log.warning("could not record where reply %s shows: %s", reply.stored_id, exc)
            return
        try:
            await self.store.mark_delivered(
                reply.stored_id, pieces[0] if pieces else None, reply.answers, pieces
            )
        except STORAGE_ERRORS as exc:
            log.warning("could not record answer %s as delivered: %s", reply.stored_id, exc)

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
        work = self._regenerate_last(platform, key, is_dm)
        async for reply in self._in_turn(platform, key, user_id, work):
            yield reply

    async def _regenerate_last(
        self, platform: str, key: str, is_dm: bool
    ) -> AsyncGenerator[OutgoingReply, None]:
        conv = await self.conversation(platform, key)
        last = await self.store.last_reply(conv.id, after_id=conv.reset_after_id)
        if last is None:
            yield self._notice(key, "There is no reply of mine to regenerate yet.")
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
        # A new version (/regenerate) answers nothing new: only first answers are tracked.
        answers = user_id if swipe_of is None else None
        base = OutgoingReply(key, "", speaker=speaker, reply_to=reply_to, answers=answers)
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
            async with self._generating(key, ROLE_FOR_MODE[mode]):
                async for piece in model.stream(tokens, sampling, stops, slot=key):
                    text += piece
                    yield replace(base, text=_shown(text, char, others), delta=piece)
        except (ModelError, RuntimeError, *STORAGE_ERRORS) as exc:
            log.error("generation failed in %s: %s", key, exc, exc_info=trace_wanted(exc))
            yield replace(base, text=APOLOGY, final=True, kind=ReplyKind.ERROR)
            return
        reply = _shown(text, char, others).strip()
        if not reply:
            yield replace(
                base, text="(no reply — try rephrasing)", final=True, kind=ReplyKind.NOTICE
            )
            return
        try:
            reply_tokens, generated = await asyncio.to_thread(_reply_tokens, model, key, reply)
        except ModelError as exc:  # a remote tokenizer went away: the reply is still good
            log.warning("could not count the reply's tokens in %s: %s", key, exc)
            reply_tokens, generated = len(reply) // 3 + 1, ()
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
                    delivered=False if answers is not None else None,
                ),
            )
            if swipe_of is not None:  # the new version is stored: now it may replace the old
                await self.store.choose_swipe(conv.id, swipe_of, stored.id)
                self.history.forget(key)
        except STORAGE_ERRORS as exc:
            log.error("could not store the reply in %s: %s", key, exc)
            yield replace(base, text=APOLOGY, final=True, kind=ReplyKind.ERROR)
            return
        if generated:
            # The KV cache holds exactly these tokens: the next prompt matches it to the end.
            self._encoder(model).remember_reply(stored, generated)
        if char is not None:
            await self._update_settings(conv.platform, key, last_speaker=char.name)
        self.kill_points.reached("replied")
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


class _Once:
    """Calls ``callback`` (if any) the first time it is called."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[], None] | None) -> None:
        self._callback = callback

    def __call__(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


def _reply_tokens(model: ChatModel, slot: str, reply: str) -> tuple[int, Sequence[int]]:
    """The reply's token count, and the generated tokens when they spell exactly the reply
    (blocking: a remote model may ask its server)."""
    generated = model.generated(slot)
    if generated and model.detokenize(generated).strip() == reply:
        return len(generated), generated  # what the prompt will hold: no second tokenizing
    return len(model.tokenize(reply.encode("utf-8"), add_bos=False, special=False)), ()
