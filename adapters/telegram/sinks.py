"""Where a Telegram reply is written: the messages of one chat, plain text while streaming and
HTML (with a plain-text fallback) when final."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from telegram import Bot, MessageEntity, ReplyParameters, User
from telegram.constants import ParseMode
from telegram.error import BadRequest

from adapters.text import to_telegram_html
from chat.limits import fit
from chat.messages import OutgoingReply, ReplyKind

log = logging.getLogger(__name__)

Retrying = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]

MAX_MESSAGE_CHARS = 4096


class ChatSink:
    """Writes one reply's messages into a chat: plain while streaming, HTML when final."""

    def __init__(self, bot: Bot, retrying: Retrying, chat_id: int, reply_to: int | None) -> None:
        self.bot = bot
        self.retrying = retrying  # waits out flood control (adapters.telegram.api)
        self.chat_id = chat_id
        self.reply_to = reply_to

    def _formatted(self, reply: OutgoingReply, final: bool) -> bool:
        return final and reply.kind is ReplyKind.ANSWER

    @staticmethod
    def _html(text: str) -> str | None:
        """The chunk as HTML, or None when markup and escapes would push it over the limit."""
        html = to_telegram_html(text)
        return html if len(html) <= MAX_MESSAGE_CHARS else None

    async def send_chunk(self, text: str, reply: OutgoingReply, final: bool) -> str:
        if final and reply.swipe:
            text = f"{text}\n\n({reply.swipe[0]}/{reply.swipe[1]} · /swipe for another)"
        text = fit(text, MAX_MESSAGE_CHARS)
        params = (
            ReplyParameters(self.reply_to, allow_sending_without_reply=True)
            if self.reply_to is not None
            else None
        )
        self.reply_to = None  # continuation messages follow the first one

        html = self._html(text) if self._formatted(reply, final) else None
        entities: list[MessageEntity] | None = None
        if reply.mention is not None and reply.mention.user_id.lstrip("-").isdigit():
            # A reminder pings its owner by id (a text mention): no @username needed, and
            # nothing in the text can ping anyone else.
            name = reply.mention.name or "you"
            text = fit(f"{name} {text}", MAX_MESSAGE_CHARS)
            user = User(int(reply.mention.user_id), name, is_bot=False)
            length = len(name.encode("utf-16-le")) // 2
            entities = [MessageEntity(MessageEntity.TEXT_MENTION, 0, length, user=user)]
            html = None

        async def call(formatted: bool) -> Any:
            return await self.bot.send_message(
                self.chat_id,
                html if formatted and html else text,
                parse_mode=ParseMode.HTML if formatted else None,
                reply_parameters=params,
                entities=entities,
            )

        sent = await self._with_fallback(call, html is not None)
        return str(sent.message_id)

    async def edit_chunk(
        self, message_id: str, text: str, reply: OutgoingReply, final: bool
    ) -> None:
        text = fit(text, MAX_MESSAGE_CHARS)
        html = self._html(text) if self._formatted(reply, final) else None

        async def call(formatted: bool) -> Any:
            return await self.bot.edit_message_text(
                html if formatted and html else text,
                chat_id=self.chat_id,
                message_id=int(message_id),
                parse_mode=ParseMode.HTML if formatted else None,
            )

        try:
            await self._with_fallback(call, html is not None)
        except BadRequest as exc:
            if "not modified" not in str(exc).lower():
                raise

    async def delete_chunk(self, message_id: str) -> None:
        await self.retrying(
            lambda: self.bot.delete_message(chat_id=self.chat_id, message_id=int(message_id))
        )

    async def _with_fallback(self, call: Callable[[bool], Awaitable[Any]], html: bool) -> Any:
        if html:
            try:
                return await self.retrying(lambda: call(True))
            except BadRequest as exc:
                if "parse entities" not in str(exc).lower():
                    raise
                log.info("telegram: formatting rejected (%s), sending plain text", exc)
        return await self.retrying(lambda: call(False))
