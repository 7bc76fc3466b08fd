"""Discord adapter: discord.py client, slash commands, character webhooks, streamed replies.

Work channels answer mentions and replies; roleplay channels also answer when a character is
named (or every message, if configured); DMs always.  In roleplay channels the reply is posted
through a cached channel webhook under the character's name and avatar when the bot may manage
webhooks, otherwise as a normal message prefixed with the character's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from adapters.base import SentMessage
from adapters.discord.sinks import (
    MAX_MESSAGE_CHARS,
    NO_MENTIONS,
    ChannelSink,
    InteractionSink,
    quote_reference,
)
from adapters.streaming import (
    FINISH_DELIVERY_S,
    DeliveredOnly,
    DeliveryTracker,
    StreamLimits,
    chain,
    finish_then_cancel,
    single,
    stream_reply,
)
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

PLATFORM = "discord"
DEFAULT_API_BASE_URL = "https://discord.com/api/v10"
EDIT_INTERVAL_S = 1.0  # edits share the channel's limit of about 5 per 5 seconds
MIN_NEW_CHARS = 30
WEBHOOK_NAME = "localbot characters"
# Chunks leave room for the "**Name:** " prefix (names are shortened to 64) and the swipe line.
SUFFIX_ROOM = 120
OWNERS_ONLY = (
    "Only the bot's owners can import characters: they are shared by every server. "
    "(Owners are listed in the bot's settings.)"
)
HANDLER_FAILED = "Sorry, something went wrong on my side while handling that. Please try again."
TEXT_COMMAND = re.compile(r"^/[A-Za-z]")
# Commands whose work the core itself holds to the fair-share limits.
CORE_LIMITED = {"chat", "regenerate", "continue", "summarize"}


def conversation_key(channel_id: int) -> str:
    return f"{PLATFORM}:{channel_id}"


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


class _Client(discord.AutoShardedClient):
    """The gateway connection: every shard of the bot, or ``shard_ids`` of ``shard_count``."""

    def __init__(self, adapter: DiscordAdapter, intents: discord.Intents) -> None:
        options = adapter.options
        shards: dict[str, Any] = {"shard_count": options.shard_count}
        if options.shard_ids is not None:
            shards["shard_ids"] = list(options.shard_ids)
        super().__init__(intents=intents, allowed_mentions=NO_MENTIONS, **shards)
        self.adapter = adapter

    async def setup_hook(self) -> None:
        await self.adapter._sync_commands()

    async def on_ready(self) -> None:
        # Every READY is a new session (a RESUME fires on_resumed instead): what was posted
        # while the bot was away was never dispatched to it.
        log.info("discord: connected as %s", self.user)
        self.adapter.ready.set()
        self.adapter._spawn(self.adapter._after_connect())

    async def on_message(self, message: discord.Message) -> None:
        try:
            await self.adapter._on_message(message)
        except Exception:  # never out of a handler: log it, apologise
            log.exception("discord: handling message %s failed", message.id)
            with contextlib.suppress(discord.HTTPException):
                await message.channel.send(HANDLER_FAILED, allowed_mentions=NO_MENTIONS)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        try:
            await self.adapter._on_edit(payload)
        except Exception:  # an edit is worth a log line, never a crash
            log.exception("discord: following the edit of %s failed", payload.message_id)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        try:
            await self.adapter._on_delete(payload)
        except Exception:
            log.exception("discord: following the deletion of %s failed", payload.message_id)


class _Tree(app_commands.CommandTree[Any]):
    """The command tree, holding slash commands to the rate limit and apologising on errors."""

    def __init__(self, client: _Client, adapter: DiscordAdapter) -> None:
        super().__init__(client)
        self.adapter = adapter

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        command = interaction.command.name if interaction.command is not None else ""
        if command in CORE_LIMITED:
            return True
        allowed, notice = self.adapter.core.admit(PLATFORM, str(interaction.user.id))
        if not allowed:
            # Ephemeral: only the caller sees it, so telling them every time costs no one else.
            text = notice or "You are sending commands too quickly; please wait a moment."
            await interaction.response.send_message(text, ephemeral=True)
        return allowed

    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        if isinstance(error, app_commands.CheckFailure):
            return  # refused by interaction_check, which has answered already
        log.error("discord: a slash command failed", exc_info=error)
        with contextlib.suppress(discord.HTTPException):
            if interaction.response.is_done():
                await interaction.followup.send(HANDLER_FAILED, ephemeral=True)
            else:
                await interaction.response.send_message(HANDLER_FAILED, ephemeral=True)


class DiscordAdapter:
    """Connects the core to Discord (or any Discord-compatible server)."""

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
        self.client = _Client(self, intents)
        self.tree = _Tree(self.client, self)
        self.ready = asyncio.Event()
        self._webhooks: dict[int, discord.Webhook] = {}
        # Chunks we delete ourselves: their delete events are not a user's deletion.
        self.deleted_by_us: set[str] = set()
        self.recovery = Recovery(core)
        self._recovery_started = False
        self.recovered = asyncio.Event()  # set once recovery and the first catch-up are done
        self._tasks: set[asyncio.Task[Any]] = set()
        self._add_commands()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Log in, point the gateway at the server's answer, run until :meth:`stop`."""
        # discord.py keeps its REST base on a class attribute; one Discord connection per process.
        discord.http.Route.BASE = self.api_base_url
        try:
            await self.client.login(self.token)
            # A plain Client connects to DiscordWebSocket.DEFAULT_GATEWAY; use the URL the
            # server gives in GET /gateway/bot instead (real Discord or a compatible server).
            _shards, url, _limits = await self.client.http.get_bot_gateway()
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
            await self.client.connect(reconnect=True)
        finally:
            if not self.client.is_closed():
                await self.client.close()

    async def stop(self) -> None:
        await finish_then_cancel(self._tasks, FINISH_DELIVERY_S)
        await self.client.close()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- recovery -----------------------------------------------------------------------------

    async def _after_connect(self) -> None:
        """After the first READY, finish what a stop left undone; after every READY, fetch
        the messages that arrived while the bot was away."""
        started = asyncio.get_running_loop().time()
        jobs: list[asyncio.Task[Any]] = []
        try:
            if not self._recovery_started:
                self._recovery_started = True
                plan = await self.recovery.plan(PLATFORM)
                jobs += [asyncio.create_task(self._resume(job)) for job in plan.resume]
                jobs += [asyncio.create_task(self._notify(notice)) for notice in plan.notices]
            jobs += await self._catch_up()
            await finish_recovery(PLATFORM, jobs, started)
        except Exception:
            log.exception("discord: recovery after connecting failed")
        finally:
            self.recovered.set()

    async def _channel(self, key: str) -> Any:
        channel_id = int(key.split(":", 1)[1])
        return self.client.get_channel(channel_id) or await self.client.fetch_channel(channel_id)

    async def _notify(self, notice: OutgoingReply) -> None:
        if await self._owned_channel(notice.conversation_key) is not None:
            await self.send(notice)

    def _owns_shard(self, guild_id: int | None) -> bool:
        """Whether this process runs the shard of ``guild_id`` (DMs belong to shard 0)."""
        ids = self.options.shard_ids
        if ids is None:
            return True
        if guild_id is None:
            return 0 in ids
        return (guild_id >> 22) % (self.options.shard_count or 1) in ids

    async def _owned_channel(self, key: str) -> Any | None:
        """The channel of conversation ``key`` if this process's shards serve it, else None:
        another process owns it (the sharding rule), and finishes its answers."""
        channel = await self._channel(key)
        guild = getattr(channel, "guild", None)
        return channel if self._owns_shard(guild.id if guild is not None else None) else None

    async def _resume(self, job: Resumable) -> None:
        try:
            channel = await self._owned_channel(job.conversation_key)
        except discord.HTTPException as exc:
            log.warning(
                "discord: cannot reach %s to finish an answer: %s", job.conversation_key, exc
            )
            channel = None
        if channel is None:
            job.ticket.release()
            return
        sink = ChannelSink(
            self, channel, reference=quote_reference(channel, job.platform_message_id)
        )
        is_dm = isinstance(channel, discord.DMChannel)
        await self._stream(channel, self.recovery.resume(job, is_dm), sink, resume=job.pieces)

    async def _catch_up(self) -> list[asyncio.Task[Any]]:
        """Handle, as if they had just arrived, the messages posted in known channels since
        the newest one stored (within the recover window, at most ``catch_up_limit`` each)."""
        since = self.recovery.window_start()
        limit = self.core.settings.catch_up_limit
        tasks: list[asyncio.Task[Any]] = []
        if limit <= 0:
            return tasks
        for key, last_seen in await self.recovery.catch_up_points(PLATFORM):
            if not last_seen.isdigit():
                continue
            try:
                channel = await self._owned_channel(key)
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

    async def stop_intake(self) -> None:
        """Nothing to pause on the gateway: the core answers new messages with a notice."""

    async def _sync_commands(self) -> None:
        if self.options.guild_id:
            guild = discord.Object(id=self.options.guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
        else:
            synced = await self.tree.sync()
        log.info("discord: %d slash commands synced", len(synced))

    # -- messages ---------------------------------------------------------------------------

    def _addresses_bot(self, message: discord.Message) -> bool:
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
            if resolved.webhook_id is not None and any(
                hook.id == resolved.webhook_id for hook in self._webhooks.values()
            ):
                return True  # a reply to one of our character posts
        return False

    def _clean_text(self, text: str) -> str:
        me = self.client.user
        if me is None:
            return text.strip()
        return re.sub(rf"<@!?{me.id}>", "", text).strip() or text.strip()

    async def _on_message(self, message: discord.Message) -> None:
        # Never answer bots, webhooks (our own character posts among them) or ourselves.
        if message.author.bot or message.webhook_id is not None:
            return
        if self.client.user is not None and message.author.id == self.client.user.id:
            return
        text = self._clean_text(message.content)
        if not text:
            return
        addressed = self._addresses_bot(message)
        if addressed and TEXT_COMMAND.match(text):
            # Typed as text, a command reaches no one: point at the real slash commands.
            allowed, notice = self.core.admit(PLATFORM, str(message.author.id))
            if allowed or notice:
                await message.channel.send(
                    notice or "My commands are slash commands: type / and pick one (/help).",
                    reference=message,
                    mention_author=False,
                    allowed_mentions=NO_MENTIONS,
                )
            return
        msg = IncomingMessage(
            platform=PLATFORM,
            conversation_key=conversation_key(message.channel.id),
            author_id=str(message.author.id),
            author_name=message.author.display_name,
            text=text,
            mentions_bot=addressed,
            is_dm=message.guild is None,
            platform_message_id=str(message.id),
        )
        sink = ChannelSink(self, message.channel, reference=message)
        await self._stream(message.channel, self.core.respond(msg), sink)

    async def _on_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """A message was edited: the stored text follows (see :mod:`chat.edits`)."""
        message = payload.message
        if message.author.bot or message.webhook_id is not None:
            return  # our own streamed edits, other bots, character posts
        if "content" not in payload.data:
            return  # an embed or a pin changed, not the text
        text = self._clean_text(message.content)
        replies = self.core.message_edited(
            PLATFORM,
            conversation_key(payload.channel_id),
            str(payload.message_id),
            text,
            message.guild is None,
        )
        sink = ChannelSink(self, message.channel, reference=message)
        await self._stream(message.channel, replies, sink)

    async def _on_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """A message was deleted (by its author, a moderator, or us): it leaves the context,
        unless we deleted it ourselves (a reply's spare chunk, shortened by a rewrite)."""
        if str(payload.message_id) in self.deleted_by_us:
            self.deleted_by_us.discard(str(payload.message_id))
            return
        key = conversation_key(payload.channel_id)
        await self.core.message_deleted(PLATFORM, key, str(payload.message_id))

    async def _stream(
        self,
        channel: Any,
        replies: AsyncIterator[OutgoingReply],
        sink: ChannelSink | InteractionSink,
        resume: tuple[str, ...] = (),
    ) -> list[str]:
        """Stream ``replies``; nothing is sent when the core stays silent."""
        first = await anext(replies, None)
        if first is None:
            return []
        tracker: DeliveryTracker = self.core
        if isinstance(sink, InteractionSink):
            tracker = DeliveredOnly(self.core)
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

    # -- webhooks -----------------------------------------------------------------------------

    def can_use_webhooks(self, channel: Any) -> bool:
        guild = getattr(channel, "guild", None)
        if guild is None or guild.me is None:
            return False
        return bool(channel.permissions_for(guild.me).manage_webhooks)

    async def webhook_for(self, channel: Any, refresh: bool = False) -> discord.Webhook:
        """The cached webhook of ``channel`` (threads use their parent's)."""
        parent: Any = channel.parent if isinstance(channel, discord.Thread) else channel
        if not refresh and parent.id in self._webhooks:
            return self._webhooks[parent.id]
        me = self.client.user
        hooks = [
            h
            for h in await parent.webhooks()
            if h.token and (h.user is None or me is None or h.user.id == me.id)
        ]
        hook: discord.Webhook = (
            hooks[0] if hooks else await parent.create_webhook(name=WEBHOOK_NAME)
        )
        self._webhooks[parent.id] = hook
        return hook

    # -- commands -----------------------------------------------------------------------------

    def is_admin(self, interaction: discord.Interaction) -> bool:
        """Whether the caller may change this conversation (anyone may, in a DM).

        Discord resolves ``interaction.permissions`` for the channel the command was used in,
        counting its permission overwrites; a thread's come from its parent channel.
        """
        if interaction.guild is None:
            return True
        user = interaction.user
        if user.id in self.options.admin_user_ids:
            return True
        roles = getattr(user, "roles", [])
        if any(role.id in self.options.admin_role_ids for role in roles):
            return True
        perms = interaction.permissions
        return bool(perms.manage_channels or perms.administrator)

    def _add_commands(self) -> None:
        tree = self.tree

        @tree.command(name="chat", description="Ask the bot something here")
        @app_commands.describe(message="What to say")
        async def chat(interaction: discord.Interaction, message: str) -> None:
            await interaction.response.defer(thinking=True)
            msg = IncomingMessage(
                PLATFORM,
                self._key(interaction),
                str(interaction.user.id),
                interaction.user.display_name,
                message,
                mentions_bot=True,
                is_dm=interaction.guild is None,
            )
            await self._stream(
                interaction.channel, self.core.respond(msg), InteractionSink(interaction)
            )

        @tree.command(name="summarize", description="Sum up the last messages here (work mode)")
        @app_commands.describe(count="How many messages (default: since my last reply)")
        async def summarize(interaction: discord.Interaction, count: int | None = None) -> None:
            await interaction.response.defer(thinking=True)
            replies = self.core.summarize(
                PLATFORM,
                self._key(interaction),
                interaction.guild is None,
                str(interaction.user.id),
                str(count) if count is not None else "",
            )
            await self._stream(interaction.channel, replies, InteractionSink(interaction))

        @tree.command(name="mode", description="Show this channel's mode, or set it (admins)")
        @app_commands.choices(
            mode=[
                app_commands.Choice(name="roleplay", value="roleplay"),
                app_commands.Choice(name="work", value="work"),
            ]
        )
        async def mode(
            interaction: discord.Interaction, mode: app_commands.Choice[str] | None = None
        ) -> None:
            if mode is None:  # anyone may ask
                now = await self.core.who_am_i(
                    PLATFORM, self._key(interaction), interaction.guild is None
                )
                await interaction.response.send_message(
                    f"{now} Admins switch it with /mode roleplay or /mode work.", ephemeral=True
                )
                return
            if not self.is_admin(interaction):
                await self._refuse(interaction, "change the mode")
                return
            chosen = parse_mode(mode.value) or "work"
            await self.core.set_mode(PLATFORM, self._key(interaction), chosen)
            await interaction.response.send_message(
                f"This channel is now in {chosen} mode: the {ROLE_FOR_MODE[chosen]} model answers."
            )
            await self._post_opening(interaction)

        character = app_commands.Group(name="character", description="The channel's character")

        @character.command(name="set", description="Choose the channel's character (admins)")
        async def character_set(interaction: discord.Interaction, name: str) -> None:
            if not self.is_admin(interaction):
                await self._refuse(interaction, "choose the character")
                return
            wanted = [n.strip() for n in name.split(",") if n.strip()]
            cast = await self.core.set_cast(PLATFORM, self._key(interaction), wanted)
            if cast is None:
                names = ", ".join(self.core.characters.names())
                await interaction.response.send_message(
                    fit(f"I don't know a character called {shorten(name)}. Try: {names}.", 2000),
                    ephemeral=True,
                )
                return
            who = " and ".join(c.name for c in cast)
            await interaction.response.send_message(
                f"{who} take{'s' if len(cast) == 1 else ''} the stage here."
            )
            await self._post_opening(interaction)

        @character.command(name="show", description="Show the channel's character")
        async def character_show(interaction: discord.Interaction) -> None:
            char = await self.core.character_of(PLATFORM, self._key(interaction))
            text = (
                f"**{char.name}**\n{char.description.replace('{{char}}', char.display_name)}"
                f"\n\n*Greeting:* {char.greeting.replace('{{char}}', char.display_name)}"
            )
            await interaction.response.send_message(text[:MAX_MESSAGE_CHARS], ephemeral=True)

        @character.command(name="list", description="List the characters")
        async def character_list(interaction: discord.Interaction) -> None:
            names = ", ".join(self.core.characters.names())
            await interaction.response.send_message(
                fit(f"Characters: {names}.", MAX_MESSAGE_CHARS), ephemeral=True
            )

        @character.command(name="import", description="Import a character card (bot owners)")
        @app_commands.describe(
            card="A SillyTavern/TavernAI card: PNG, JSON or CHARX",
            replace="Replace an imported character of the same name",
        )
        async def character_import(
            interaction: discord.Interaction, card: discord.Attachment, replace: bool = False
        ) -> None:
            if not self.core.is_owner(PLATFORM, str(interaction.user.id)):
                await interaction.response.send_message(OWNERS_ONLY, ephemeral=True)
                return
            if card.size > MAX_CARD_BYTES:
                await interaction.response.send_message(
                    f"That file is too large to be a character card (at most "
                    f"{MAX_CARD_BYTES // (1024 * 1024)} MB).",
                    ephemeral=True,
                )
                return
            await interaction.response.defer(ephemeral=True, thinking=True)
            try:
                parsed = parse_card_bytes(await card.read(), card.filename)
                imported = await self.core.import_card(parsed, replace=replace)
            except CardError as exc:
                await interaction.edit_original_response(
                    content=fit(f"I could not import that card: {exc}.", MAX_MESSAGE_CHARS)
                )
                return
            name = shorten(imported.character.name)
            done = f"Replaced the earlier {name}" if imported.replaced else f"Imported {name}"
            await interaction.edit_original_response(
                content=f"{done}. Use /character set {name} to play them."
            )

        @character.command(name="world", description="Attach a world book here, or 'off' (admins)")
        async def character_world(interaction: discord.Interaction, name: str) -> None:
            if not self.is_admin(interaction):
                await self._refuse(interaction, "change the world book")
                return
            book = None if name.strip().lower() == "off" else name.strip()
            if not await self.core.attach_world_book(PLATFORM, self._key(interaction), book):
                known = ", ".join(sorted(self.core.world_books)) or "none imported yet"
                await interaction.response.send_message(
                    fit(f"No world book called {shorten(name)} (available: {known}).", 2000),
                    ephemeral=True,
                )
                return
            done = f"World book {shorten(book)} attached." if book else "World book detached."
            await interaction.response.send_message(done)

        tree.add_command(character)

        @tree.command(name="swipe", description="Show another version of my last reply")
        @app_commands.choices(
            direction=[
                app_commands.Choice(name="next", value="next"),
                app_commands.Choice(name="back", value="back"),
            ]
        )
        async def swipe(
            interaction: discord.Interaction, direction: app_commands.Choice[str] | None = None
        ) -> None:
            key = self._key(interaction)
            old = await self.core.last_reply_message_id(PLATFORM, key)
            step = -1 if direction is not None and direction.value == "back" else 1
            reply = await self.core.swipe(PLATFORM, key, step)
            if reply.kind is not ReplyKind.ANSWER:
                await interaction.response.send_message(reply.text, ephemeral=True)
                return
            await interaction.response.defer(ephemeral=True, thinking=True)
            sink = ChannelSink(self, interaction.channel, replace_id=old)
            await stream_reply(single(reply), sink, self.limits)
            await interaction.edit_original_response(
                content=f"Showing version {reply.swipe[0]} of {reply.swipe[1]}."
                if reply.swipe
                else "Done."
            )

        @tree.command(name="reset", description="Start a fresh conversation here")
        async def reset(interaction: discord.Interaction) -> None:
            if not self.is_admin(interaction):
                await self._refuse(interaction, "reset the conversation")
                return
            await self.core.reset(PLATFORM, self._key(interaction))
            await interaction.response.send_message(
                "Started a fresh conversation. Earlier messages stay stored."
            )
            await self._post_opening(interaction)

        @tree.command(name="memory", description="What I remember here beyond my window")
        async def memory(interaction: discord.Interaction) -> None:
            key = self._key(interaction)
            await interaction.response.defer(ephemeral=True, thinking=True)
            report = await self.core.memory_report(PLATFORM, key)
            for chunk in split_message(report, MAX_MESSAGE_CHARS):
                await interaction.followup.send(chunk, ephemeral=True, allowed_mentions=NO_MENTIONS)

        @tree.command(name="remember", description="Pin a fact I must keep in mind (admins)")
        @app_commands.describe(fact="The fact, in one sentence")
        async def remember(interaction: discord.Interaction, fact: str) -> None:
            if not self.is_admin(interaction):
                await self._refuse(interaction, "pin facts")
                return
            answer = await self.core.remember(PLATFORM, self._key(interaction), fact)
            await interaction.response.send_message(fit(answer, MAX_MESSAGE_CHARS))

        @tree.command(name="forget", description="Unpin a fact by its number (admins)")
        @app_commands.describe(number="The fact's number, as /memory lists it")
        async def forget(interaction: discord.Interaction, number: int) -> None:
            if not self.is_admin(interaction):
                await self._refuse(interaction, "unpin facts")
                return
            answer = await self.core.forget_fact(PLATFORM, self._key(interaction), str(number))
            await interaction.response.send_message(fit(answer, MAX_MESSAGE_CHARS))

        @tree.command(name="note", description="Set or clear the author's note here (admins)")
        @app_commands.describe(text="The note that steers replies; leave out to clear it")
        async def note(interaction: discord.Interaction, text: str = "") -> None:
            if not self.is_admin(interaction):
                await self._refuse(interaction, "set the author's note")
                return
            answer = await self.core.set_note(PLATFORM, self._key(interaction), text)
            await interaction.response.send_message(fit(answer, MAX_MESSAGE_CHARS))

        @tree.command(name="persona", description="Who you play here (empty: clear)")
        @app_commands.describe(text="Name: description, or a description alone")
        async def persona(interaction: discord.Interaction, text: str = "") -> None:
            answer = await self.core.set_persona(
                PLATFORM, self._key(interaction), str(interaction.user.id), text
            )
            await interaction.response.send_message(fit(answer, MAX_MESSAGE_CHARS), ephemeral=True)

        @tree.command(name="continue", description="Make my last reply here longer")
        async def continue_(interaction: discord.Interaction) -> None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            key = self._key(interaction)
            pieces = await self.core.last_reply_pieces(PLATFORM, key)
            replies = self.core.continue_reply(
                PLATFORM, key, interaction.guild is None, str(interaction.user.id)
            )
            first = await anext(replies, None)
            if first is None:
                return
            if first.kind is not ReplyKind.ANSWER:  # nothing to continue, or not now
                await interaction.edit_original_response(content=fit(first.text, 2000))
                return
            sink = ChannelSink(self, interaction.channel)
            await self._stream(interaction.channel, chain(first, replies), sink, tuple(pieces))
            await interaction.edit_original_response(content="Done: the last reply goes on.")

        @tree.command(name="regenerate", description="Write my last reply here again")
        async def regenerate(interaction: discord.Interaction) -> None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            key = self._key(interaction)
            old = await self.core.last_reply_message_id(PLATFORM, key)
            sink = ChannelSink(self, interaction.channel, replace_id=old)
            replies = self.core.regenerate(
                PLATFORM, key, interaction.guild is None, str(interaction.user.id)
            )
            await self._stream(interaction.channel, replies, sink)
            await interaction.edit_original_response(content="Done: the last reply was rewritten.")

        @tree.command(name="help", description="What the bot does here")
        async def help_(interaction: discord.Interaction) -> None:
            text = await self.core.help_text(
                PLATFORM, self._key(interaction), interaction.guild is None
            )
            await interaction.response.send_message(fit(text, MAX_MESSAGE_CHARS), ephemeral=True)

    def _key(self, interaction: discord.Interaction) -> str:
        return conversation_key(interaction.channel_id or 0)

    async def _refuse(self, interaction: discord.Interaction, what: str) -> None:
        await interaction.response.send_message(
            f"You need the Manage Channels permission (or a bot admin role) to {what}.",
            ephemeral=True,
        )

    async def _post_opening(self, interaction: discord.Interaction) -> None:
        greeting = await self.core.open_scene(
            PLATFORM, self._key(interaction), interaction.guild is None
        )
        if greeting is not None:
            await stream_reply(
                single(greeting), ChannelSink(self, interaction.channel), self.limits
            )

    async def send(self, reply: OutgoingReply) -> SentMessage:
        """Send a whole reply to its channel (split at Discord's limit)."""
        channel = await self._channel(reply.conversation_key)
        sink = ChannelSink(self, channel, reference=quote_reference(channel, reply.reply_to))
        ids = await stream_reply(single(reply), sink, self.limits)
        return SentMessage(reply.conversation_key, ids[0] if ids else "", reply.text)

    async def edit(self, sent: SentMessage, reply: OutgoingReply) -> SentMessage:
        channel = await self._channel(reply.conversation_key)
        chunk = (split_message(reply.text, MAX_MESSAGE_CHARS) or [reply.text])[0]
        await ChannelSink(self, channel).edit_chunk(sent.message_id, chunk, reply, reply.final)
        return SentMessage(sent.conversation_key, sent.message_id, chunk)
