"""The fake Bot API server's webhook side: it POSTs updates the way Telegram does.

Once ``setWebhook`` is called, each update not yet acknowledged is POSTed to the webhook
(``forward_to`` stands for the TLS proxy in front of the bot: the fake posts to that address,
with the webhook URL's path) with the secret header.  Only a 2xx answer acknowledges it; a
non-2xx answer, a refused connection or no answer within ``timeout_s`` gets it delivered again
after ``retry_s``, as Telegram does.  Up to ``max_connections`` updates are in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


@dataclass(frozen=True, slots=True)
class Delivery:
    update_id: int
    status: int | None  # None: no answer in time, or no connection


class WebhookSender:
    """Delivers ``pending()`` updates to the webhook until it is deleted."""

    def __init__(self, pending: Callable[[], list[dict[str, Any]]]) -> None:
        self._pending = pending
        self.url: str | None = None
        self.secret: str | None = None
        self.forward_to = ""  # "http://127.0.0.1:<port>": where the proxy would forward
        self.send_secret: str | None = None  # a test may post with another secret (or none)
        self.timeout_s = 5.0
        self.retry_s = 0.3
        self.max_connections = 40
        self.acked: set[int] = set()
        self.deliveries: list[Delivery] = []
        self._in_flight: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def active(self) -> bool:
        return self.url is not None

    def target(self) -> str:
        assert self.url is not None
        return self.forward_to + (urlsplit(self.url).path or "/")

    async def set(self, url: str, secret: str | None, max_connections: int | None) -> None:
        await self.delete()
        self.url, self.secret = url, secret
        if max_connections:
            self.max_connections = int(max_connections)
        self._session = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run())

    async def delete(self) -> None:
        self.url = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._in_flight.clear()

    async def _run(self) -> None:
        jobs: set[asyncio.Task[None]] = set()
        try:
            while True:
                for update in self._pending():
                    uid = update["update_id"]
                    if uid in self.acked or uid in self._in_flight:
                        continue
                    if len(self._in_flight) >= self.max_connections:
                        break
                    self._in_flight.add(uid)
                    job = asyncio.create_task(self._deliver(update))
                    jobs.add(job)
                    job.add_done_callback(jobs.discard)
                await asyncio.sleep(0.05)
        finally:
            for job in jobs:
                job.cancel()

    async def _deliver(self, update: dict[str, Any]) -> None:
        uid = update["update_id"]
        assert self._session is not None
        secret = self.send_secret if self.send_secret is not None else self.secret
        headers = {SECRET_HEADER: secret} if secret else {}
        status: int | None = None
        try:
            async with self._session.post(
                self.target(),
                json=update,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as response:
                status = response.status
        except (TimeoutError, aiohttp.ClientError):
            status = None
        self.deliveries.append(Delivery(uid, status))
        if status is not None and 200 <= status < 300:
            self.acked.add(uid)
        else:
            await asyncio.sleep(self.retry_s)
        self._in_flight.discard(uid)
