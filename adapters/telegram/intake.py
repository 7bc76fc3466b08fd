"""Telegram updates become the engine's inputs: messages, edits, media it cannot read; replies
stream back into the chat.

DMs are always answered; in groups the bot answers when @mentioned, replied to, or addressed
by a command, and in roleplay groups also when the character is named.  Each update takes its
place in its conversation's order when the poller hands it over (:meth:`Intake.arrive`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from telegram import Bot, Message, Update
from telegram.constants import ChatAction, ChatType, MessageEntityType
from telegram.error import BadRequest, TelegramError
from telegram.ext import ContextTypes

from adapters.streaming import StreamLimits, chain, single, stream_reply
from adapters.telegram.api import admin_check, retrying
from adapters.telegram.sinks import MAX_MESSAGE_CHARS, ChatSink
from adapters.text import to_telegram_html
from chat.commands import TEXT_ONLY, CommandSet
from chat.core import ConversationCore
from chat.limits import fit
from chat.messages import Attachment, IncomingMessage, OutgoingReply
from chat.queues import Arrival
from chat.recovery import Resumable
from chat.recovery import finish as finish_recovery

log = logging.getLogger(__name__)

PLATFORM = "telegram"
TYPING_EVERY_S = 4.5  # a chat action shows for about 5 seconds
_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,64})(?:@(\w+))?")


def conversation_key(chat_id: int) -> str:
    return f"{PLATFORM}:{chat_id}"


def chat_id_of(key: str) -> int:
    return int(key.split(":", 1)[1])


def mentioned(message: Message) -> tuple[tuple[str, str], ...]:
    """The people ``message`` names with an id (the tools act only for those): those it
    mentions by name without a username, in its text or a file's caption, and the author of
    the message it replies to.  An @username mention carries no id the Bot API can resolve."""
    entities = (*(message.entities or ()), *(message.caption_entities or ()))
    users = [e.user for e in entities if e.type == MessageEntityType.TEXT_MENTION]
    replied = message.reply_to_message
    if replied is not None:
        users.append(replied.from_user)
    found = {
        str(user.id): user.full_name or user.username or str(user.id)
        for user in users
        if user is not None and not user.is_bot
    }
    return tuple(found.items())[:20]


class Intake:
    """Updates to the engine, replies back to the chat."""

    def __init__(self, core: ConversationCore, bot: Bot, limits: StreamLimits) -> None:
        self.core = core
        self.bot = bot
        self.limits = limits
        self._arrivals: dict[int, Arrival] = {}  # update id -> its place in the order
        self.recovered = asyncio.Event()  # set once the start-up recovery has finished

    # -- order --------------------------------------------------------------------------------

    def arrive(self, update: Update) -> None:
        """The poller hands ``update`` over: it takes its conversation's next place now."""
        chat = update.effective_chat
        if chat is not None:
            self._arrivals[update.update_id] = self.core.queues.arrive(conversation_key(chat.id))

    def arrival(self, update: Update) -> Arrival | None:
        return self._arrivals.get(update.update_id)

    def done(self, update: Update) -> None:
        arrival = self._arrivals.pop(update.update_id, None)
        if arrival is not None:
            arrival.settle()

    # -- messages -----------------------------------------------------------------------------

    def incoming(self, message: Message, text: str, mentions: bool) -> IncomingMessage:
        user = message.from_user
        assert user is not None
        return IncomingMessage(
            platform=PLATFORM,
            conversation_key=conversation_key(message.chat_id),
            author_id=str(user.id),
            author_name=user.full_name or user.username or str(user.id),
            text=text,
            mentions_bot=mentions,
            is_dm=message.chat.type == ChatType.PRIVATE,
            platform_message_id=str(message.message_id),
            mentions=mentioned(message),
            is_admin=admin_check(self.bot, message),
        )

    def mentions_bot(self, message: Message, text: str) -> bool:
        """DM, reply to the bot or @mention (naming the character is the engine's business)."""
        if message.chat.type == ChatType.PRIVATE:
            return True
        reply = message.reply_to_message
        if reply is not None and reply.from_user is not None and reply.from_user.id == self.bot.id:
            return True
        handle = f"@{self.bot.username}".lower()
        entities = message.parse_entities([MessageEntityType.MENTION]) if message.text else {}
        return any(value.lower() == handle for value in entities.values()) or (
            handle in text.lower()
        )

    def _without_handle(self, text: str) -> str:
        handle = re.compile(rf"@{re.escape(self.bot.username or '')}\b", re.IGNORECASE)
        return handle.sub("", text).strip() or text

    async def on_text(self, update: Update, settle: Any) -> None:
        message = update.effective_message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        text = (message.text or message.caption or "").strip()
        if not text:
            return
        msg = self.incoming(message, self._without_handle(text), self.mentions_bot(message, text))
        reply_to = None if msg.is_dm else message.message_id
        replies = self.core.answers.respond(msg, on_stored=settle, arrival=self.arrival(update))
        await self.stream(message.chat_id, replies, reply_to)

    async def on_edit(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        """A user edited a message: the stored text follows (see :mod:`chat.edits`)."""
        message = update.edited_message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        text = self._without_handle((message.text or message.caption or "").strip())
        is_dm = message.chat.type == ChatType.PRIVATE
        replies = self.core.edits.edited(
            PLATFORM,
            conversation_key(message.chat_id),
            str(message.message_id),
            text,
            is_dm,
            self.arrival(update),
        )
        await self.stream(message.chat_id, replies, None)

    async def on_document(self, update: Update) -> bool:
        """Read a posted file into the chat's documents; False when files are not the bot's
        business there (a roleplay chat), so the caller treats it as any other media."""
        message = update.effective_message
        if message is None or message.document is None or message.from_user is None:
            return False
        if message.from_user.is_bot:
            return True
        document = message.document

        async def read() -> bytes:
            file = await retrying(lambda: document.get_file())
            return bytes(await file.download_as_bytearray())

        name = document.file_name or "file"
        msg = self.incoming(message, "", True)
        lines = await self.core.postings.receive(
            msg, [Attachment(name, document.file_size or 0, read)]
        )
        if lines is None:
            return False
        if lines:
            await self.say(message, "\n".join(lines))
        return True

    async def on_other(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or message.chat.type != ChatType.PRIVATE:
            return  # in groups, media is none of the bot's business
        await self.say(message, TEXT_ONLY)

    async def on_unknown_command(self, update: Update, commands: CommandSet) -> None:
        """One line pointing at /help, for commands this bot does not have.

        In groups, a command addressed to another bot (``/cmd@other_bot``) is that bot's.
        """
        message = update.effective_message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        found = _COMMAND.match(message.text or "")
        target = found.group(2) if found else None
        if target and target.lower() != (self.bot.username or "").lower():
            return
        allowed, told = self.core.queues.admit(PLATFORM, str(message.from_user.id))
        if told:
            await self.say(message, told)
        if allowed:
            await self.say(message, commands.unknown(f"/{found.group(1)}" if found else "That"))

    # -- replies ------------------------------------------------------------------------------

    def sink(self, chat_id: int, reply_to: int | None) -> ChatSink:
        return ChatSink(self.bot, retrying, chat_id, reply_to)

    async def stream(
        self,
        chat_id: int,
        replies: AsyncIterator[OutgoingReply],
        reply_to: int | None = None,
        *,
        sink: ChatSink | None = None,
        resume: tuple[str, ...] = (),
    ) -> list[str]:
        """Stream ``replies`` into the chat; nothing is sent when the engine stays silent.

        A new version of a reply (/regenerate, /swipe) is posted anew, below the old one; a
        continued reply (/continue) grows in the messages that show it."""
        first = await anext(replies, None)
        if first is None:
            return []
        sink = sink or self.sink(chat_id, reply_to)
        typing = asyncio.create_task(self._typing(chat_id))
        try:
            return await stream_reply(
                chain(first, replies),
                sink,
                self.limits,
                tracker=self.core.delivery,
                resume=resume,
                versions_in_place=False,
            )
        finally:
            typing.cancel()

    async def _typing(self, chat_id: int) -> None:
        while True:
            try:
                await self.bot.send_chat_action(chat_id, ChatAction.TYPING)
            except TelegramError as exc:  # cosmetic: never let it break a reply
                log.debug("telegram: chat action failed: %s", exc)
            await asyncio.sleep(TYPING_EVERY_S)

    async def say(self, message: Message, text: str, markdown: bool = False) -> None:
        text = fit(text, MAX_MESSAGE_CHARS)
        if markdown and len(html := to_telegram_html(text)) <= MAX_MESSAGE_CHARS:
            try:
                await retrying(lambda: message.reply_html(html))
                return
            except BadRequest as exc:  # formatting refused: the plain text goes instead
                log.info("telegram: formatting rejected (%s), sending plain text", exc)
        await retrying(lambda: message.reply_text(text))

    async def send(self, reply: OutgoingReply) -> list[str]:
        chat_id = chat_id_of(reply.conversation_key)
        quote = int(reply.reply_to) if reply.reply_to and reply.reply_to.isdigit() else None
        return await stream_reply(single(reply), self.sink(chat_id, quote), self.limits)

    # -- recovery -----------------------------------------------------------------------------

    async def recover(self) -> list[asyncio.Task[Any]]:
        """Answer what a crash or a stop left unanswered, before new updates are taken."""
        started = asyncio.get_running_loop().time()
        plan = await self.core.recovery.plan(PLATFORM)
        jobs: list[asyncio.Task[Any]] = [
            asyncio.create_task(self._resume(job)) for job in plan.resume
        ]
        jobs += [asyncio.create_task(self.send(notice)) for notice in plan.notices]

        async def finish() -> None:
            await finish_recovery(PLATFORM, jobs, started)
            self.recovered.set()

        return [asyncio.create_task(finish())]

    async def _resume(self, job: Resumable) -> None:
        chat_id = chat_id_of(job.conversation_key)
        quote = job.platform_message_id
        sink = self.sink(chat_id, int(quote) if quote and quote.isdigit() else None)
        replies = self.core.recovery.resume(job, is_dm=chat_id > 0)
        await self.stream(chat_id, replies, sink=sink, resume=job.pieces)
