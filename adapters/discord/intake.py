"""Discord events become the engine's inputs: messages, edits, deletions (one or a purge), and
after every new session the messages that arrived while the bot was away."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import discord

from adapters.discord.api import Client, DiscordOptions, Webhooks
from adapters.discord.sinks import NO_MENTIONS, ChannelSink, InteractionSink, quote_reference
from adapters.streaming import (
    DeliveredOnly,
    DeliveryTracker,
    MessageSink,
    StreamLimits,
    chain,
    single,
    stream_reply,
)
from chat.commands import HANDLER_FAILED, SLASH_POINTER
from chat.core import ConversationCore
from chat.messages import Attachment, IncomingMessage, OutgoingReply
from chat.recovery import Resumable
from chat.recovery import finish as finish_recovery

log = logging.getLogger(__name__)

PLATFORM = "discord"
TEXT_COMMAND = re.compile(r"^/[A-Za-z]")


def role_ids(user: object) -> tuple[str, ...]:
    """A guild member's role ids (a user outside a guild has none)."""
    return tuple(str(role.id) for role in getattr(user, "roles", ()) or ())


def conversation_key(channel_id: int) -> str:
    return f"{PLATFORM}:{channel_id}"


class Intake:
    """Messages, edits and deletions to the engine; replies streamed back into channels."""

    def __init__(
        self,
        core: ConversationCore,
        client: Client,
        webhooks: Webhooks,
        options: DiscordOptions,
        limits: StreamLimits,
    ) -> None:
        self.core = core
        self.client = client
        self.webhooks = webhooks
        self.options = options
        self.limits = limits
        self._recovery_started = False
        self.recovered = asyncio.Event()  # set once recovery and the first catch-up are done

    # -- messages -----------------------------------------------------------------------------

    def addresses_bot(self, message: discord.Message) -> bool:
        if message.guild is None:
            return True
        me = self.client.user
        if me is not None and any(user.id == me.id for user in message.mentions):
            return True
        ref = message.reference
        resolved = ref.resolved if ref is not None else None
        if isinstance(resolved, discord.Message):
            if me is not None and resolved.author.id == me.id:
                return True
            if self.webhooks.ours(resolved.webhook_id):
                return True  # a reply to one of our character posts
        return False

    def mentioned(self, message: discord.Message) -> tuple[tuple[str, str], ...]:
        """The people ``message`` mentions (not bots, not us), as the tools see them."""
        return tuple(
            (str(user.id), user.display_name) for user in message.mentions if not user.bot
        )[:20]

    def _admin_check(self, message: discord.Message) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            author, channel = message.author, message.channel
            if message.guild is None or not isinstance(author, discord.Member):
                return message.guild is None
            return self.options.administers(author, channel.permissions_for(author))

        return check

    def clean_text(self, text: str) -> str:
        me = self.client.user
        if me is None:
            return text.strip()
        return re.sub(rf"<@!?{me.id}>", "", text).strip() or text.strip()

    def _ignored(self, message: discord.Message) -> bool:
        """Bots, webhooks (our own character posts among them) and ourselves."""
        if message.author.bot or message.webhook_id is not None:
            return True
        return self.client.user is not None and message.author.id == self.client.user.id

    async def on_message(self, message: discord.Message) -> None:
        if self._ignored(message):
            return
        key = conversation_key(message.channel.id)
        arrival = self.core.queues.arrive(key)  # at once: the conversation's order
        try:
            text = self.clean_text(message.content)
            if message.attachments:
                await self._files(message, key)
            if not text:
                return
            addressed = self.addresses_bot(message)
            if addressed and TEXT_COMMAND.match(text):
                # Typed as text, a command reaches no one: point at the real slash commands.
                allowed, told = self.core.queues.admit(PLATFORM, str(message.author.id))
                if allowed or told:
                    await message.channel.send(
                        told or SLASH_POINTER,
                        reference=message,
                        mention_author=False,
                        allowed_mentions=NO_MENTIONS,
                    )
                return
            msg = IncomingMessage(
                platform=PLATFORM,
                conversation_key=key,
                author_id=str(message.author.id),
                author_name=message.author.display_name,
                text=text,
                mentions_bot=addressed,
                is_dm=message.guild is None,
                platform_message_id=str(message.id),
                roles=role_ids(message.author),
                guild_id=str(message.guild.id) if message.guild is not None else None,
                mentions=self.mentioned(message),
                is_admin=self._admin_check(message),
            )
            sink = ChannelSink(self.webhooks, message.channel, reference=message)
            await self.stream(
                message.channel, self.core.answers.respond(msg, arrival=arrival), sink
            )
        finally:
            arrival.settle()

    async def _files(self, message: discord.Message, key: str) -> None:
        """Files posted in a work channel or DM become its documents (before the message's
        text is answered, so a question that comes with its file is answered from it)."""
        files = [Attachment(a.filename, a.size, a.read) for a in message.attachments]
        msg = IncomingMessage(
            platform=PLATFORM,
            conversation_key=key,
            author_id=str(message.author.id),
            author_name=message.author.display_name,
            text="",
            is_dm=message.guild is None,
            platform_message_id=str(message.id),
            roles=role_ids(message.author),
            guild_id=str(message.guild.id) if message.guild is not None else None,
        )
        lines = await self.core.postings.receive(msg, files)
        if lines:
            await message.channel.send(
                "\n".join(lines)[:2000],
                reference=message,
                mention_author=False,
                allowed_mentions=NO_MENTIONS,
            )

    async def on_failure(self, message: discord.Message) -> None:
        await message.channel.send(HANDLER_FAILED, allowed_mentions=NO_MENTIONS)

    async def on_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """A message was edited: the stored text follows (see :mod:`chat.edits`)."""
        message = payload.message
        if message.author.bot or message.webhook_id is not None:
            return  # our own streamed edits, other bots, character posts
        if "content" not in payload.data:
            return  # an embed or a pin changed, not the text
        key = conversation_key(payload.channel_id)
        arrival = self.core.queues.arrive(key)
        replies = self.core.edits.edited(
            PLATFORM,
            key,
            str(payload.message_id),
            self.clean_text(message.content),
            message.guild is None,
            arrival,
        )
        sink = ChannelSink(self.webhooks, message.channel, reference=message)
        try:
            await self.stream(message.channel, replies, sink)
        finally:
            arrival.settle()

    async def on_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """A message was deleted (by its author, a moderator, or us): it leaves the context,
        unless we deleted it ourselves (a reply's spare chunk, shortened by a rewrite)."""
        if self.webhooks.deleted_by_us(str(payload.message_id)):
            return
        key = conversation_key(payload.channel_id)
        await self.core.edits.deleted(PLATFORM, key, [str(payload.message_id)])

    async def on_bulk_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        """A moderator's purge: every purged message leaves the context."""
        ids = [str(i) for i in payload.message_ids if not self.webhooks.deleted_by_us(str(i))]
        if ids:
            key = conversation_key(payload.channel_id)
            await self.core.edits.deleted(PLATFORM, key, sorted(ids))

    async def stream(
        self,
        channel: Any,
        replies: AsyncIterator[OutgoingReply],
        sink: MessageSink,
        resume: tuple[str, ...] = (),
    ) -> list[str]:
        """Stream ``replies``; nothing is sent when the engine stays silent."""
        first = await anext(replies, None)
        if first is None:
            return []
        tracker: DeliveryTracker = self.core.delivery
        if isinstance(sink, InteractionSink):
            # An interaction's messages expire with its token: a restart could not edit them.
            tracker = DeliveredOnly(self.core.delivery)
        typing = asyncio.create_task(self._typing(channel))
        try:
            return await stream_reply(
                chain(first, replies), sink, self.limits, tracker=tracker, resume=resume
            )
        finally:
            typing.cancel()

    async def _typing(self, channel: Any) -> None:
        try:
            async with channel.typing():
                await asyncio.Event().wait()  # until cancelled
        except discord.HTTPException as exc:  # cosmetic: never break a reply
            log.debug("discord: typing failed: %s", exc)

    # -- after a new session ------------------------------------------------------------------

    async def after_connect(self, connected_at: datetime) -> None:
        """After the first READY, finish what a stop left undone; after every READY, fetch
        the messages that arrived while the bot was away (before ``connected_at``)."""
        started = asyncio.get_running_loop().time()
        jobs: list[asyncio.Task[Any]] = []
        recovery = self.core.recovery
        try:
            if not self._recovery_started:
                self._recovery_started = True
                plan = await recovery.plan(PLATFORM)
                jobs += [asyncio.create_task(self._resume(job)) for job in plan.resume]
                jobs += [asyncio.create_task(self._notify(notice)) for notice in plan.notices]
            jobs += await self._catch_up(connected_at)
            await finish_recovery(PLATFORM, jobs, started)
        except Exception:
            log.exception("discord: recovery after connecting failed")
        finally:
            self.recovered.set()

    async def channel(self, key: str) -> Any:
        channel_id = int(key.split(":", 1)[1])
        return self.client.get_channel(channel_id) or await self.client.fetch_channel(channel_id)

    async def owned_channel(self, key: str) -> Any | None:
        """The channel of conversation ``key`` if this process's shards serve it, else None:
        another process owns it (the sharding rule), and finishes its answers."""
        channel = await self.channel(key)
        guild = getattr(channel, "guild", None)
        return channel if self.options.owns_shard(guild.id if guild is not None else None) else None

    async def _notify(self, notice: OutgoingReply) -> None:
        channel = await self.owned_channel(notice.conversation_key)
        if channel is not None:
            sink = ChannelSink(self.webhooks, channel, quote_reference(channel, notice.reply_to))
            await stream_reply(single(notice), sink, self.limits)

    async def _resume(self, job: Resumable) -> None:
        try:
            channel = await self.owned_channel(job.conversation_key)
        except discord.HTTPException as exc:
            log.warning(
                "discord: cannot reach %s to finish an answer: %s", job.conversation_key, exc
            )
            channel = None
        if channel is None:
            job.ticket.release()
            return
        sink = ChannelSink(
            self.webhooks, channel, reference=quote_reference(channel, job.platform_message_id)
        )
        is_dm = isinstance(channel, discord.DMChannel)
        await self.stream(channel, self.core.recovery.resume(job, is_dm), sink, resume=job.pieces)

    async def _catch_up(self, connected_at: datetime) -> list[asyncio.Task[Any]]:
        """Handle, as if they had just arrived, the messages posted in known channels since
        the newest one stored before this connection (within the recover window, at most
        ``catch_up_limit`` each)."""
        since = self.core.recovery.window_start()
        limit = self.core.settings.catch_up_limit
        tasks: list[asyncio.Task[Any]] = []
        if limit <= 0:
            return tasks
        for key, last_seen in await self.core.recovery.catch_up_points(PLATFORM, connected_at):
            if not last_seen.isdigit():
                continue
            try:
                channel = await self.owned_channel(key)
                if channel is None:
                    continue
                missed = [
                    m
                    async for m in channel.history(
                        limit=limit, after=discord.Object(int(last_seen)), oldest_first=True
                    )
                    if m.created_at >= since
                ]
            except discord.HTTPException as exc:
                log.info("discord: cannot look through %s for missed messages: %s", key, exc)
                continue
            if missed:
                log.info("discord: %d message(s) arrived in %s while away", len(missed), key)
            # Created in order: each reaches its conversation's intake in arrival order.
            tasks += [asyncio.create_task(self.client.on_message(m)) for m in missed]
        return tasks
