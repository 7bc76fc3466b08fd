"""A Bot-API-compatible server on 127.0.0.1 for driving python-telegram-bot end to end.

It implements the methods the adapter uses (getMe, setWebhook and deleteWebhook with delivery by
POST as tests/fake_webhook.py describes, getUpdates with long polling,
sendMessage, editMessageText, sendChatAction, setMyCommands, getChatMember), validates HTML the
way Telegram does, and can be told to answer the next call of a method with "can't parse
entities" or a 429 flood-control error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from aiohttp import web

from tests.fake_webhook import WebhookSender
from tests.waiting import wait_until

BOT = {
    "id": 777,
    "is_bot": True,
    "first_name": "Lantern",
    "username": "lantern_bot",
    "can_join_groups": True,
    "can_read_all_group_messages": False,
    "supports_inline_queries": False,
}
ALLOWED_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "code", "pre", "a"}


class _HtmlCheck(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.error: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ALLOWED_TAGS:
            self.error = f'unsupported start tag "{tag}"'
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.error = f'unexpected end tag "{tag}"'


def html_error(text: str) -> str | None:
    checker = _HtmlCheck()
    checker.feed(text)
    checker.close()
    if checker.error is None and checker.stack:
        return f'unclosed tag "{checker.stack[-1]}"'
    return checker.error


@dataclass
class SentMessage:
    chat_id: int
    message_id: int
    text: str
    parse_mode: str | None
    reply_to: int | None
    edits: list[str] = field(default_factory=list)
    entities: list[dict[str, Any]] = field(default_factory=list)


class FakeTelegram:
    """The server state, its fault switches, and helpers to push user updates."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []
        self.new_update = asyncio.Event()
        self.sent: list[SentMessage] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.commands: list[dict[str, Any]] = []
        self.admins: set[tuple[int, int]] = set()  # (chat id, user id)
        # method -> "parse" | "flood" | "error" | "bad_gateway" (a 502, as from Telegram's edge)
        self.fail_next: dict[str, str] = {}
        self.too_long: list[tuple[str, int]] = []  # (method, length) of refused long texts
        # An outage: these methods answer 500 until down_until (time.monotonic()).
        self.down_methods = {"sendMessage", "editMessageText"}
        self.down_until = 0.0
        # "500": refused at once; "mixed": every other call hangs past the client's timeout.
        self.down_kind = "500"
        self._down_calls = 0
        self.files: dict[str, bytes] = {}  # file_id -> content, for getFile and downloads
        self.flood_retry_after = 1
        self.member_delay_s = 0.0  # getChatMember answers this late (a slow network)
        self._next_update = 1
        self.confirmed = 0
        self.deleted: list[SentMessage] = []
        self._next_message = 1000
        self._runner: web.AppRunner | None = None
        self.port = 0
        # setWebhook: updates are POSTed to the bot instead (tests/fake_webhook.py).
        self.webhook = WebhookSender(self._unconfirmed)

    # -- test helpers ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    def push(
        self,
        chat_id: int,
        user_id: int,
        name: str,
        text: str | None = None,
        *,
        chat_type: str | None = None,
        reply_to: int | None = None,
        extra: dict[str, Any] | None = None,
        kind: str = "message",
    ) -> int:
        """Queue an update from a user; returns the user's message id."""
        message_id = self._next_message
        self._next_message += 1
        chat_type = chat_type or ("private" if chat_id > 0 else "supergroup")
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = name
        else:
            chat["title"] = "Scene"
        message: dict[str, Any] = {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": chat,
            "from": {"id": user_id, "is_bot": False, "first_name": name},
        }
        if text is not None and extra and "document" in extra:
            message["caption"] = text
        elif text is not None:
            message["text"] = text
            entities = []
            if text.startswith("/"):
                entities.append(
                    {"type": "bot_command", "offset": 0, "length": len(text.split()[0])}
                )
            handle = "@" + BOT["username"]
            if handle in text:
                entities.append(
                    {"type": "mention", "offset": text.index(handle), "length": len(handle)}
                )
            if entities:
                message["entities"] = entities
        if reply_to is not None:
            original = next(m for m in self.sent if m.message_id == reply_to)
            message["reply_to_message"] = {
                "message_id": reply_to,
                "date": int(time.time()),
                "chat": chat,
                "from": BOT,
                "text": original.text,
            }
        message.update(extra or {})
        self.updates.append({"update_id": self._next_update, kind: message})
        self._next_update += 1
        self.new_update.set()
        return message_id

    def edit(self, chat_id: int, user_id: int, name: str, message_id: int, text: str) -> None:
        """The user edits an earlier message of theirs (an ``edited_message`` update)."""
        update = next(
            u for u in self.updates if u.get("message", {}).get("message_id") == message_id
        )
        message = {**update["message"], "text": text, "edit_date": int(time.time())}
        message.pop("entities", None)
        self.updates.append({"update_id": self._next_update, "edited_message": message})
        self._next_update += 1
        self.new_update.set()

    def redeliver(self, message_id: int) -> None:
        """Deliver a user message again under a new update id (as after a lost confirmation)."""
        update = next(
            u for u in self.updates if u.get("message", {}).get("message_id") == message_id
        )
        self.updates.append({**update, "update_id": self._next_update})
        self._next_update += 1
        self.new_update.set()

    def bot_messages(self, chat_id: int) -> list[SentMessage]:
        return [m for m in self.sent if m.chat_id == chat_id]

    @property
    def last_update_id(self) -> int:
        return self._next_update - 1

    def methods(self) -> list[str]:
        return [name for name, _ in self.calls]

    async def wait_for(self, predicate: Any, within: float = 60.0) -> None:
        await wait_until(predicate, within)

    # -- server ---------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def _unconfirmed(self) -> list[dict[str, Any]]:
        return [u for u in self.updates if u["update_id"] > self.confirmed]

    async def stop(self) -> None:
        await self.webhook.delete()
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _ok(result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})

    @staticmethod
    def _error(code: int, description: str, **params: Any) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
        if params:
            body["parameters"] = params
        return web.json_response(body, status=code)

    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            return dict(await request.json())
        form = await request.post()
        params: dict[str, Any] = {}
        for key, value in form.items():
            text = str(value)
            try:
                params[key] = json.loads(text)
            except ValueError:
                params[key] = text
        return params

    def _message_json(self, m: SentMessage) -> dict[str, Any]:
        chat_type = "private" if m.chat_id > 0 else "supergroup"
        return {
            "message_id": m.message_id,
            "date": int(time.time()),
            "chat": {"id": m.chat_id, "type": chat_type},
            "from": BOT,
            "text": m.text,
        }

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._params(request)
        if method != "getUpdates":
            self.calls.append((method, params))
        if method in self.down_methods and time.monotonic() < self.down_until:
            self._down_calls += 1
            if self.down_kind == "mixed" and self._down_calls % 2:
                await asyncio.sleep(max(0.0, self.down_until - time.monotonic()))
                return self._error(504, "Gateway Timeout: forced outage")
            return self._error(500, "Internal Server Error: forced outage")
        fault = self.fail_next.get(method)
        if fault == "error":
            del self.fail_next[method]
            return self._error(400, "Bad Request: forced failure")
        if fault == "bad_gateway":
            del self.fail_next[method]
            return self._error(502, "Bad Gateway")
        if fault == "flood":
            del self.fail_next[method]
            return self._error(
                429,
                f"Too Many Requests: retry after {self.flood_retry_after}",
                retry_after=self.flood_retry_after,
            )
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return self._error(404, f"Not Found: method {method} not implemented by the fake")
        return await handler(params)  # type: ignore[no-any-return]

    async def _download(self, request: web.Request) -> web.Response:
        file_id = request.match_info["path"].rsplit("/", 1)[-1]
        if file_id not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[file_id])

    async def _m_getFile(self, p: dict[str, Any]) -> web.Response:
        file_id = str(p["file_id"])
        if file_id not in self.files:
            return self._error(400, "Bad Request: invalid file_id")
        if len(self.files[file_id]) > 20 * 1024 * 1024:  # the Bot API serves 20 MB at most
            return self._error(400, "Bad Request: file is too big")
        return self._ok(
            {
                "file_id": file_id,
                "file_unique_id": f"u{file_id}",
                "file_size": len(self.files[file_id]),
                "file_path": f"documents/{file_id}",
            }
        )

    async def _m_getMe(self, _p: dict[str, Any]) -> web.Response:
        return self._ok(BOT)

    async def _m_deleteWebhook(self, p: dict[str, Any]) -> web.Response:
        if p.get("drop_pending_updates"):
            self.confirmed = self.last_update_id
        await self.webhook.delete()
        return self._ok(True)

    async def _m_setWebhook(self, p: dict[str, Any]) -> web.Response:
        url = str(p.get("url") or "")
        if not url.startswith("https://"):
            return self._error(400, "Bad Request: bad webhook: HTTPS url must be provided")
        await self.webhook.set(url, p.get("secret_token"), p.get("max_connections"))
        return self._ok(True)

    async def _m_setMyCommands(self, p: dict[str, Any]) -> web.Response:
        self.commands = list(p["commands"])
        return self._ok(True)

    async def _m_sendChatAction(self, _p: dict[str, Any]) -> web.Response:
        return self._ok(True)

    async def _m_getChatMember(self, p: dict[str, Any]) -> web.Response:
        chat_id, user_id = int(p["chat_id"]), int(p["user_id"])
        if self.member_delay_s:
            await asyncio.sleep(self.member_delay_s)
        status = "administrator" if (chat_id, user_id) in self.admins else "member"
        member: dict[str, Any] = {
            "status": status,
            "user": {"id": user_id, "is_bot": False, "first_name": "U"},
        }
        if status == "administrator":
            member.update(
                can_be_edited=False,
                is_anonymous=False,
                can_manage_chat=True,
                can_delete_messages=True,
                can_manage_video_chats=True,
                can_restrict_members=True,
                can_promote_members=False,
                can_change_info=True,
                can_invite_users=True,
                can_post_stories=False,
                can_edit_stories=False,
                can_delete_stories=False,
            )
        return self._ok(member)

    async def _m_getUpdates(self, p: dict[str, Any]) -> web.Response:
        if self.webhook.active:  # as Telegram: one way of receiving at a time
            return self._error(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        offset = int(p.get("offset") or 0)
        self.confirmed = max(self.confirmed, offset - 1)  # updates the bot has acknowledged
        timeout = float(p.get("timeout") or 0)
        deadline = time.monotonic() + timeout
        while True:
            # As Telegram: without an offset, what follows the last confirmed update.
            pending = [
                u
                for u in self.updates
                if u["update_id"] > max(offset - 1, self.confirmed)
                and u["update_id"] not in self.webhook.acked
            ]
            if pending or time.monotonic() >= deadline:
                return self._ok(pending[: int(p.get("limit") or 100)])
            self.new_update.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.new_update.wait(), deadline - time.monotonic())

    def _check_text(self, method: str, text: str, parse_mode: str | None) -> web.Response | None:
        if not text.strip():
            return self._error(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            self.too_long.append((method, len(text)))
            return self._error(400, "Bad Request: message is too long")
        if parse_mode:
            if self.fail_next.get(method) == "parse":
                del self.fail_next[method]
                return self._error(400, "Bad Request: can't parse entities: forced by the test")
            if parse_mode.upper() == "HTML" and (problem := html_error(text)):
                return self._error(400, f"Bad Request: can't parse entities: {problem}")
        return None

    async def _m_sendMessage(self, p: dict[str, Any]) -> web.Response:
        text, parse_mode = str(p["text"]), p.get("parse_mode")
        if (problem := self._check_text("sendMessage", text, parse_mode)) is not None:
            return problem
        reply = p.get("reply_parameters") or {}
        entities = p.get("entities") or []
        units = len(text.encode("utf-16-le")) // 2  # Telegram counts UTF-16 code units
        for entity in entities:
            start, length = int(entity.get("offset", -1)), int(entity.get("length", 0))
            if start < 0 or length < 1 or start + length > units:
                return self._error(400, "Bad Request: can't parse entities: entity out of text")
            if entity.get("type") == "text_mention" and not (entity.get("user") or {}).get("id"):
                return self._error(400, "Bad Request: can't parse entities: user is missing")
        message = SentMessage(
            int(p["chat_id"]),
            self._next_message,
            text,
            parse_mode,
            reply.get("message_id"),
            entities=list(entities),
        )
        self._next_message += 1
        self.sent.append(message)
        return self._ok(self._message_json(message))

    async def _m_deleteMessage(self, p: dict[str, Any]) -> web.Response:
        found = [m for m in self.sent if m.message_id == int(p["message_id"])]
        if not found:
            return self._error(400, "Bad Request: message to delete not found")
        self.sent.remove(found[0])
        self.deleted.append(found[0])
        return self._ok(True)

    async def _m_editMessageText(self, p: dict[str, Any]) -> web.Response:
        text, parse_mode = str(p["text"]), p.get("parse_mode")
        if (problem := self._check_text("editMessageText", text, parse_mode)) is not None:
            return problem
        found = [m for m in self.sent if m.message_id == int(p["message_id"])]
        if not found:
            return self._error(400, "Bad Request: message to edit not found")
        message = found[0]
        if message.text == text and message.parse_mode == parse_mode:
            return self._error(400, "Bad Request: message is not modified")
        message.edits.append(text)
        message.text, message.parse_mode = text, parse_mode
        return self._ok(self._message_json(message))
