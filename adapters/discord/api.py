"""Discord's transport: the discord.py client and command tree, the REST and gateway
addresses, the channels' webhooks, and the options that shape them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from chat.settings import PlatformSettings

log = logging.getLogger(__name__)

DEFAULT_API_BASE_URL = "https://discord.com/api/v10"
WEBHOOK_NAME = "localbot characters"
MAX_OWN_DELETIONS = 10_000


@dataclass(frozen=True, slots=True)
class DiscordOptions:
    """Discord-specific behaviour (from ``[platforms.discord]``)."""

    guild_id: int | None = None
    admin_role_ids: frozenset[int] = frozenset()
    admin_user_ids: frozenset[int] = frozenset()
    avatars: dict[str, str] = field(default_factory=dict)  # character name -> avatar URL
    shard_count: int | None = None
    shard_ids: tuple[int, ...] | None = None

    @classmethod
    def from_settings(cls, settings: PlatformSettings) -> DiscordOptions:
        return cls(
            guild_id=settings.guild_id,
            admin_role_ids=frozenset(settings.admin_role_ids),
            admin_user_ids=frozenset(settings.admin_user_ids),
            avatars=dict(settings.character_avatars),
            shard_count=settings.shard_count,
            shard_ids=settings.shard_ids,
        )

    def administers(self, user: discord.abc.User, perms: discord.Permissions | None) -> bool:
        """Whether ``user`` may change a conversation where they have ``perms`` (none: a DM,
        where anyone may): a listed admin or role, or managing the channel."""
        if perms is None or user.id in self.admin_user_ids:
            return True
        if any(role.id in self.admin_role_ids for role in getattr(user, "roles", [])):
            return True
        return bool(perms.manage_channels or perms.administrator)

    def owns_shard(self, guild_id: int | None) -> bool:
        """Whether this process runs the shard of ``guild_id`` (DMs belong to shard 0)."""
        if self.shard_ids is None:
            return True
        if guild_id is None:
            return 0 in self.shard_ids
        return (guild_id >> 22) % (self.shard_count or 1) in self.shard_ids


class Webhooks:
    """One cached webhook per channel (threads use their parent's), for character posts; and
    the messages the bot deletes itself, whose delete events are no user's deletion."""

    def __init__(self, client: discord.Client, avatars: dict[str, str]) -> None:
        self.client = client
        self.avatars = avatars
        self._hooks: dict[int, discord.Webhook] = {}
        self._deleting: set[str] = set()

    def usable(self, channel: Any) -> bool:
        guild = getattr(channel, "guild", None)
        if guild is None or guild.me is None:
            return False
        return bool(channel.permissions_for(guild.me).manage_webhooks)

    def ours(self, webhook_id: int | None) -> bool:
        return webhook_id is not None and any(h.id == webhook_id for h in self._hooks.values())

    async def of(self, channel: Any, refresh: bool = False) -> discord.Webhook:
        parent: Any = channel.parent if isinstance(channel, discord.Thread) else channel
        if not refresh and parent.id in self._hooks:
            return self._hooks[parent.id]
        me = self.client.user
        hooks = [
            h
            for h in await parent.webhooks()
            if h.token and (h.user is None or me is None or h.user.id == me.id)
        ]
        hook: discord.Webhook = (
            hooks[0] if hooks else await parent.create_webhook(name=WEBHOOK_NAME)
        )
        self._hooks[parent.id] = hook
        return hook

    def deleting(self, message_id: str) -> None:
        if len(self._deleting) > MAX_OWN_DELETIONS:  # events that never came: bounded
            self._deleting.clear()
        self._deleting.add(message_id)

    def deleted_by_us(self, message_id: str) -> bool:
        if message_id in self._deleting:
            self._deleting.discard(message_id)
            return True
        return False


@dataclass(slots=True)
class Events:
    """What the client hands on: the adapter's handlers, each given a raw event."""

    ready: Callable[[], Awaitable[None]]
    message: Callable[[discord.Message], Awaitable[None]]
    edit: Callable[[discord.RawMessageUpdateEvent], Awaitable[None]]
    delete: Callable[[discord.RawMessageDeleteEvent], Awaitable[None]]
    bulk_delete: Callable[[discord.RawBulkMessageDeleteEvent], Awaitable[None]]
    setup: Callable[[], Awaitable[None]]
    failed: Callable[[discord.Message], Awaitable[None]]


class Client(discord.AutoShardedClient):
    """The gateway connection: every shard of the bot, or ``shard_ids`` of ``shard_count``.

    Handlers never let an exception out: a failure is logged (and the user told, for a
    message), never a crash of the connection.
    """

    def __init__(
        self, options: DiscordOptions, intents: discord.Intents, mentions: discord.AllowedMentions
    ) -> None:
        shards: dict[str, Any] = {"shard_count": options.shard_count}
        if options.shard_ids is not None:
            shards["shard_ids"] = list(options.shard_ids)
        super().__init__(intents=intents, allowed_mentions=mentions, **shards)
        self.events: Events | None = None

    async def setup_hook(self) -> None:
        if self.events is not None:
            await self.events.setup()

    async def on_ready(self) -> None:
        # Every READY is a new session (a RESUME fires on_resumed instead): what was posted
        # while the bot was away was never dispatched to it.
        log.info("discord: connected as %s", self.user)
        if self.events is not None:
            await self.events.ready()

    async def on_message(self, message: discord.Message) -> None:
        if self.events is None:
            return
        try:
            await self.events.message(message)
        except Exception:
            log.exception("discord: handling message %s failed", message.id)
            with contextlib.suppress(discord.HTTPException):
                await self.events.failed(message)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        try:
            if self.events is not None:
                await self.events.edit(payload)
        except Exception:  # an edit is worth a log line, never a crash
            log.exception("discord: following the edit of %s failed", payload.message_id)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        try:
            if self.events is not None:
                await self.events.delete(payload)
        except Exception:
            log.exception("discord: following the deletion of %s failed", payload.message_id)

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        try:
            if self.events is not None:
                await self.events.bulk_delete(payload)
        except Exception:
            log.exception("discord: following a purge in %s failed", payload.channel_id)


async def connect(client: Client, token: str, api_base_url: str) -> None:
    """Log in, point the gateway at the server's answer, run until the client closes."""
    # discord.py keeps its REST base on a class attribute; one Discord connection per process.
    discord.http.Route.BASE = api_base_url
    try:
        await client.login(token)
        # A plain Client connects to DiscordWebSocket.DEFAULT_GATEWAY; use the URL the server
        # gives in GET /gateway/bot instead (real Discord or a compatible server).
        _shards, url, _limits = await client.http.get_bot_gateway()
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
        await client.connect(reconnect=True)
    finally:
        if not client.is_closed():
            await client.close()


class Tree(app_commands.CommandTree[Any]):
    """The command tree; a command that fails is logged and apologised for."""

    def __init__(self, client: Client, apology: str) -> None:
        super().__init__(client)
        self.apology = apology

    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        log.error("discord: a slash command failed", exc_info=error)
        with contextlib.suppress(discord.HTTPException):
            if interaction.response.is_done():
                await interaction.followup.send(self.apology, ephemeral=True)
            else:
                await interaction.response.send_message(self.apology, ephemeral=True)
