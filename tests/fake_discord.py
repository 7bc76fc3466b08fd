"""A Discord-compatible server on 127.0.0.1 (REST + gateway) for driving discord.py end to end.

REST: users/@me, oauth2 application, gateway/bot, command sync, messages (create, edit), typing,
channel webhooks (list, create, execute, edit), interaction callbacks, original-response edits and
follow-ups.  Gateway: HELLO, IDENTIFY → READY + GUILD_CREATE, heartbeats, and dispatching
MESSAGE_CREATE / INTERACTION_CREATE / MESSAGE_DELETE(_BULK) from tests.  Interactions follow
Discord's rules: the first response within 3 s (else 404 code 10062), one initial response (else
400 code 40060), follow-ups only after it.  Faults on demand: a 429 with ``retry_after`` and an
"Unknown Webhook" (10015) error.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests.waiting import wait_until

# Permission bits (Discord's numbering).
MANAGE_CHANNELS = 1 << 4
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
READ_HISTORY = 1 << 16
USE_COMMANDS = 1 << 31
MANAGE_WEBHOOKS = 1 << 29
SEND_IN_THREADS = 1 << 38

GUILD = "1000"
EVERYONE_ROLE = GUILD
# A second guild, on shard 1 of 2: (4194304 >> 22) % 2 == 1 (GUILD is on shard 0).
GUILD2 = str(1 << 22)
CHANNEL_G2 = "2201"
BOT_ROLE2 = "5002"
MOD_ROLE = "1001"
BOT_ROLE = "1002"
APP_ID = "900"
BOT_USER = {
    "id": APP_ID,
    "username": "Lantern",
    "discriminator": "0",
    "global_name": None,
    "avatar": None,
    "bot": True,
    "public_flags": 0,
    "flags": 0,
}
CHANNEL_ROLEPLAY = "2001"
CHANNEL_WORK = "2002"
CHANNEL_NO_HOOKS = "2003"  # the bot may not manage webhooks here
CHANNEL_LOCKED = "2004"  # the mods role is denied Manage Channels here (an overwrite)
THREAD = "2101"  # a thread under the roleplay channel
MAX_CONTENT = 2000
DISCORD_EPOCH_MS = 1420070400000
DM_CHANNEL = "3001"  # any channel id starting with 3 is a DM (one per user, as on Discord)


def is_dm(channel_id: str) -> bool:
    return channel_id.startswith("3")


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


# Role overwrites per channel id: the mods may not manage the locked channel.
OVERWRITES: dict[str, list[dict[str, Any]]] = {
    CHANNEL_LOCKED: [{"id": MOD_ROLE, "type": 0, "allow": "0", "deny": str(MANAGE_CHANNELS)}],
}


def user(uid: str, name: str) -> dict[str, Any]:
    return {
        "id": uid,
        "username": name.lower(),
        "discriminator": "0",
        "global_name": name,
        "avatar": None,
        "public_flags": 0,
        "flags": 0,
    }


@dataclass
class Posted:
    """A message the bot (or its webhook) put in a channel."""

    id: str
    channel_id: str
    content: str
    webhook_id: str | None = None
    username: str | None = None
    avatar_url: str | None = None
    thread_id: str | None = None
    reference: str | None = None
    interaction: str | None = None  # the interaction token of a response / follow-up
    ephemeral: bool = False
    edits: list[str] = field(default_factory=list)
    allowed_mentions: dict[str, Any] | None = None


class FakeDiscord:
    def __init__(self) -> None:
        self._last_id = 0
        # User messages as Discord stores them, by channel: what channel history returns.
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.deleted: list[Posted] = []
        self.posted: list[Posted] = []
        self.commands: dict[str, list[dict[str, Any]]] = {}  # scope -> commands
        self.callbacks: list[dict[str, Any]] = []
        self.webhooks: list[dict[str, Any]] = []
        self.typing: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.too_long: list[tuple[str, int]] = []  # (path, length) of refused over-limit texts
        self.fail_next: dict[tuple[str, str], str] = {}  # (method, path prefix) -> kind
        self.forbidden_until = 0.0  # posting messages is refused (403) until this monotonic time
        self.identified = asyncio.Event()
        self.attachments: dict[str, bytes] = {}
        self._interaction_channel: dict[str, str] = {}  # token -> channel id
        # Discord's interaction rules: the first response within 3 s of the interaction's
        # creation (else 404 code 10062), only one initial response (else 400 code 40060),
        # and follow-ups only once it is acknowledged.
        self.interaction_deadline_s = 3.0
        self._interaction_created: dict[str, float] = {}  # token -> monotonic time created
        self._acknowledged: set[str] = set()
        self.late_interactions: list[str] = []  # tokens whose first response came too late
        self.double_acks: list[str] = []  # tokens that got a second initial response
        self._ws: web.WebSocketResponse | None = None
        self.shards: dict[int, web.WebSocketResponse] = {}  # shard id -> its connection
        self.shard_count = 1
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- helpers for tests ------------------------------------------------------------------

    def new_id(self) -> str:
        """A snowflake: milliseconds since Discord's epoch in the high bits, as discord.py
        reads a message's creation time from it."""
        stamp = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last_id = max(stamp, self._last_id + 1)
        return str(self._last_id)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    def in_channel(self, channel_id: str) -> list[Posted]:
        return [p for p in self.posted if p.channel_id == channel_id and not p.interaction]

    def find(self, message_id: str) -> Posted:
        return next(p for p in self.posted if p.id == message_id)

    async def wait_for(self, predicate: Any, within: float = 60.0) -> None:
        await wait_until(predicate, within)

    def guild_of(self, channel_id: str) -> str | None:
        """The guild a channel belongs to (None: a DM)."""
        if is_dm(channel_id):
            return None
        return GUILD2 if channel_id == CHANNEL_G2 else GUILD

    def guild_json(self, guild_id: str = GUILD) -> dict[str, Any]:
        def text_channel(cid: str, name: str, overwrites: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "id": cid,
                "type": 0,
                "guild_id": guild_id,
                "name": name,
                "position": int(cid) % 10,
                "permission_overwrites": overwrites,
                "parent_id": None,
                "nsfw": False,
                "topic": None,
                "last_message_id": None,
                "rate_limit_per_user": 0,
                "flags": 0,
            }

        def role(rid: str, name: str, perms: int, position: int) -> dict[str, Any]:
            return {
                "id": rid,
                "name": name,
                "color": 0,
                "hoist": False,
                "position": position,
                "permissions": str(perms),
                "managed": False,
                "mentionable": False,
                "flags": 0,
            }

        base = VIEW_CHANNEL | SEND_MESSAGES | READ_HISTORY | USE_COMMANDS
        deny_hooks = [{"id": BOT_ROLE, "type": 0, "allow": "0", "deny": str(MANAGE_WEBHOOKS)}]
        locked = OVERWRITES[CHANNEL_LOCKED]
        if guild_id == GUILD2:
            return {
                **self.guild_json(GUILD),
                "id": GUILD2,
                "name": "Second realm",
                "roles": [
                    role(GUILD2, "@everyone", base, 0),
                    role(BOT_ROLE2, "bot", base | MANAGE_WEBHOOKS, 1),
                ],
                "channels": [text_channel(CHANNEL_G2, "office-2", [])],
                "threads": [],
                "members": [
                    {
                        "user": BOT_USER,
                        "roles": [BOT_ROLE2],
                        "joined_at": now_iso(),
                        "deaf": False,
                        "mute": False,
                        "flags": 0,
                    }
                ],
            }
        return {
            "id": GUILD,
            "name": "Realm",
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": "1",
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "features": [],
            "mfa_level": 0,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "description": None,
            "banner": None,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "joined_at": now_iso(),
            "large": False,
            "unavailable": False,
            "member_count": 4,
            "voice_states": [],
            "presences": [],
            "emojis": [],
            "stickers": [],
            "roles": [
                role(EVERYONE_ROLE, "@everyone", base, 0),
                role(MOD_ROLE, "mods", base | MANAGE_CHANNELS, 1),
                role(BOT_ROLE, "bot", base | MANAGE_WEBHOOKS | SEND_IN_THREADS, 2),
            ],
            "channels": [
                text_channel(CHANNEL_ROLEPLAY, "tavern", []),
                text_channel(CHANNEL_WORK, "office", []),
                text_channel(CHANNEL_NO_HOOKS, "no-hooks", deny_hooks),
                text_channel(CHANNEL_LOCKED, "announcements", locked),
            ],
            "threads": [
                {
                    "id": THREAD,
                    "type": 11,
                    "guild_id": GUILD,
                    "parent_id": CHANNEL_ROLEPLAY,
                    "name": "side quest",
                    "owner_id": "1",
                    "message_count": 0,
                    "member_count": 1,
                    "rate_limit_per_user": 0,
                    "flags": 0,
                    "thread_metadata": {
                        "archived": False,
                        "auto_archive_duration": 1440,
                        "archive_timestamp": now_iso(),
                        "locked": False,
                    },
                }
            ],
            "members": [
                {
                    "user": BOT_USER,
                    "roles": [BOT_ROLE],
                    "joined_at": now_iso(),
                    "deaf": False,
                    "mute": False,
                    "flags": 0,
                }
            ],
        }

    def member(
        self, author: dict[str, Any], admin: bool, channel_id: str | None = None
    ) -> dict[str, Any]:
        """A member object; ``permissions`` are resolved in ``channel_id`` as Discord does for
        interactions: role permissions, then the channel's role overwrites (a thread's come
        from its parent channel)."""
        perms = VIEW_CHANNEL | SEND_MESSAGES | READ_HISTORY | (MANAGE_CHANNELS if admin else 0)
        channel = CHANNEL_ROLEPLAY if channel_id == THREAD else channel_id
        roles = {EVERYONE_ROLE, *([MOD_ROLE] if admin else [])}
        for overwrite in OVERWRITES.get(channel or "", []):
            if overwrite["id"] in roles:
                perms = (perms & ~int(overwrite["deny"])) | int(overwrite["allow"])
        return {
            "user": author,
            "roles": [MOD_ROLE] if admin else [],
            "joined_at": now_iso(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": str(perms),
        }

    def message_json(
        self, mid: str, channel_id: str, author: dict[str, Any], content: str, **extra: Any
    ) -> dict[str, Any]:
        data = {
            "id": mid,
            "channel_id": channel_id,
            "author": author,
            "content": content,
            "timestamp": now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
            "components": [],
        }
        guild = self.guild_of(channel_id)
        if guild is not None:
            data["guild_id"] = guild
        data.update(extra)
        return data

    async def say(
        self,
        channel_id: str,
        author: dict[str, Any],
        content: str,
        *,
        mention_bot: bool = False,
        reply_to: str | None = None,
        admin: bool = False,
        offline: bool = False,
        **extra: Any,
    ) -> str:
        """A user (or bot/webhook, via ``extra``) posts a message; returns its id.

        ``offline``: the message is stored in the channel's history but not dispatched, as
        for a bot that is not connected.
        """
        mid = self.new_id()
        if mention_bot:
            content = f"<@{APP_ID}> {content}"
        data = self.message_json(mid, channel_id, author, content, **extra)
        if mention_bot:
            data["mentions"] = [BOT_USER]
        if not is_dm(channel_id) and "webhook_id" not in extra:
            member = self.member(author, admin)
            member.pop("user")
            data["member"] = member
        if reply_to is not None:
            original = self.find(reply_to)
            data["type"] = 19
            data["message_reference"] = {
                "message_id": reply_to,
                "channel_id": channel_id,
                "guild_id": GUILD,
            }
            data["referenced_message"] = self._posted_json(original)
        self.history.setdefault(channel_id, []).append(data)
        if not offline:
            await self.dispatch("MESSAGE_CREATE", data)
        return mid

    async def edit(self, channel_id: str, message_id: str, content: str) -> None:
        """The author of a user message edits it (MESSAGE_UPDATE with the whole message)."""
        data = next(m for m in self.history[channel_id] if m["id"] == message_id)
        data.update(content=content, edited_timestamp=now_iso())
        await self.dispatch("MESSAGE_UPDATE", data)

    async def delete(self, channel_id: str, message_id: str) -> None:
        """A user or a moderator deletes a message (MESSAGE_DELETE)."""
        self.history[channel_id] = [m for m in self.history[channel_id] if m["id"] != message_id]
        data = {"id": message_id, "channel_id": channel_id}
        if (guild := self.guild_of(channel_id)) is not None:
            data["guild_id"] = guild
        await self.dispatch("MESSAGE_DELETE", data)

    async def delete_bulk(self, channel_id: str, message_ids: list[str]) -> None:
        """A moderator purges messages (MESSAGE_DELETE_BULK)."""
        gone = set(message_ids)
        self.history[channel_id] = [m for m in self.history[channel_id] if m["id"] not in gone]
        data: dict[str, Any] = {"ids": list(message_ids), "channel_id": channel_id}
        if (guild := self.guild_of(channel_id)) is not None:
            data["guild_id"] = guild
        await self.dispatch("MESSAGE_DELETE_BULK", data)

    async def command(
        self,
        channel_id: str,
        author: dict[str, Any],
        name: str,
        options: list[dict[str, Any]] | None = None,
        *,
        admin: bool = False,
        resolved: dict[str, Any] | None = None,
    ) -> str:
        """A user runs a slash command; returns the interaction token."""
        token = f"tok{self.new_id()}"
        self._interaction_channel[token] = channel_id
        self._interaction_created[token] = time.monotonic()
        data: dict[str, Any] = {
            "id": self.new_id(),
            "application_id": APP_ID,
            "type": 2,
            "token": token,
            "version": 1,
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": 8 * 1024 * 1024,
            "authorizing_integration_owners": {},
            "app_permissions": str(MANAGE_WEBHOOKS | SEND_MESSAGES | VIEW_CHANNEL),
            "data": {"id": self.new_id(), "name": name, "type": 1, "options": options or []},
            "channel_id": channel_id,
        }
        if resolved:
            data["data"]["resolved"] = resolved
        if is_dm(channel_id):
            data["channel"] = {"id": channel_id, "type": 1, "recipients": [author]}
            data["user"] = author
            data["context"] = 1
        else:
            data["guild_id"] = GUILD
            data["guild_locale"] = "en-US"
            data["channel"] = {
                "id": channel_id,
                "type": 0,
                "guild_id": GUILD,
                "name": "c",
                "position": 0,
                "permission_overwrites": [],
                "parent_id": None,
                "nsfw": False,
                "flags": 0,
            }
            data["member"] = self.member(author, admin, channel_id)
            data["context"] = 0
        await self.dispatch("INTERACTION_CREATE", data)
        return token

    def attachment(self, name: str, data: bytes) -> tuple[str, dict[str, Any]]:
        """Register an uploaded file; returns its id and the resolved attachment object."""
        aid = self.new_id()
        self.attachments[aid] = data
        url = f"http://127.0.0.1:{self.port}/attachments/{aid}/{name}"
        return aid, {
            "id": aid,
            "filename": name,
            "size": len(data),
            "url": url,
            "proxy_url": url,
            "content_type": "application/octet-stream",
        }

    async def _attachment(self, request: web.Request) -> web.Response:
        return web.Response(body=self.attachments[request.match_info["aid"]])

    def responses(self, token: str) -> list[Posted]:
        return [p for p in self.posted if p.interaction == token]

    # -- server -------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{aid}/{name}", self._attachment)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for ws in {*self.shards.values(), *([self._ws] if self._ws else [])}:
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def shard_of(self, guild_id: str | None) -> int:
        """Discord's routing: a guild's events go to shard (guild_id >> 22) % shard_count;
        DMs to shard 0."""
        return 0 if guild_id is None else (int(guild_id) >> 22) % self.shard_count

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        ws = self.shards.get(self.shard_of(data.get("guild_id")), self._ws)
        assert ws is not None, "no gateway connection"
        await self._send(ws, event, data)

    async def _send(self, ws: web.WebSocketResponse, event: str, data: dict[str, Any]) -> None:
        self._seq += 1
        await ws.send_str(json.dumps({"op": 0, "t": event, "s": self._seq, "d": data}))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        shard = 0
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            payload = json.loads(msg.data)
            if payload["op"] == 1:
                await ws.send_str(json.dumps({"op": 11}))
            elif payload["op"] == 2:
                shard, count = payload["d"].get("shard") or [0, 1]
                self.shard_count = count
                self.shards[shard] = ws
                guilds = [g for g in (GUILD, GUILD2) if self.shard_of(g) == shard]
                if count == 1:
                    guilds = [GUILD]  # unsharded: the second guild is not joined
                ready = {
                    "v": 10,
                    "user": BOT_USER,
                    "guilds": [{"id": g, "unavailable": True} for g in guilds],
                    "session_id": f"session-{shard}",
                    "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway",
                    "application": {"id": APP_ID, "flags": 0},
                    "private_channels": [],
                    "relationships": [],
                    "shard": [shard, count],
                }
                await self._send(ws, "READY", ready)
                for guild in guilds:
                    await self._send(ws, "GUILD_CREATE", self.guild_json(guild))
                self.identified.set()
        if self.shards.get(shard) is ws:
            del self.shards[shard]
        if self._ws is ws:  # the bot went away
            self._ws = None
            self.identified.clear()
        return ws

    @staticmethod
    def _json(data: Any, status: int = 200, **headers: str) -> web.Response:
        # discord.py parses JSON only when the content type is exactly application/json
        # (aiohttp would append "; charset=utf-8" to a text body).
        return web.Response(
            body=json.dumps(data).encode(),
            status=status,
            headers={"Content-Type": "application/json", **headers},
        )

    def _fault(self, method: str, path: str) -> web.Response | None:
        if path.endswith("/messages") and time.monotonic() < self.forbidden_until:
            # discord.py retries 5xx itself; a 403 reaches the adapter at once.
            return self._json({"message": "Missing Permissions", "code": 50013}, 403)
        for (m, prefix), kind in list(self.fail_next.items()):
            if m == method and path.startswith(prefix):
                del self.fail_next[(m, prefix)]
                if kind == "429":
                    # discord.py retries a 429 only when it looks like Discord's (Via header).
                    body = {
                        "message": "You are being rate limited.",
                        "retry_after": 0.3,
                        "global": False,
                    }
                    return self._json(body, 429, Via="1.1 google", **{"Retry-After": "1"})
                if kind == "unknown_webhook":
                    return self._json({"message": "Unknown Webhook", "code": 10015}, 404)
        return None

    def _posted_json(self, p: Posted) -> dict[str, Any]:
        author = (
            {
                "id": p.webhook_id,
                "username": p.username or "hook",
                "discriminator": "0000",
                "avatar": None,
                "bot": True,
            }
            if p.webhook_id
            else BOT_USER
        )
        extra: dict[str, Any] = {"webhook_id": p.webhook_id} if p.webhook_id else {}
        channel = p.thread_id or p.channel_id
        return self.message_json(p.id, channel, author, p.content, **extra)

    async def _body(self, request: web.Request) -> Any:
        if request.content_type == "application/json":
            return await request.json()
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            return dict(json.loads(str(form.get("payload_json", "{}"))))
        return {}

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        method = request.method
        self.requests.append((method, path))
        if (fault := self._fault(method, path)) is not None:
            return fault
        body = await self._body(request) if method in ("POST", "PATCH", "PUT") else {}
        if (too_long := self._check_length(path, body)) is not None:
            return too_long
        parts = path.strip("/").split("/")
        q = request.query
        if path == "/users/@me":
            return self._json(BOT_USER)
        if path == "/oauth2/applications/@me":
            return self._json(
                {
                    "id": APP_ID,
                    "name": "Lantern",
                    "description": "",
                    "icon": None,
                    "bot_public": True,
                    "bot_require_code_grant": False,
                    "verify_key": "k",
                    "owner": user("1", "Owner"),
                    "flags": 0,
                    "summary": "",
                }
            )
        if path == "/gateway/bot":
            return self._json(
                {
                    "url": f"ws://127.0.0.1:{self.port}/gateway",
                    "shards": 1,
                    "session_start_limit": {
                        "total": 1000,
                        "remaining": 999,
                        "reset_after": 0,
                        "max_concurrency": 1,
                    },
                }
            )
        if parts[0] == "applications" and method == "PUT":
            scope = parts[3] if len(parts) > 4 else "global"
            commands = [
                {
                    **c,
                    "id": self.new_id(),
                    "application_id": APP_ID,
                    "version": "1",
                    "type": c.get("type", 1),
                }
                for c in body
            ]
            self.commands[scope] = commands
            return self._json(commands)
        if parts[0] == "channels":
            return await self._channels(method, parts, body, q)
        if parts[0] == "webhooks":
            return await self._webhook_call(method, parts, body, q)
        if parts[0] == "interactions":
            return self._interaction_callback(parts, body)
        return self._json({"message": f"fake: {method} {path} not implemented", "code": 0}, 404)

    def _check_length(self, path: str, body: Any) -> web.Response | None:
        """Refuse content over Discord's limit the way Discord does, and remember it."""
        if not isinstance(body, dict):
            return None
        data = body.get("data") if isinstance(body.get("data"), dict) else body
        content = data.get("content") if isinstance(data, dict) else None
        if isinstance(content, str) and len(content) > MAX_CONTENT:
            self.too_long.append((path, len(content)))
            error = {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000"}]}
            return self._json(
                {"message": "Invalid Form Body", "code": 50035, "errors": {"content": error}},
                400,
            )
        return None

    def channel_json(self, cid: str) -> dict[str, Any]:
        if is_dm(cid):
            user_id = str(int(cid) + 10)  # a DM channel's one recipient
            return {"id": cid, "type": 1, "recipients": [user(user_id, "DM user")]}
        guild = self.guild_of(cid) or GUILD
        found = [c for c in self.guild_json(guild)["channels"] if c["id"] == cid]
        return found[0] if found else {}

    def _history(self, cid: str, q: Any) -> web.Response:
        """GET /channels/{id}/messages: newest first, ``limit`` of those after ``after``."""
        messages = [*self.history.get(cid, []), *map(self._posted_json, self.in_channel(cid))]
        messages.sort(key=lambda m: int(m["id"]))
        limit = int(q.get("limit", 50))
        if "after" in q:
            messages = [m for m in messages if int(m["id"]) > int(q["after"])][:limit]
        else:
            if "before" in q:
                messages = [m for m in messages if int(m["id"]) < int(q["before"])]
            messages = messages[-limit:]
        self.requests.append(("HISTORY", cid))
        return self._json(list(reversed(messages)))

    async def _channels(
        self, method: str, parts: list[str], body: dict[str, Any], q: Any = None
    ) -> web.Response:
        cid = parts[1]
        if len(parts) == 2 and method == "GET":
            channel = self.channel_json(cid)
            if not channel:
                return self._json({"message": "Unknown Channel", "code": 10003}, 404)
            return self._json(channel)
        if parts[2:] == ["messages"] and method == "GET":
            return self._history(cid, q or {})
        if len(parts) == 4 and parts[2] == "messages" and method == "DELETE":
            posted = self.find(parts[3])
            self.posted.remove(posted)
            self.deleted.append(posted)
            return web.Response(status=204)
        if parts[2:] == ["typing"]:
            self.typing.append(cid)
            return web.Response(status=204)
        if parts[2:] == ["messages"] and method == "POST":
            ref = (body.get("message_reference") or {}).get("message_id")
            ref = str(ref) if ref is not None else None
            posted = Posted(
                self.new_id(),
                cid,
                body.get("content") or "",
                reference=ref,
                allowed_mentions=body.get("allowed_mentions"),
            )
            self.posted.append(posted)
            return self._json(self._posted_json(posted))
        if len(parts) == 4 and parts[2] == "messages" and method == "PATCH":
            posted = self.find(parts[3])
            posted.edits.append(body.get("content") or "")
            posted.content = body.get("content") or posted.content
            return self._json(self._posted_json(posted))
        if parts[2:] == ["webhooks"] and method == "GET":
            return self._json([h for h in self.webhooks if h["channel_id"] == cid])
        if parts[2:] == ["webhooks"] and method == "POST":
            hook = {
                "id": self.new_id(),
                "type": 1,
                "token": f"wh{self.new_id()}",
                "channel_id": cid,
                "guild_id": GUILD,
                "name": body.get("name"),
                "avatar": None,
                "application_id": APP_ID,
                "user": BOT_USER,
            }
            self.webhooks.append(hook)
            return self._json(hook)
        return self._json({"message": "fake: unknown channel route", "code": 0}, 404)

    async def _webhook_call(
        self, method: str, parts: list[str], body: dict[str, Any], q: Any
    ) -> web.Response:
        hook_id, token = parts[1], parts[2]
        if hook_id == APP_ID:  # interaction follow-ups and original response
            return self._followup(method, parts, body, token)
        hook = next((h for h in self.webhooks if h["id"] == hook_id and h["token"] == token), None)
        if hook is None:
            return self._json({"message": "Unknown Webhook", "code": 10015}, 404)
        thread = q.get("thread_id")
        if method == "POST" and len(parts) == 3:
            posted = Posted(
                self.new_id(),
                hook["channel_id"],
                body.get("content") or "",
                webhook_id=hook_id,
                username=body.get("username"),
                avatar_url=body.get("avatar_url"),
                thread_id=thread,
            )
            self.posted.append(posted)
            return self._json(self._posted_json(posted))
        if method == "DELETE" and parts[3] == "messages":
            posted = self.find(parts[4])
            self.posted.remove(posted)
            self.deleted.append(posted)
            return web.Response(status=204)
        if method == "PATCH" and parts[3] == "messages":
            posted = self.find(parts[4])
            posted.edits.append(body.get("content") or "")
            posted.content = body.get("content") or posted.content
            return self._json(self._posted_json(posted))
        return self._json({"message": "fake: unknown webhook route", "code": 0}, 404)

    def _followup(
        self, method: str, parts: list[str], body: dict[str, Any], token: str
    ) -> web.Response:
        if token in self._interaction_created and token not in self._acknowledged:
            # An interaction never acknowledged has no webhook to follow up on.
            return self._json({"message": "Unknown Webhook", "code": 10015}, 404)
        if method == "POST" and len(parts) == 3:
            posted = Posted(
                self.new_id(),
                self._interaction_channel.get(token, DM_CHANNEL),
                body.get("content") or "",
                interaction=token,
                ephemeral=bool((body.get("flags") or 0) & 64),
            )
            self.posted.append(posted)
            return self._json(self._posted_json(posted))
        target = parts[4]
        found = [p for p in self.responses(token)]
        posted = found[0] if target == "@original" else self.find(target)
        if method == "PATCH":
            posted.edits.append(body.get("content") or "")
            posted.content = (
                body.get("content") if body.get("content") is not None else posted.content
            )
        return self._json(self._posted_json(posted))

    def _interaction_callback(self, parts: list[str], body: dict[str, Any]) -> web.Response:
        iid, token = parts[1], parts[2]
        created = self._interaction_created.get(token)
        if token in self._acknowledged:
            self.double_acks.append(token)
            return self._json(
                {"message": "Interaction has already been acknowledged.", "code": 40060}, 400
            )
        if created is not None and time.monotonic() - created > self.interaction_deadline_s:
            self.late_interactions.append(token)
            return self._json({"message": "Unknown interaction", "code": 10062}, 404)
        self._acknowledged.add(token)
        self.callbacks.append({"token": token, **body})
        data = body.get("data") or {}
        kind = body["type"]
        posted = Posted(
            self.new_id(),
            self._interaction_channel.get(token, DM_CHANNEL),
            data.get("content") or "",
            interaction=token,
            ephemeral=bool((data.get("flags") or 0) & 64),
        )
        self.posted.append(posted)
        return self._json(
            {
                "interaction": {
                    "id": iid,
                    "type": 2,
                    "response_message_id": posted.id,
                    "response_message_loading": kind == 5,
                    "response_message_ephemeral": posted.ephemeral,
                },
                "resource": {"type": kind, "message": self._posted_json(posted)},
            }
        )
