"""Wiring: settings → models → database → core → adapters, and an orderly shutdown."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from adapters.base import Adapter
from ai_model.registry import ModelRegistry
from bot.core import ConversationCore
from bot.settings import Settings
from storage import Store, open_database

log = logging.getLogger(__name__)


@dataclass(slots=True)
class App:
    settings: Settings
    models: ModelRegistry
    store: Store
    core: ConversationCore


@asynccontextmanager
async def open_app(settings: Settings, models: ModelRegistry | None = None) -> AsyncIterator[App]:
    """Everything the adapters need, closed again on exit.

    Model files are checked before the database is touched, so a missing file stops start-up
    with its own message (raised as ``ModelFileMissing``).
    """
    registry = models or ModelRegistry(settings.models)
    for line in registry.describe():
        log.info("%s", line)
    store = Store(await open_database(settings.database_url))
    try:
        yield App(settings, registry, store, ConversationCore(settings, store, registry))
    finally:
        await store.close()
        registry.close()


async def run_console(settings: Settings) -> None:
    from adapters.console import ConsoleAdapter

    async with open_app(settings) as app:
        await ConsoleAdapter(app.core, sys.stdin, sys.stdout).start()


async def run_platforms(settings: Settings) -> None:
    """Run every platform with a token in the environment; the console when there is none."""
    if not any(settings.platform(name).token for name in ("discord", "telegram")):
        log.info("no DISCORD_TOKEN or TELEGRAM_BOT_TOKEN set: opening the console chat")
        await run_console(settings)
        return
    async with open_app(settings) as app:
        adapters: list[Adapter] = []
        if settings.platform("telegram").token:
            from adapters.telegram import TelegramAdapter

            adapters.append(TelegramAdapter(app.core, settings.platform("telegram")))
        if settings.platform("discord").token:
            log.error("DISCORD_TOKEN is set, but this build has no Discord adapter yet")
        if not adapters:
            return
        try:
            async with asyncio.TaskGroup() as group:
                for adapter in adapters:
                    group.create_task(adapter.start())
        finally:
            for adapter in adapters:
                await adapter.stop()
