"""Telegram adapter: python-telegram-bot's handlers, fed by the adapter's own long polling.

DMs are always answered; in groups the bot answers when @mentioned, replied to, or addressed by a
command, and in roleplay groups also when the character is named.  Replies stream by editing,
throttled for Telegram's flood limits; the final edit is HTML with a plain-text fallback.

The adapter polls ``getUpdates`` itself rather than through PTB's ``Updater``, which confirms a
batch (by asking for the next offset) before its handlers have run: here the next offset is asked
for only once every message of the batch is stored, so a crash loses nothing that Telegram will
not deliver again (a message delivered twice is recognised by its id and skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any, TypeVar

from telegram import BotCommand, Message, Update
from telegram.constants import ChatAction, ChatMemberStatus, ChatType, MessageEntityType
from telegram.error import Forbidden, InvalidToken, RetryAfter, TelegramError
from telegram.ext import Application, CommandHandler, ContextTypes, MessageHandler, filters

from adapters.base import SentMessage
from adapters.streaming import (
    FINISH_DELIVERY_S,
    StreamLimits,
    chain,
    finish_then_cancel,
    single,
    stream_reply,
)
from adapters.telegram.sinks import MAX_MESSAGE_CHARS, ChatSink
from adapters.text import split_message
from chat.roleplay.cards import parse_card_bytes
from chat.roleplay.characters import CardError
from chat.core import ConversationCore
from chat.limits import MAX_CARD_BYTES, fit, shorten
from chat.messages import IncomingMessage, OutgoingReply, ReplyKind
from chat.recovery import Recovery, Resumable
from chat.recovery import finish as finish_recovery
from chat.settings import ROLE_FOR_MODE, PlatformSettings, parse_mode

log = logging.getLogger(__name__)

PLATFORM = "telegram"
DEFAULT_BASE_URL = "https://api.telegram.org/bot"
# About one message per second per chat is allowed; edits count too, so stay well below it.
EDIT_INTERVAL_S = 1.5
MIN_NEW_CHARS = 40
TYPING_EVERY_S = 4.5  # a chat action shows for about 5 seconds
MAX_RETRIES = 5
POLL_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # pauses after failed getUpdates calls
STORE_WAIT_S = 120.0  # a batch whose messages are not stored by then is confirmed anyway
SUFFIX_ROOM = 64  # characters kept free in each chunk for the swipe counter
ADMIN_STATUSES = {ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER}
OWNERS_ONLY = (
    "Only the bot's owners can import characters: they are shared by every chat. "
    "(Owners are listed in the bot's settings.)"
)
HANDLER_FAILED = "Sorry, something went wrong on my side while handling that. Please try again."
_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,64})(?:@(\w+))?")

Handler = Callable[[Update, ContextTypes.DEFAULT_TYPE], Coroutine[Any, Any, None]]

COMMANDS = (
    ("start", "Say hello (in roleplay: the character's greeting)"),
    ("help", "What I do here and my commands"),
    ("reset", "Start a fresh conversation (admins, in groups)"),
    ("mode", "roleplay or work (admins, in groups)"),
    ("character", "Show or choose the character (admins, in groups)"),
    ("regenerate", "Write my last reply again"),
    ("swipe", "Show another version of my last reply (/swipe back: the previous one)"),
    ("memory", "What I remember beyond my window"),
    ("remember", "Pin a fact I must keep in mind (admins, in groups)"),
    ("forget", "Unpin a fact by its number (admins, in groups)"),
    ("continue", "Make my last reply longer"),
    ("note", "Set or clear the author's note that steers replies (admins, in groups)"),
    ("persona", "Who you play here: /persona Name: description (empty: clear)"),
    ("summarize", "Sum up the last messages: /summarize [count] (work mode)"),
)

T = TypeVar("T")


def conversation_key(chat_id: int) -> str:
    return f"{PLATFORM}:{chat_id}"


def _retry_after_seconds(exc: RetryAfter) -> float:
    with warnings.catch_warnings():  # PTB 22 warns that the type will become timedelta
        warnings.simplefilter("ignore")
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class TelegramAdapter:
    """Connects the core to Telegram (or any Bot-API-compatible server)."""

    name = PLATFORM
    MAX_MESSAGE_CHARS = MAX_MESSAGE_CHARS

    def __init__(
        self,
        core: ConversationCore,
        settings: PlatformSettings,
        *,
        poll_timeout: float = 10.0,
        limits: StreamLimits | None = None,
    ) -> None:
        if not settings.token:
            raise ValueError("TELEGRAM_BOT_TOKEN is not set")
        self.core = core
        # Chunks leave room for the swipe counter added to a final message.
        self.limits = limits or StreamLimits(
            MAX_MESSAGE_CHARS - SUFFIX_ROOM, EDIT_INTERVAL_S, MIN_NEW_CHARS
        )
        self.poll_timeout = poll_timeout
        base_url = settings.api_base_url or DEFAULT_BASE_URL
        self.app = (
            Application.builder()
            .token(settings.token)
            .base_url(base_url)
            .base_file_url(base_url.replace("/bot", "/file/bot"))
            .concurrent_updates(True)
            # A second connection lets shutdown's last getUpdates pass a pending long poll.
            .get_updates_connection_pool_size(2)
            .build()
        )
        self._stopped = asyncio.Event()
        self._offset: int | None = None  # the next getUpdates offset: confirms what is before
        self._settled: dict[int, asyncio.Future[None]] = {}  # update id -> stored (or not)
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.recovery = Recovery(core)
        self.recovered = asyncio.Event()  # set once the start-up recovery has finished
        self._add_handlers()

    def _add_handlers(self) -> None:
        app = self.app
        only_new = filters.UpdateType.MESSAGE
        guard = self._guarded
        for name, callback in (
            ("start", self._cmd_start),
            ("help", self._cmd_help),
            ("reset", self._cmd_reset),
            ("mode", self._cmd_mode),
            ("character", self._cmd_character),
            ("swipe", self._cmd_swipe),
            ("memory", self._cmd_memory),
            ("remember", self._cmd_remember),
            ("forget", self._cmd_forget),
            ("note", self._cmd_note),
            ("persona", self._cmd_persona),
        ):
            app.add_handler(CommandHandler(name, guard(callback, limited=True), filters=only_new))
        # /regenerate is held to the fair-share limits by the core itself.
        app.add_handler(CommandHandler("regenerate", guard(self._cmd_regenerate), filters=only_new))
        app.add_handler(CommandHandler("continue", guard(self._cmd_continue), filters=only_new))
        app.add_handler(CommandHandler("summarize", guard(self._cmd_summarize), filters=only_new))
        card_caption = filters.CaptionRegex(r"^/character(@\w+)?\s+import\b")
        app.add_handler(
            MessageHandler(
                only_new & filters.Document.ALL & card_caption,
                guard(self._on_card_upload, limited=True),
            )
        )
        edited = filters.UpdateType.EDITED_MESSAGE & (filters.TEXT | filters.CAPTION)
        app.add_handler(MessageHandler(edited, guard(self._on_edit)))
        text = guard(self._on_text, stores=True)
        app.add_handler(MessageHandler(only_new & filters.TEXT & ~filters.COMMAND, text))
        app.add_handler(MessageHandler(only_new & filters.COMMAND, guard(self._on_unknown_command)))
        app.add_handler(MessageHandler(only_new & filters.CAPTION, text))
        unsupported = filters.Sticker.ALL | filters.PHOTO | filters.VOICE | filters.VIDEO
        app.add_handler(
            MessageHandler(
                only_new & (unsupported | filters.Document.ALL), guard(self._on_other, limited=True)
            )
        )
        app.add_error_handler(self._on_error)

    def _guarded(self, handler: Handler, *, limited: bool = False, stores: bool = False) -> Handler:
        """``handler`` that never raises: a failure is logged and the user gets an apology.

        ``limited`` handlers first pass the sender's rate limit (text messages pass it in the
        core, with the rest of the fair-share rules).  The update of a handler that ``stores``
        its message is confirmed once it is stored; any other, as soon as it is handled.
        """

        async def run(update: Update, ctx: ContextTypes.DEFAULT_TYPE) -> None:
            message = update.effective_message
            if not stores:
                self._settle(update.update_id)
            try:
                if limited and message is not None and not await self._admitted(message):
                    return
                await handler(update, ctx)
            except Exception:
                log.exception("telegram: handling an update failed")
                if message is not None:
                    with contextlib.suppress(TelegramError):
                        await message.reply_text(HANDLER_FAILED)

        return run

    async def _admitted(self, message: Message) -> bool:
        sender = message.from_user
        if sender is None:
            return True
        # Anonymous admins all post as one Telegram user: count them by their group instead.
        who = f"chat{message.sender_chat.id}" if message.sender_chat else str(sender.id)
        allowed, notice = self.core.admit(PLATFORM, who)
        if notice:
            await self._say(message, notice)
        return allowed

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, register the command menu, finish what a stop left undone, poll until
        :meth:`stop`."""
        await self.app.initialize()
        try:
            await self._retrying(
                lambda: self.app.bot.set_my_commands([BotCommand(n, d) for n, d in COMMANDS])
            )
            await self.app.start()
            await self._recover()
            self._poller = asyncio.create_task(self._poll())
            log.info("telegram: polling as @%s", self.app.bot.username)
            await self._stopped.wait()
        finally:
            await self.stop_intake()
            # Handlers still running deliver what is written, briefly; then they stop here.
            await finish_then_cancel(self._tasks, FINISH_DELIVERY_S)
            if self.app.running:
                await self.app.stop()
            await self.app.shutdown()

    async def stop(self) -> None:
        self._stopped.set()

    async def stop_intake(self) -> None:
        """Stop polling: updates not fetched yet stay on Telegram's side for the next start.

        The updates already stored are confirmed with one last ``getUpdates``.
        """
        poller, self._poller = self._poller, None
        if poller is None:
            return
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        if self._offset is not None:
            try:
                await self.app.bot.get_updates(offset=self._offset, timeout=0, limit=1)
            except TelegramError as exc:  # they are delivered again, and skipped, next time
                log.info("telegram: could not confirm the last updates: %s", exc)

    # -- polling ------------------------------------------------------------------------------

    async def _poll(self) -> None:
        """Fetch updates; ask for the next ones only when these are stored."""
        failures = 0
        while True:
            try:
                updates = await self.app.bot.get_updates(
                    offset=self._offset, timeout=int(self.poll_timeout)
                )
            except (Forbidden, InvalidToken):
                log.error("telegram: the bot token was refused; stopping")
                self._stopped.set()
                return
            except RetryAfter as exc:
                await asyncio.sleep(_retry_after_seconds(exc))
                continue
            except TelegramError as exc:
                pause = POLL_RETRY_S[min(failures, len(POLL_RETRY_S) - 1)]
                failures += 1
                log.warning("telegram: getUpdates failed (%s); retrying in %.0fs", exc, pause)
                await asyncio.sleep(pause)
                continue
            failures = 0
            if not updates:
                continue
            settled = []
            for update in updates:
                done = self._settled[update.update_id] = asyncio.get_running_loop().create_future()
                settled.append(done)
                self._spawn(self._process(update))
            waited = asyncio.get_running_loop().time()
            _, late = await asyncio.wait(settled, timeout=STORE_WAIT_S)
            log.debug(
                "telegram: %d update(s) stored in %.2fs",
                len(updates),
                asyncio.get_running_loop().time() - waited,
            )
            if late:
                log.warning(
                    "telegram: %d update(s) not stored after %.0fs", len(late), STORE_WAIT_S
                )
            self._offset = updates[-1].update_id + 1

    async def _process(self, update: Update) -> None:
        try:
            await self.app.process_update(update)
        finally:
            self._settle(update.update_id)

    def _settle(self, update_id: int) -> None:
        done = self._settled.pop(update_id, None)
        if done is not None and not done.done():
            done.set_result(None)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- recovery -----------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Answer what a crash or a stop left unanswered, before new updates are taken."""
        started = asyncio.get_running_loop().time()
        plan = await self.recovery.plan(PLATFORM)
        jobs: list[asyncio.Task[Any]] = [
            asyncio.create_task(self._resume(job)) for job in plan.resume
        ]
        jobs += [asyncio.create_task(self.send(notice)) for notice in plan.notices]

        async def finish() -> None:
            await finish_recovery(PLATFORM, jobs, started)
            self.recovered.set()

        self._spawn(finish())

    async def _resume(self, job: Resumable) -> None:
        chat_id = self._chat_id(job.conversation_key)
        quote = job.platform_message_id
        sink = ChatSink(self, chat_id, int(quote) if quote and quote.isdigit() else None)
        replies = self.recovery.resume(job, is_dm=chat_id > 0)
        await self._stream(chat_id, replies, sink=sink, resume=job.pieces)

    # -- sending ------------------------------------------------------------------------------

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a Bot API call, waiting out flood-control answers instead of losing the text."""
        for attempt in range(MAX_RETRIES):
            try:
                return await call()
            except RetryAfter as exc:
                wait = _retry_after_seconds(exc)
                log.warning("telegram: flood control, waiting %.1fs (attempt %d)", wait, attempt)
                await asyncio.sleep(wait)
        return await call()

    async def send(self, reply: OutgoingReply) -> SentMessage:
        """Send a whole reply (split at Telegram's limit); returns its first message."""
        chat_id = self._chat_id(reply.conversation_key)
        quote = int(reply.reply_to) if reply.reply_to and reply.reply_to.isdigit() else None
        ids = await stream_reply(single(reply), ChatSink(self, chat_id, quote), self.limits)
        return SentMessage(reply.conversation_key, ids[0] if ids else "", reply.text)

    async def edit(self, sent: SentMessage, reply: OutgoingReply) -> SentMessage:
        """Replace a sent message's text (its first chunk, if the text is too long)."""
        chunk = (split_message(reply.text, MAX_MESSAGE_CHARS) or [reply.text])[0]
        sink = ChatSink(self, self._chat_id(reply.conversation_key), None)
        await sink.edit_chunk(sent.message_id, chunk, reply, reply.final)
        return SentMessage(sent.conversation_key, sent.message_id, chunk)

    def _chat_id(self, key: str) -> int:
        return int(key.split(":", 1)[1])

    async def _stream(
        self,
        chat_id: int,
        replies: AsyncIterator[OutgoingReply],
        reply_to: int | None = None,
        *,
        sink: ChatSink | None = None,
        resume: tuple[str, ...] = (),
    ) -> list[str]:
        """Stream ``replies`` into the chat; nothing is sent when the core stays silent."""
        first = await anext(replies, None)
        if first is None:
            return []
        sink = sink or ChatSink(self, chat_id, reply_to)
        typing = asyncio.create_task(self._typing(chat_id))
        try:
            return await stream_reply(
                chain(first, replies), sink, self.limits, tracker=self.core, resume=resume
            )
        finally:
            typing.cancel()

    async def _typing(self, chat_id: int) -> None:
        while True:
            try:
                await self.app.bot.send_chat_action(chat_id, ChatAction.TYPING)
            except TelegramError as exc:  # cosmetic: never let it break a reply
                log.debug("telegram: chat action failed: %s", exc)
            await asyncio.sleep(TYPING_EVERY_S)

    async def _say(self, message: Message, text: str) -> None:
        await self._retrying(lambda: message.reply_text(fit(text, MAX_MESSAGE_CHARS)))

    # -- incoming -----------------------------------------------------------------------------

    def _incoming(self, message: Message, text: str, mentions: bool) -> IncomingMessage:
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
        )

    def _mentions_bot(self, message: Message, text: str) -> bool:
        """DM, reply to the bot or @mention (naming the character is the core's business)."""
        if message.chat.type == ChatType.PRIVATE:
            return True
        bot = self.app.bot
        reply = message.reply_to_message
        if reply is not None and reply.from_user is not None and reply.from_user.id == bot.id:
            return True
        handle = f"@{bot.username}".lower()
        entities = message.parse_entities([MessageEntityType.MENTION]) if message.text else {}
        return any(value.lower() == handle for value in entities.values()) or (
            handle in text.lower()
        )

    async def _on_text(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        text = (message.text or message.caption or "").strip()
        if not text:
            return
        handle = re.compile(rf"@{re.escape(self.app.bot.username or '')}\b", re.IGNORECASE)
        clean = handle.sub("", text).strip() or text
        msg = self._incoming(message, clean, self._mentions_bot(message, text))
        reply_to = None if msg.is_dm else message.message_id
        replies = self.core.respond(msg, on_stored=lambda: self._settle(update.update_id))
        await self._stream(message.chat_id, replies, reply_to)

    async def _on_edit(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        """A user edited a message: the stored text follows (see :mod:`chat.edits`)."""
        message = update.edited_message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        text = (message.text or message.caption or "").strip()
        handle = re.compile(rf"@{re.escape(self.app.bot.username or '')}\b", re.IGNORECASE)
        clean = handle.sub("", text).strip() or text
        is_dm = message.chat.type == ChatType.PRIVATE
        replies = self.core.message_edited(
            PLATFORM, conversation_key(message.chat_id), str(message.message_id), clean, is_dm
        )
        await self._stream(message.chat_id, replies, None)

    async def _on_other(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or message.chat.type != ChatType.PRIVATE:
            return  # in groups, media is none of the bot's business
        await self._say(message, "I can only read text for now — please send it as a message.")

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("telegram: error while handling an update", exc_info=context.error)

    async def _on_unknown_command(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        """One line pointing at /help, for commands this bot does not have.

        In groups, a command addressed to another bot (``/cmd@other_bot``) is that bot's.
        """
        message = update.effective_message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        found = _COMMAND.match(message.text or "")
        target = found.group(2) if found else None
        if target and target.lower() != (self.app.bot.username or "").lower():
            return
        if not await self._admitted(message):
            return
        name = f"/{found.group(1)}" if found else "That"
        await self._say(message, f"{shorten(name, 40)} is not one of my commands; send /help.")

    # -- commands -----------------------------------------------------------------------------

    async def _is_admin(self, message: Message) -> bool:
        """Whether the sender administers this chat (anyone does, in their own DM).

        A message sent as the group itself comes from an anonymous administrator.
        """
        if message.chat.type == ChatType.PRIVATE:
            return True
        if message.sender_chat is not None and message.sender_chat.id == message.chat_id:
            return True
        assert message.from_user is not None
        user_id = message.from_user.id
        member = await self._retrying(
            lambda: self.app.bot.get_chat_member(message.chat_id, user_id)
        )
        return member.status in ADMIN_STATUSES

    @staticmethod
    def _message(update: Update) -> Message | None:
        message = update.effective_message
        return message if message is not None and message.from_user is not None else None

    async def _cmd_start(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        is_dm = message.chat.type == ChatType.PRIVATE
        greeting = await self.core.greeting(PLATFORM, conversation_key(message.chat_id), is_dm)
        await self.send(greeting)

    async def _cmd_help(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        is_dm = message.chat.type == ChatType.PRIVATE
        text = await self.core.help_text(PLATFORM, conversation_key(message.chat_id), is_dm)
        extra = "\n".join(f"/{n} — {d}" for n, d in COMMANDS)
        where = (
            ""
            if is_dm
            else "\nIn this group I answer when mentioned, replied to, or (in roleplay) named."
        )
        await self._say(message, f"{text.split('Commands:')[0].strip()}{where}\n\n{extra}")

    async def _refuse_unless_admin(self, message: Message, what: str) -> bool:
        try:
            if await self._is_admin(message):
                return False
        except TelegramError as exc:
            log.warning("telegram: getChatMember failed in %s: %s", message.chat_id, exc)
            await self._say(
                message,
                f"I could not check whether you may {what}: Telegram did not tell me your role. "
                "Please try again in a moment.",
            )
            return True
        await self._say(message, f"Only chat administrators can {what} in this group.")
        return True

    async def _cmd_reset(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        if await self._refuse_unless_admin(message, "reset the conversation"):
            return
        await self.core.reset(PLATFORM, conversation_key(message.chat_id))
        await self._say(message, "Started a fresh conversation. Earlier messages stay stored.")
        await self._open_scene(message)

    async def _cmd_mode(self, update: Update, ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        key = conversation_key(message.chat_id)
        asked = " ".join(ctx.args or []).strip()
        mode = parse_mode(asked)
        if mode is None:
            now = await self.core.who_am_i(PLATFORM, key, message.chat.type == ChatType.PRIVATE)
            wrong = "That is not a mode. " if asked else ""
            await self._say(message, f"{wrong}{now} Usage: /mode roleplay or /mode work")
            return
        if await self._refuse_unless_admin(message, "change the mode"):
            return
        await self.core.set_mode(PLATFORM, key, mode)
        await self._say(message, f"Mode set to {mode}: the {ROLE_FOR_MODE[mode]} model answers.")
        await self._open_scene(message)

    async def _cmd_character(self, update: Update, ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        key = conversation_key(message.chat_id)
        name = " ".join(ctx.args or []).strip()
        if name.lower() == "import":
            await self._on_card_upload(update, ctx)
            return
        names = ", ".join(self.core.characters.names())
        if not name:
            current = await self.core.character_of(PLATFORM, key)
            await self._say(message, f"Character here: {current.name}. Available: {names}.")
            return
        if await self._refuse_unless_admin(message, "change the character"):
            return
        if name.lower().startswith("world"):
            await self._world_book(message, key, name[5:].strip())
            return
        cast = await self.core.set_cast(PLATFORM, key, [n.strip() for n in name.split(",")])
        if cast is None:
            await self._say(
                message, f"I don't know a character called {shorten(name)}. Try: {names}."
            )
            return
        who = " and ".join(c.name for c in cast)
        verb = "takes" if len(cast) == 1 else "take"
        await self._say(message, f"{who} {verb} the stage. (Used in roleplay mode.)")
        await self._open_scene(message)

    async def _world_book(self, message: Message, key: str, name: str) -> None:
        """``/character world NAME`` attaches a world book, ``/character world off`` detaches."""
        book = None if name.lower() in ("", "off") else name
        if not await self.core.attach_world_book(PLATFORM, key, book):
            known = ", ".join(sorted(self.core.world_books)) or "none imported yet"
            await self._say(message, f"No world book called {shorten(name)} (available: {known}).")
            return
        await self._say(message, f"World book {book} attached." if book else "World book detached.")

    async def _on_card_upload(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        """``/character import [replace]`` with a card file attached (or in reply to one).

        Cards are shared by every chat: only bot owners may import them, in any chat.
        """
        if (message := self._message(update)) is None:
            return
        assert message.from_user is not None
        if not self.core.is_owner(PLATFORM, str(message.from_user.id)):
            await self._say(message, OWNERS_ONLY)
            return
        command = (message.caption or message.text or "").split()
        replace = len(command) > 2 and command[2].lower() == "replace"
        source = message if message.document else message.reply_to_message
        document = source.document if source is not None else None
        if document is None:
            await self._say(
                message,
                "Attach the card file (PNG, JSON or CHARX) with the caption /character import, "
                "or reply to the file with /character import.",
            )
            return
        if (document.file_size or 0) > MAX_CARD_BYTES:
            await self._say(
                message,
                f"That file is too large to be a character card (at most "
                f"{MAX_CARD_BYTES // (1024 * 1024)} MB).",
            )
            return
        data = await (await document.get_file()).download_as_bytearray()
        try:
            card = parse_card_bytes(bytes(data), document.file_name or "card")
            imported = await self.core.import_card(card, replace=replace)
        except CardError as exc:
            await self._say(message, f"I could not import that card: {exc}.")
            return
        name = shorten(imported.character.name)
        done = f"Replaced the earlier {name}" if imported.replaced else f"Imported {name}"
        await self._say(message, f"{done}. Use /character {name} to play them.")

    async def _open_scene(self, message: Message) -> None:
        """Post the character's greeting when a roleplay scene (re)starts."""
        is_dm = message.chat.type == ChatType.PRIVATE
        key = conversation_key(message.chat_id)
        greeting = await self.core.open_scene(PLATFORM, key, is_dm)
        if greeting is not None:
            await self.send(greeting)

    async def _cmd_swipe(self, update: Update, ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        back = " ".join(ctx.args or []).strip().lower() in ("back", "prev", "previous")
        reply = await self.core.swipe(
            PLATFORM, conversation_key(message.chat_id), -1 if back else 1
        )
        await self.send(reply)

    async def _cmd_memory(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        key = conversation_key(message.chat_id)
        report = await self.core.memory_report(PLATFORM, key)
        await self.send(OutgoingReply(key, report, final=True, kind=ReplyKind.NOTICE))

    async def _cmd_remember(self, update: Update, ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        fact = " ".join(ctx.args or [])
        if fact and await self._refuse_unless_admin(message, "pin facts"):
            return
        key = conversation_key(message.chat_id)
        await self._say(message, await self.core.remember(PLATFORM, key, fact))

    async def _cmd_forget(self, update: Update, ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        if await self._refuse_unless_admin(message, "unpin facts"):
            return
        key = conversation_key(message.chat_id)
        number = " ".join(ctx.args or [])
        await self._say(message, await self.core.forget_fact(PLATFORM, key, number))

    async def _cmd_note(self, update: Update, ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        if await self._refuse_unless_admin(message, "set the author's note"):
            return
        key = conversation_key(message.chat_id)
        await self._say(message, await self.core.set_note(PLATFORM, key, " ".join(ctx.args or [])))

    async def _cmd_persona(self, update: Update, ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        assert message.from_user is not None
        key = conversation_key(message.chat_id)
        text = " ".join(ctx.args or [])
        answer = await self.core.set_persona(PLATFORM, key, str(message.from_user.id), text)
        await self._say(message, answer)

    async def _cmd_summarize(self, update: Update, ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        assert message.from_user is not None
        key = conversation_key(message.chat_id)
        is_dm = message.chat.type == ChatType.PRIVATE
        replies = self.core.summarize(
            PLATFORM, key, is_dm, str(message.from_user.id), " ".join(ctx.args or [])
        )
        await self._stream(message.chat_id, replies, None)

    async def _cmd_continue(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        """The last reply grows in place: its messages are edited, more are added if needed."""
        if (message := self._message(update)) is None:
            return
        is_dm = message.chat.type == ChatType.PRIVATE
        key = conversation_key(message.chat_id)
        assert message.from_user is not None
        pieces = await self.core.last_reply_pieces(PLATFORM, key)
        replies = self.core.continue_reply(PLATFORM, key, is_dm, str(message.from_user.id))
        first = await anext(replies, None)
        if first is None:
            return
        resume = tuple(pieces) if first.kind is ReplyKind.ANSWER else ()
        await self._stream(message.chat_id, chain(first, replies), None, resume=resume)

    async def _cmd_regenerate(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        if (message := self._message(update)) is None:
            return
        is_dm = message.chat.type == ChatType.PRIVATE
        key = conversation_key(message.chat_id)
        assert message.from_user is not None
        replies = self.core.regenerate(PLATFORM, key, is_dm, str(message.from_user.id))
        await self._stream(message.chat_id, replies, None)
