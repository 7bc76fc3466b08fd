"""Discord adapter: the wiring of discord.py's client, intake, delivery and slash commands.

Work channels answer mentions and replies; roleplay channels also answer when a character is
named (or every message, if configured); DMs always.  In roleplay channels the reply is posted
through a cached channel webhook under the character's name and avatar when the bot may manage
webhooks, otherwise as a normal message prefixed with the character's name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import discord

from adapters.base import SentMessage
from adapters.discord.api import (
    DEFAULT_API_BASE_URL,
    Client,
    DiscordOptions,
    Events,
    Tree,
    Webhooks,
    connect,
)
from adapters.discord.commands import SlashCommands
from adapters.discord.intake import Intake, conversation_key
from adapters.discord.sinks import MAX_MESSAGE_CHARS, NO_MENTIONS, ChannelSink, quote_reference
from adapters.streaming import (
    FINISH_DELIVERY_S,
    StreamLimits,
    finish_then_cancel,
    single,
    stream_reply,
)
from adapters.text import split_message
from chat.commands import HANDLER_FAILED
from chat.core import ConversationCore
from chat.messages import OutgoingReply
from chat.settings import PlatformSettings

__all__ = ["DiscordAdapter", "DiscordOptions", "conversation_key"]

log = logging.getLogger(__name__)

PLATFORM = "discord"
EDIT_INTERVAL_S = 1.0  # edits share the channel's limit of about 5 per 5 seconds
MIN_NEW_CHARS = 30
# Chunks leave room for the "**Name:** " prefix (names are shortened to 64) and the swipe line.
SUFFIX_ROOM = 120


class DiscordAdapter:
    """Connects the engine to Discord (or any Discord-compatible server)."""

    name = PLATFORM
    MAX_MESSAGE_CHARS = MAX_MESSAGE_CHARS

    def __init__(
        self,
        core: ConversationCore,
        settings: PlatformSettings,
        options: DiscordOptions | None = None,
        *,
        limits: StreamLimits | None = None,
    ) -> None:
        if not settings.token:
            raise ValueError("DISCORD_TOKEN is not set")
        self.core = core
        self.token = settings.token
        self.api_base_url = (settings.api_base_url or DEFAULT_API_BASE_URL).rstrip("/")
        self.options = options or DiscordOptions.from_settings(settings)
        self.limits = limits or StreamLimits(
            MAX_MESSAGE_CHARS - SUFFIX_ROOM, EDIT_INTERVAL_S, MIN_NEW_CHARS
        )
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the developer portal
        self.client = Client(self.options, intents, NO_MENTIONS)
        self.tree = Tree(self.client, HANDLER_FAILED)
        self.webhooks = Webhooks(self.client, self.options.avatars)
        self.intake = Intake(core, self.client, self.webhooks, self.options, self.limits)
        self.commands = SlashCommands(core, self.tree, self.intake, self.webhooks, self.options)
        self.commands.register()
        self.client.events = Events(
            ready=self._ready,
            message=self.intake.on_message,
            edit=self.intake.on_edit,
            delete=self.intake.on_delete,
            bulk_delete=self.intake.on_bulk_delete,
            setup=self._sync_commands,
            failed=self.intake.on_failure,
        )
        self.ready = asyncio.Event()
        self.recovered = self.intake.recovered
        self._tasks: set[asyncio.Task[Any]] = set()
        self.reminding = core.reminders.loop(PLATFORM, self.send)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.client.is_ready() and not self.client.is_closed()

    async def start(self) -> None:
        """Log in, connect the gateway, run until :meth:`stop`."""
        await connect(self.client, self.token, self.api_base_url)

    async def stop(self) -> None:
        await self.reminding.stop()  # a reminder being sent is recorded first
        await finish_then_cancel(self._tasks, FINISH_DELIVERY_S)
        await self.client.close()

    async def stop_intake(self) -> None:
        """Nothing to pause on the gateway: the engine answers new messages with a notice."""

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ready(self) -> None:
        connected_at = datetime.now(UTC)  # what is stored from now on came over this session
        self.ready.set()
        self._spawn(self.intake.after_connect(connected_at))
        self.reminding.start()  # once: later READYs find it running

    async def _sync_commands(self) -> None:
        if self.options.guild_id:
            guild = discord.Object(id=self.options.guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
        else:
            synced = await self.tree.sync()
        log.info("discord: %d slash commands synced", len(synced))

    # -- sending (adapters.base.Adapter) --------------------------------------------------------

    async def send(self, reply: OutgoingReply) -> SentMessage:
        """Send a whole reply to its channel (split at Discord's limit)."""
        channel = await self.intake.channel(reply.conversation_key)
        sink = ChannelSink(self.webhooks, channel, quote_reference(channel, reply.reply_to))
        ids = await stream_reply(single(reply), sink, self.limits)
        return SentMessage(reply.conversation_key, ids[0] if ids else "", reply.text)

    async def edit(self, sent: SentMessage, reply: OutgoingReply) -> SentMessage:
        channel = await self.intake.channel(reply.conversation_key)
        chunk = (split_message(reply.text, MAX_MESSAGE_CHARS) or [reply.text])[0]
        await ChannelSink(self.webhooks, channel).edit_chunk(
            sent.message_id, chunk, reply, reply.final
        )
        return SentMessage(sent.conversation_key, sent.message_id, chunk)
