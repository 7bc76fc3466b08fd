"""What an operator watches: ``/healthz``, ``/readyz`` and ``/metrics`` on one HTTP listener.

Off unless ``[bot] metrics_listen`` names a host and port.  ``/metrics`` is the Prometheus text
format of the engine's counters (:mod:`chat.metrics`) and of each loaded model's queue,
sequences and prompt-token totals, read at each scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adapters.base import Adapter
from ai_model.registry import ModelRegistry
from chat.metrics import Metrics
from chat.settings import host_port
from storage.store import STORAGE_ERRORS, Store

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 2.0  # a database slower than this to answer "SELECT 1" is not ready


class ModelCollector(Collector):
    """The loaded models' figures, by the roles each serves (``character+office`` when one
    model serves both)."""

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        labels = ["model"]
        queued = GaugeMetricFamily(
            "localbot_model_queued", "Requests waiting for a sequence.", labels=labels
        )
        busy = GaugeMetricFamily(
            "localbot_model_busy_sequences", "Sequences generating now.", labels=labels
        )
        parked = GaugeMetricFamily(
            "localbot_model_parked_states", "Conversation states parked in RAM.", labels=labels
        )
        reused = CounterMetricFamily(
            "localbot_prompt_tokens_reused", "Prompt tokens found in the cache.", labels=labels
        )
        computed = CounterMetricFamily(
            "localbot_prompt_tokens_computed", "Prompt tokens evaluated.", labels=labels
        )
        for name, usage in self.models.usage().items():
            queued.add_metric([name], usage.queued)
            busy.add_metric([name], usage.busy)
            parked.add_metric([name], usage.parked)
            reused.add_metric([name], usage.prompt_reused)
            computed.add_metric([name], usage.prompt_computed)
        yield from (queued, busy, parked, reused, computed)


class Operations:
    """The listener, its three routes, and the models' warm-up that readiness waits for."""

    def __init__(
        self,
        listen: str,
        *,
        metrics: Metrics,
        models: ModelRegistry,
        store: Store,
        adapters: Sequence[Adapter],
    ) -> None:
        self.host, self.port, _ = host_port(listen, "[bot] metrics_listen")
        self.metrics = metrics
        self.models = models
        self.store = store
        self.adapters = adapters
        self._runner: web.AppRunner | None = None
        self._warming: asyncio.Task[None] | None = None
        metrics.registry.register(ModelCollector(models))

    async def start(self) -> None:
        """Listen, and load the models now rather than at the first message."""
        web_app = web.Application()
        web_app.router.add_get("/healthz", self._healthz)
        web_app.router.add_get("/readyz", self._readyz)
        web_app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(web_app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:  # the port is taken: the bot still runs, unwatched
            log.error("metrics: cannot listen on %s:%d: %s", self.host, self.port, exc)
            return
        log.info("metrics: /healthz, /readyz and /metrics on http://%s:%d", self.host, self.port)
        self._warming = asyncio.create_task(self._warm())

    async def stop(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warming
        if self._runner is not None:
            await self._runner.cleanup()

    async def _warm(self) -> None:
        for role in self.models.resolved:
            try:
                await self.models.get(role)
            except Exception as exc:  # readiness says so; the first message retries the load
                log.error("metrics: could not load the %s model: %s", role, exc)

    async def readiness(self) -> dict[str, str]:
        """Each check and its state: "ok", or what is wrong."""
        checks: dict[str, str] = {}
        for role in self.models.resolved:
            loaded = self.models.loaded(role)
            checks[f"model:{role}"] = "ok" if loaded else "not loaded yet"
        try:
            await asyncio.wait_for(self.store.ping(), PING_TIMEOUT_S)
            checks["database"] = "ok"
        except TimeoutError:
            checks["database"] = f"no answer within {PING_TIMEOUT_S:.0f}s"
        except STORAGE_ERRORS as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
        for adapter in self.adapters:
            checks[f"platform:{adapter.name}"] = "ok" if adapter.connected else "not connected"
        return checks

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        checks = await self.readiness()
        ready = all(state == "ok" for state in checks.values())
        body = "".join(f"{name}: {state}\n" for name, state in checks.items())
        return web.Response(text=body, status=200 if ready else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
