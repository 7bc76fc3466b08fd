"""Telegram adapter: the wiring of python-telegram-bot's handlers, the adapter's own polling,
the intake and the commands.  Replies stream by editing, throttled for Telegram's flood
limits; the final edit is HTML with a plain-text fallback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from telegram import Update
from telegram.error import TelegramError
from telegram.ext import ContextTypes, MessageHandler, filters

from adapters.base import SentMessage
from adapters.streaming import FINISH_DELIVERY_S, StreamLimits, finish_then_cancel
from adapters.telegram.api import Poller, application, retrying
from adapters.telegram.commands import TelegramCommands, menu
from adapters.telegram.intake import Intake, chat_id_of, conversation_key
from adapters.telegram.sinks import MAX_MESSAGE_CHARS
from adapters.telegram.webhook import Webhook
from adapters.text import split_message
from chat.commands import HANDLER_FAILED
from chat.core import ConversationCore
from chat.messages import OutgoingReply
from chat.settings import PlatformSettings, host_port

__all__ = ["TelegramAdapter", "conversation_key"]

log = logging.getLogger(__name__)

PLATFORM = "telegram"
# About one message per second per chat is allowed; edits count too, so stay well below it.
EDIT_INTERVAL_S = 1.5
MIN_NEW_CHARS = 40
SUFFIX_ROOM = 64  # characters kept free in each chunk for the swipe counter

Handler = Callable[[Update, ContextTypes.DEFAULT_TYPE], Coroutine[Any, Any, None]]


class TelegramAdapter:
    """Connects the engine to Telegram (or any Bot-API-compatible server)."""

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
        self.app = application(settings.token, settings.api_base_url)
        self.intake = Intake(core, self.app.bot, self.limits)
        self.commands = TelegramCommands(core, self.app.bot, self.intake)
        self.poller = Poller(self.app.bot, poll_timeout, self._handle, self._refused)
        self.webhook: Webhook | None = None
        if settings.webhook_url and settings.webhook_secret:
            host, port, _ = host_port(settings.listen, "[platforms.telegram] listen")
            self.webhook = Webhook(
                self.app.bot,
                settings.webhook_url,
                (host, port),
                settings.webhook_secret,
                self._handle,
            )
        self.recovered = self.intake.recovered
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.reminding = core.reminders.loop(PLATFORM, self.send)
        self._add_handlers()

    def _add_handlers(self) -> None:
        app = self.app
        only_new = filters.UpdateType.MESSAGE
        guard = self._guarded
        file_command = filters.CaptionRegex(r"^/(character(@\w+)?\s+import|docs(@\w+)?\s+add)\b")
        run_command = guard(lambda update, _ctx: self.commands.run(update))
        app.add_handler(MessageHandler(only_new & filters.COMMAND, run_command))
        app.add_handler(MessageHandler(only_new & filters.Document.ALL & file_command, run_command))
        document = guard(self._on_document, stores=True)
        app.add_handler(MessageHandler(only_new & filters.Document.ALL, document))
        edited = filters.UpdateType.EDITED_MESSAGE & (filters.TEXT | filters.CAPTION)
        app.add_handler(MessageHandler(edited, guard(self.intake.on_edit)))
        text = guard(self._on_text, stores=True)
        app.add_handler(MessageHandler(only_new & filters.TEXT & ~filters.COMMAND, text))
        app.add_handler(MessageHandler(only_new & filters.CAPTION, text))
        unsupported = filters.Sticker.ALL | filters.PHOTO | filters.VOICE | filters.VIDEO
        app.add_handler(
            MessageHandler(only_new & (unsupported | filters.Document.ALL), guard(self._on_other))
        )
        app.add_error_handler(self._on_error)

    def _guarded(self, handler: Handler, *, stores: bool = False) -> Handler:
        """``handler`` that never raises: a failure is logged and the user gets an apology.

        The update of a handler that ``stores`` its message is confirmed once it is stored;
        any other, as soon as it is handled.
        """

        async def run(update: Update, ctx: ContextTypes.DEFAULT_TYPE) -> None:
            message = update.effective_message
            if not stores:
                self._settle(update.update_id)
            try:
                await handler(update, ctx)
            except Exception:
                log.exception("telegram: handling an update failed")
                if message is not None:
                    with contextlib.suppress(TelegramError):
                        await message.reply_text(HANDLER_FAILED)
            finally:
                self.intake.done(update)

        return run

    async def _on_text(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        await self.intake.on_text(update, lambda: self._settle(update.update_id))

    async def _on_document(self, update: Update, ctx: ContextTypes.DEFAULT_TYPE) -> None:
        """A file: in a work chat it becomes a document first; a caption is then a message."""
        read = await self.intake.on_document(update)
        message = update.effective_message
        if message is not None and (message.caption or "").strip():
            await self._on_text(update, ctx)
        elif not read:
            await self._on_other(update, ctx)

    async def _on_other(self, update: Update, _ctx: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is not None and message.from_user is not None:
            allowed, told = self.core.queues.admit(PLATFORM, str(message.from_user.id))
            if told:
                await self.intake.say(message, told)
            if not allowed:
                return
        await self.intake.on_other(update, _ctx)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("telegram: error while handling an update", exc_info=context.error)

    # -- lifecycle --------------------------------------------------------------------------

    def _handle(self, update: Update) -> None:
        """The poller hands an update over: it takes its place in its conversation's order
        now, then is handled in a task of its own."""
        self.intake.arrive(update)
        self._spawn(self._process(update))

    async def _process(self, update: Update) -> None:
        try:
            await self.app.process_update(update)
        finally:
            self._settle(update.update_id)
            self.intake.done(update)

    def _settle(self, update_id: int) -> None:
        """The update is stored or handled: confirm it to Telegram (next offset, or the
        webhook's answer)."""
        (self.webhook or self.poller).settle(update_id)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refused(self) -> None:
        self._stopped.set()

    async def start(self) -> None:
        """Connect, register the command menu, finish what a stop left undone, poll until
        :meth:`stop`."""
        await self.app.initialize()
        try:
            await retrying(lambda: self.app.bot.set_my_commands(menu(self.core.commands)))
            await self.app.start()
            for task in await self.intake.recover():
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self.reminding.start()
            if self.webhook is not None:
                await self.webhook.start()
            else:
                # Polling after a webhook: Telegram refuses getUpdates while one is set.
                await retrying(lambda: self.app.bot.delete_webhook(drop_pending_updates=False))
                self.poller.start()
                log.info("telegram: polling as @%s", self.app.bot.username)
            await self._stopped.wait()
        finally:
            await self.stop_intake()
            await self.reminding.stop()  # a reminder being sent is recorded first
            # Handlers still running deliver what is written, briefly; then they stop here.
            await finish_then_cancel(self._tasks, FINISH_DELIVERY_S)
            if self.app.running:
                await self.app.stop()
            await self.app.shutdown()

    async def stop(self) -> None:
        self._stopped.set()

    @property
    def connected(self) -> bool:
        return self.webhook.running if self.webhook is not None else self.poller.running

    async def stop_intake(self) -> None:
        """Stop polling, or answering the webhook: updates not taken yet stay on Telegram's
        side for the next start."""
        if self.webhook is not None:
            await self.webhook.stop()
        else:
            await self.poller.stop()

    # -- sending (adapters.base.Adapter) --------------------------------------------------------

    async def send(self, reply: OutgoingReply) -> SentMessage:
        """Send a whole reply (split at Telegram's limit); returns its first message."""
        ids = await self.intake.send(reply)
        return SentMessage(reply.conversation_key, ids[0] if ids else "", reply.text)

    async def edit(self, sent: SentMessage, reply: OutgoingReply) -> SentMessage:
        """Replace a sent message's text (its first chunk, if the text is too long)."""
        chunk = (split_message(reply.text, MAX_MESSAGE_CHARS) or [reply.text])[0]
        sink = self.intake.sink(chat_id_of(reply.conversation_key), None)
        await sink.edit_chunk(sent.message_id, chunk, reply, reply.final)
        return SentMessage(sent.conversation_key, sent.message_id, chunk)
