"""Telegram updates by webhook: Telegram POSTs each update to ``webhook_url``, which a TLS proxy
forwards to ``listen``.

The update is answered only once it is settled (its message stored, or its command handled), so
an update the bot could not store is delivered again by Telegram: the webhook's equivalent of
the poller asking for the next offset only then.  python-telegram-bot's own webhook server
answers as soon as the update is queued, before any handler ran, so it cannot give that
guarantee; this listener uses PTB for everything else (``setWebhook`` with the secret token,
``deleteWebhook``, parsing the update).

A request without Telegram's secret header, or with a wrong one, gets 403 and is not read.  An
update delivered again while its first delivery is still being stored waits for that one; one
delivered again later is recognised by its message id and skipped, as after polling.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from aiohttp import web
from telegram import Bot, Update
from telegram.error import TelegramError

from adapters.telegram.api import STORE_WAIT_S, retrying

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_UPDATE_BYTES = 1 << 20  # an update is a few kilobytes; a larger body is no update
MAX_CONNECTIONS = 40  # Telegram's default: updates it may have in flight at once


class Webhook:
    """The listener and the webhook's registration."""

    def __init__(
        self,
        bot: Bot,
        url: str,
        listen: tuple[str, int],
        secret: str,
        handle: Callable[[Update], None],
    ) -> None:
        self.bot = bot
        self.url = url
        self.host, self.port = listen
        self.path = urlsplit(url).path or "/"
        self._secret = secret.encode()
        self._handle = handle  # starts handling an update (synchronously: arrival order)
        self._settled: dict[int, asyncio.Future[None]] = {}
        self._runner: web.AppRunner | None = None
        self._taking = False

    @property
    def running(self) -> bool:
        return self._taking

    async def start(self) -> None:
        """Listen first, then ask Telegram to deliver here (updates queued meanwhile wait)."""
        app = web.Application(client_max_size=MAX_UPDATE_BYTES)
        app.router.add_post(self.path, self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self._taking = True
        await retrying(
            lambda: self.bot.set_webhook(
                self.url,
                secret_token=self._secret.decode(),
                allowed_updates=Update.ALL_TYPES,
                max_connections=MAX_CONNECTIONS,
            )
        )
        log.info("telegram: webhook %s, listening on %s:%d", self.url, self.host, self.port)

    def settle(self, update_id: int) -> None:
        done = self._settled.pop(update_id, None)
        if done is not None and not done.done():
            done.set_result(None)

    async def stop(self) -> None:
        """Take no more updates (later deliveries get 503: Telegram keeps them for the next
        start); the webhook stays registered, so another instance may go on serving it."""
        self._taking = False
        if self._settled:  # answers waiting for storage get it, briefly
            await asyncio.wait(list(self._settled.values()), timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _post(self, request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, self._secret):
            log.warning("telegram: a webhook request without the right secret was refused")
            return web.Response(status=403)
        if not self._taking:
            return web.Response(status=503)  # stopping: Telegram delivers it again later
        try:
            update = Update.de_json(json.loads(await request.read()), self.bot)
            if update is None:
                raise ValueError("an empty update")
        except (ValueError, TypeError, KeyError, TelegramError) as exc:
            log.warning("telegram: a webhook request was no update: %s", exc)
            return web.Response(status=400)
        done = self._settled.get(update.update_id)
        if done is None:
            done = self._settled[update.update_id] = asyncio.get_running_loop().create_future()
            self._handle(update)
        else:  # Telegram gave up waiting and sent it again: answer when the first is stored
            log.info("telegram: update %d delivered again while it is stored", update.update_id)
        try:
            await asyncio.wait_for(asyncio.shield(done), STORE_WAIT_S)
        except TimeoutError:
            log.warning(
                "telegram: update %d not stored after %.0fs", update.update_id, STORE_WAIT_S
            )
        return web.Response(text="ok")
