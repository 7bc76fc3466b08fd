"""Telegram's transport: the Bot API application, flood-control retries, and the adapter's
own long polling.

The adapter polls ``getUpdates`` itself rather than through PTB's ``Updater``, which confirms a
batch (by asking for the next offset) before its handlers have run: here the next offset is
asked for only once every message of the batch is stored, so a crash loses nothing that
Telegram will not deliver again (a message delivered twice is recognised by its id and skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from telegram import Bot, Message, Update
from telegram.constants import ChatMemberStatus, ChatType
from telegram.error import (
    BadRequest,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.ext import Application

from chat.commands.spec import RightsUnknown

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.telegram.org/bot"
MAX_RETRIES = 5
POLL_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # pauses after failed getUpdates calls
STORE_WAIT_S = 120.0  # a batch whose messages are not stored by then is confirmed anyway

T = TypeVar("T")


def retry_after_seconds(exc: RetryAfter) -> float:
    with warnings.catch_warnings():  # PTB 22 warns that the type will become timedelta
        warnings.simplefilter("ignore")
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def application(token: str, base_url: str | None) -> Application[Any, Any, Any, Any, Any, Any]:
    base = base_url or DEFAULT_BASE_URL
    return (
        Application.builder()
        .token(token)
        .base_url(base)
        .base_file_url(base.replace("/bot", "/file/bot"))
        .concurrent_updates(True)
        # A second connection lets shutdown's last getUpdates pass a pending long poll.
        .get_updates_connection_pool_size(2)
        .build()
    )


async def retrying(call: Callable[[], Awaitable[T]]) -> T:
    """Run a Bot API call, waiting out flood-control answers instead of losing the text."""
    for attempt in range(MAX_RETRIES):
        try:
            return await call()
        except RetryAfter as exc:
            wait = retry_after_seconds(exc)
            log.warning("telegram: flood control, waiting %.1fs (attempt %d)", wait, attempt)
            await asyncio.sleep(wait)
    return await call()


class Poller:
    """``getUpdates`` in a loop; the next offset (which confirms a batch) only once every
    update of the batch is settled: stored, or handled."""

    def __init__(
        self,
        bot: Bot,
        poll_timeout: float,
        handle: Callable[[Update], None],
        refused: Callable[[], None],
    ) -> None:
        self.bot = bot
        self.poll_timeout = poll_timeout
        self._handle = handle  # starts handling an update (synchronously: arrival order)
        self._refused = refused  # the token was refused: the adapter stops
        self._offset: int | None = None
        self._settled: dict[int, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = 0  # getUpdates calls failed in a row

    @property
    def running(self) -> bool:
        """Polling, and the last ``getUpdates`` answered (or none failed yet)."""
        return self._task is not None and not self._task.done() and self._failing == 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    def settle(self, update_id: int) -> None:
        done = self._settled.pop(update_id, None)
        if done is not None and not done.done():
            done.set_result(None)

    async def stop(self) -> None:
        """Stop polling: updates not fetched yet stay on Telegram's side for the next start.
        The updates already settled are confirmed with one last ``getUpdates``."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self._offset is not None:
            try:
                await self.bot.get_updates(offset=self._offset, timeout=0, limit=1)
            except TelegramError as exc:  # they are delivered again, and skipped, next time
                log.info("telegram: could not confirm the last updates: %s", exc)

    async def _poll(self) -> None:
        failures = 0
        while True:
            try:
                updates = await self.bot.get_updates(
                    offset=self._offset, timeout=int(self.poll_timeout)
                )
            except (Forbidden, InvalidToken):
                log.error("telegram: the bot token was refused; stopping")
                self._refused()
                return
            except RetryAfter as exc:
                await asyncio.sleep(retry_after_seconds(exc))
                continue
            except TelegramError as exc:
                pause = POLL_RETRY_S[min(failures, len(POLL_RETRY_S) - 1)]
                failures += 1
                self._failing = failures
                log.warning("telegram: getUpdates failed (%s); retrying in %.0fs", exc, pause)
                await asyncio.sleep(pause)
                continue
            failures = self._failing = 0
            if not updates:
                continue
            loop = asyncio.get_running_loop()
            settled = []
            for update in updates:
                done = self._settled[update.update_id] = loop.create_future()
                settled.append(done)
                self._handle(update)
            waited = loop.time()
            _, late = await asyncio.wait(settled, timeout=STORE_WAIT_S)
            log.debug("telegram: %d update(s) stored in %.2fs", len(updates), loop.time() - waited)
            if late:
                log.warning(
                    "telegram: %d update(s) not stored after %.0fs", len(late), STORE_WAIT_S
                )
            self._offset = updates[-1].update_id + 1


ADMIN_STATUSES = {ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER}


def admin_check(bot: Bot, message: Message) -> Callable[[], Awaitable[bool]]:
    """Whether the sender of ``message`` administers its chat, asked of Telegram only when
    needed; :class:`RightsUnknown` when Telegram cannot say."""

    async def check() -> bool:
        if message.chat.type == ChatType.PRIVATE:
            return True
        if message.sender_chat is not None and message.sender_chat.id == message.chat_id:
            return True  # sent as the group itself: an anonymous administrator
        if message.from_user is None:
            return False
        user_id = message.from_user.id
        for attempt in range(2):
            try:
                member = await retrying(lambda: bot.get_chat_member(message.chat_id, user_id))
                return member.status in ADMIN_STATUSES
            except NetworkError as exc:  # a timeout or a dropped connection: once more
                if attempt or isinstance(exc, BadRequest):  # (BadRequest is one too)
                    raise RightsUnknown(str(exc)) from exc
                log.warning("telegram: getChatMember failed (%s); trying again", exc)
            except TelegramError as exc:
                raise RightsUnknown(str(exc)) from exc
        raise AssertionError("unreachable")

    return check
