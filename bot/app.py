"""Wiring: settings → models → database → core → adapters, and an orderly shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from adapters.base import Adapter
from ai_model.registry import ModelRegistry
from bot.operations import Operations
from bot.shutdown import Shutdown
from chat.core import ConversationCore
from chat.faults import KillPoints
from chat.roleplay.cards import export_card, parse_card_bytes
from chat.roleplay.characters import CardError
from chat.settings import Settings
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
    await warn_of_memory(registry)
    try:
        await registry.connect()  # a remote engine that is down stops start-up here
    except BaseException:
        await registry.aclose()
        raise
    store = Store(await open_database(settings.database_url))
    try:
        # The crash tests' kill points (chat.faults): inert unless LOCALBOT_KILL_AT is set.
        core = ConversationCore(
            settings, store, registry, kill_points=KillPoints.from_env(os.environ)
        )
        await core.library.load()
        try:
            yield App(settings, registry, store, core)
        finally:
            await core.memory.close()  # background summaries stop before the models close
    finally:
        await store.close()
        await registry.aclose()


async def warn_of_memory(registry: ModelRegistry) -> None:
    """One warning line when the models will not fit (``python -m bot check`` says more)."""
    from ai_model.base import ModelError
    from ai_model.memory_plan import available_ram, verdicts

    try:
        plans = await asyncio.to_thread(registry.memory_plans)
    except (ModelError, OSError) as exc:
        log.warning("memory plan: %s", exc)
        return
    for fits, line in verdicts(plans, available_ram()):
        if not fits:
            log.warning("%s (python -m bot check shows the plan)", line)


async def run_console(settings: Settings) -> None:
    from adapters.console import ConsoleAdapter

    async with open_app(settings) as app:
        await ConsoleAdapter(app.core, sys.stdin, sys.stdout).start()


async def run_platforms(settings: Settings, shutdown: Shutdown | None = None) -> None:
    """Run every platform with a token in the environment; the console when there is none.

    ``shutdown`` may have caught a stop signal already (installed before the loop started).
    """
    if not settings.chat_platforms:
        log.info("no DISCORD_TOKEN or TELEGRAM_BOT_TOKEN set: opening the console chat")
        await run_console(settings)
        return
    async with open_app(settings) as app:
        adapters: list[Adapter] = []
        if settings.platform("telegram").token:
            from adapters.telegram import TelegramAdapter

            adapters.append(TelegramAdapter(app.core, settings.platform("telegram")))
        if settings.platform("discord").token:
            from adapters.discord import DiscordAdapter

            adapters.append(DiscordAdapter(app.core, settings.platform("discord")))
        if not adapters:
            return
        await _serve(app, adapters, shutdown or Shutdown())


async def _serve(app: App, adapters: list[Adapter], shutdown: Shutdown) -> None:
    """Run the adapters until they end or a stop signal asks for a graceful stop."""
    shutdown.install()
    operations = None
    if app.settings.metrics_listen:
        operations = Operations(
            app.settings.metrics_listen,
            metrics=app.core.metrics,
            models=app.models,
            store=app.store,
            adapters=adapters,
        )
        await operations.start()
    running = [asyncio.create_task(adapter.start()) for adapter in adapters]
    stop = asyncio.create_task(shutdown.requested.wait())
    try:
        await asyncio.wait([*running, stop], return_when=asyncio.FIRST_COMPLETED)
        if stop.done():
            for adapter in adapters:
                await adapter.stop_intake()
            grace = app.settings.shutdown_grace_s
            left = await app.core.drain(grace)
            if left:
                log.warning("%d conversation(s) still answering after %ss: stopping", left, grace)
            else:
                log.info("answers in flight finished")
    finally:
        stop.cancel()
        for adapter in adapters:
            await adapter.stop()
        results = await asyncio.gather(*running, return_exceptions=True)
        if operations is not None:
            await operations.stop()
        shutdown.uninstall()
    for result in results:
        if isinstance(result, Exception):
            raise result


async def library_command(
    settings: Settings,
    kind: str,
    action: str,
    name: str,
    path: str,
    data: bytes = b"",
    replace: bool = False,
) -> int:
    """``python -m bot character import|export|list`` and ``lorebook import``.

    ``data`` is the file to import, read by the caller (blocking I/O stays off the loop).  The
    command line is the machine's owner: it may import and replace (``replace``) characters.
    Only the character model's vocabulary is loaded, to check a card's size in tokens.
    """
    store = Store(await open_database(settings.database_url))
    models = ModelRegistry(settings.models, vocab_only=True)
    try:
        core = ConversationCore(settings, store, models)
        await core.library.load()
        if action == "list":
            for char in core.characters.all():
                summary = " ".join(char.description.split())[:70]
                print(f"{char.name}: {summary}")
        elif action == "import" and kind == "character":
            card = parse_card_bytes(data, Path(path).name)
            imported = await core.library.import_card(card, replace=replace)
            verb = "replaced" if imported.replaced else "imported"
            print(f"{verb} {imported.character.name}")
        elif action == "import":
            parsed = parse_card_bytes(data, Path(path).name)
            inner = parsed.get("data", parsed)
            book = inner.get("character_book", inner) if isinstance(inner, dict) else parsed
            lore = await core.library.import_world_book(Path(path).stem, book)
            print(f"imported world book {Path(path).stem} ({len(lore.entries)} entries)")
        elif action == "export":
            found = core.characters.find(name)
            if found is None:
                print(f"error: no character called {name}", file=sys.stderr)
                return 2
            await asyncio.to_thread(export_card, found, path)
            print(f"exported {found.name} to {path}")
        return 0
    except CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        await store.close()
        await models.aclose()
