"""Where a Discord reply is written: a channel (as the bot, or as a character through the
channel's webhook) or a slash command's interaction response."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import discord

from adapters.discord.api import Webhooks
from chat.limits import fit, shorten
from chat.messages import OutgoingReply, ReplyKind

MAX_MESSAGE_CHARS = 2000
MAX_WEBHOOK_NAME = 80
UNKNOWN_WEBHOOK = 10015
NO_MENTIONS = discord.AllowedMentions.none()


def webhook_username(name: str) -> str:
    """Discord refuses webhook names over 80 characters or containing "discord"/"clyde"."""
    cleaned = re.sub(r"(?i)discord|clyde", lambda m: m.group()[0] + "\u200b" + m.group()[1:], name)
    return cleaned[:MAX_WEBHOOK_NAME] or "Character"


def quote_reference(channel: Any, message_id: str | None) -> discord.MessageReference | None:
    """A reply reference to a user's message that may be gone by now."""
    if not message_id or not message_id.isdigit():
        return None
    return discord.MessageReference(
        message_id=int(message_id), channel_id=channel.id, fail_if_not_exists=False
    )


class ChannelSink:
    """Posts one reply into a channel: as the character through the webhook when allowed,
    else as the bot (prefixed with the character's name in roleplay)."""

    def __init__(
        self,
        webhooks: Webhooks,
        channel: Any,
        reference: discord.Message | discord.MessageReference | None = None,
    ) -> None:
        self.webhooks = webhooks
        self.channel = channel
        self.reference = reference
        self._via_webhook: dict[str, bool] = {}

    def _thread(self) -> Any:
        return self.channel if isinstance(self.channel, discord.Thread) else discord.utils.MISSING

    def _use_webhook(self, reply: OutgoingReply) -> bool:
        return bool(reply.speaker) and self.webhooks.usable(self.channel)

    def _text(self, text: str, reply: OutgoingReply, final: bool) -> str:
        if reply.kind is not ReplyKind.ANSWER or not reply.speaker or self._use_webhook(reply):
            body = text
        else:
            body = f"**{shorten(reply.speaker, 64)}:** {text}"
        if final and reply.swipe:
            body += f"\n-# {reply.swipe[0]}/{reply.swipe[1]} · /regenerate for another"
        return fit(body, MAX_MESSAGE_CHARS)

    async def _with_webhook(self, call: Callable[[discord.Webhook], Awaitable[Any]]) -> Any:
        hook = await self.webhooks.of(self.channel)
        try:
            return await call(hook)
        except discord.NotFound as exc:
            if exc.code != UNKNOWN_WEBHOOK:
                raise
            # Someone deleted our webhook: fetch or create it again and retry once.
            hook = await self.webhooks.of(self.channel, refresh=True)
            return await call(hook)

    async def send_chunk(self, text: str, reply: OutgoingReply, final: bool) -> str:
        body = self._text(text, reply, final)
        if self._use_webhook(reply):
            speaker = reply.speaker or ""
            avatar = self.webhooks.avatars.get(speaker)
            sent = await self._with_webhook(
                lambda hook: hook.send(
                    body,
                    username=webhook_username(speaker),
                    avatar_url=avatar or discord.utils.MISSING,
                    wait=True,
                    thread=self._thread(),
                    allowed_mentions=NO_MENTIONS,
                )
            )
            self._via_webhook[str(sent.id)] = True
        else:
            reference = self.reference
            self.reference = None  # continuation messages are not replies
            mentions = NO_MENTIONS
            if reply.mention is not None and reply.mention.user_id.isdigit():
                # A reminder pings its owner, and no one else whatever its text says.
                body = fit(f"<@{reply.mention.user_id}> {body}", MAX_MESSAGE_CHARS)
                user = discord.Object(int(reply.mention.user_id))
                mentions = discord.AllowedMentions(
                    everyone=False, users=[user], roles=False, replied_user=False
                )
            sent = await self.channel.send(
                body, reference=reference, mention_author=False, allowed_mentions=mentions
            )
        return str(sent.id)

    async def edit_chunk(
        self, message_id: str, text: str, reply: OutgoingReply, final: bool
    ) -> None:
        body = self._text(text, reply, final)
        if self._via_webhook.get(message_id) or (
            message_id not in self._via_webhook and self._use_webhook(reply)
        ):
            try:
                await self._with_webhook(
                    lambda hook: hook.edit_message(
                        int(message_id),
                        content=body,
                        thread=self._thread(),
                        allowed_mentions=NO_MENTIONS,
                    )
                )
                self._via_webhook[message_id] = True
                return
            except discord.HTTPException:
                if self._via_webhook.get(message_id):
                    raise
        partial = self.channel.get_partial_message(int(message_id))
        await partial.edit(content=body, allowed_mentions=NO_MENTIONS)

    async def delete_chunk(self, message_id: str) -> None:
        self.webhooks.deleting(message_id)
        if self._via_webhook.get(message_id):
            await self._with_webhook(
                lambda hook: hook.delete_message(int(message_id), thread=self._thread())
            )
            return
        try:
            await self.channel.get_partial_message(int(message_id)).delete()
        except discord.Forbidden:  # posted through the webhook by an earlier run
            if not self.webhooks.usable(self.channel):
                raise
            await self._with_webhook(
                lambda hook: hook.delete_message(int(message_id), thread=self._thread())
            )


class InteractionSink:
    """Streams an answer into an interaction's (deferred) response and follow-ups."""

    def __init__(self, interaction: discord.Interaction, private: bool = False) -> None:
        self.interaction = interaction
        self.private = private
        self._original: str | None = None

    async def send_chunk(self, text: str, reply: OutgoingReply, final: bool) -> str:
        if self._original is None:
            message = await self.interaction.edit_original_response(content=text)
            self._original = str(message.id)
            return self._original
        followup = await self.interaction.followup.send(text, wait=True, ephemeral=self.private)
        return str(followup.id)

    async def edit_chunk(
        self, message_id: str, text: str, reply: OutgoingReply, final: bool
    ) -> None:
        if message_id == self._original:
            await self.interaction.edit_original_response(content=text)
        else:
            await self.interaction.followup.edit_message(int(message_id), content=text)

    async def delete_chunk(self, message_id: str) -> None:
        await self.interaction.followup.delete_message(int(message_id))
