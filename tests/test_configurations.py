"""One black-box flow, through the real composition (``open_app``) and the local Telegram
server, on each deployment: (a) both roles in-process on SQLite, (b) both on llama-server with
PostgreSQL, (c) mixed: the office role on llama-server, the character in-process, SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from adapters.streaming import StreamLimits
from adapters.telegram import TelegramAdapter
from ai_model.config import ModelSettings, SamplingSettings
from bot.app import open_app
from chat.settings import PlatformSettings, Settings
from storage import Store, open_database
from storage.records import ANSWERED, ASSISTANT, USER
from tests.fake_telegram import FakeTelegram
from tests.llama_server import LlamaServer

pytestmark = pytest.mark.model

DM, GROUP = 601, -100300
ANN, BOB = 601, 602
# configuration: (character backend, office backend, database)
CONFIGS = {
    "local-sqlite": ("local", "local", "sqlite"),
    "llama-server-postgresql": ("llama-server", "llama-server", "postgresql"),
    "mixed-sqlite": ("local", "llama-server", "sqlite"),
}


@pytest.fixture(params=list(CONFIGS))
def config(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    return CONFIGS[str(request.param)]


@pytest.fixture
def backend(config: tuple[str, str, str]) -> str:
    return config[2]


def role(backend: str, request: pytest.FixtureRequest) -> ModelSettings:
    sampling = SamplingSettings(max_tokens=32, seed=11)
    if backend == "local":
        return ModelSettings(n_ctx=4096, sampling=sampling)
    server: LlamaServer = request.getfixturevalue("llama_server")
    return ModelSettings(backend=backend, url=server.url, sampling=sampling)


@pytest.fixture
async def run_bot(
    settings: Settings,
    telegram: FakeTelegram,
    config: tuple[str, str, str],
    request: pytest.FixtureRequest,
) -> AsyncIterator[Any]:
    models = {"character": role(config[0], request), "office": role(config[1], request)}
    configured = replace(settings, models=models)

    async def run(steps: Any) -> None:
        """Start the whole bot, run ``steps()``, stop it as a shutdown would."""
        async with open_app(configured) as app:
            platform = PlatformSettings(token="123:TEST", api_base_url=telegram.base_url)
            adapter = TelegramAdapter(
                app.core, platform, poll_timeout=1, limits=StreamLimits(4096, 0.05, 10)
            )
            task = asyncio.create_task(adapter.start())
            try:
                await steps()
            finally:  # as bot.app._serve stops on SIGTERM
                await adapter.stop_intake()
                await app.core.drain(20)
                await adapter.stop()
                await asyncio.wait_for(task, 20)

    yield run


async def test_the_same_flow_on_every_deployment(
    run_bot: Any, telegram: FakeTelegram, settings: Settings
) -> None:
    def replies(chat: int) -> int:
        return len(telegram.bot_messages(chat))

    def group() -> list[Any]:
        return list(telegram.bot_messages(GROUP))

    async def first_run() -> None:
        telegram.push(DM, ANN, "Ann", "/start")
        await telegram.wait_for(lambda: replies(DM) >= 1)
        telegram.push(DM, ANN, "Ann", "What is the capital of France?")
        await telegram.wait_for(lambda: replies(DM) >= 2, 120)
        telegram.admins.add((GROUP, ANN))
        telegram.push(GROUP, ANN, "Ann", "/mode roleplay")
        await telegram.wait_for(lambda: any("Mode set" in m.text for m in group()))
        telegram.push(GROUP, BOB, "Bob", "I walk into the inn.")
        # The scene opens with the character's greeting (unthreaded).
        await telegram.wait_for(lambda: any("Welcome" in m.text for m in group()))
        telegram.push(GROUP, ANN, "Ann", "Mira, two ales please!")  # names the character
        # Threaded replies: the mode command's, then Mira's answer to Ann.
        await telegram.wait_for(lambda: sum(m.reply_to is not None for m in group()) >= 2, 120)

    async def second_run() -> None:  # after a restart, the conversation goes on
        telegram.push(DM, ANN, "Ann", "And of Italy?")
        await telegram.wait_for(lambda: replies(DM) >= 3, 120)

    try:
        await run_bot(first_run)
        await run_bot(second_run)
    finally:
        for chat in (DM, GROUP):
            print(chat, [(m.text[:60], m.reply_to) for m in telegram.bot_messages(chat)])
    assert "office assistant" in telegram.bot_messages(DM)[0].text
    assert all(m.text.strip() for m in telegram.bot_messages(DM) + telegram.bot_messages(GROUP))
    await asyncio.sleep(0.3)
    store = Store(await open_database(settings.database_url))
    try:
        dm = await store.conversations.get_or_create("telegram", f"telegram:{DM}")
        history = await store.messages.history(dm.id)
        users = [m for m in history if m.role == USER and not m.text.startswith("/")]
        assert [m.text for m in users] == ["What is the capital of France?", "And of Italy?"]
        assert [m.reply_state for m in users] == [ANSWERED, ANSWERED]
        answers = [m for m in history if m.role == ASSISTANT]
        assert len(answers) == 2 and all(m.delivered for m in answers)
        group = await store.conversations.get_or_create("telegram", f"telegram:{GROUP}")
        scene = [m for m in await store.messages.history(group.id) if m.role == ASSISTANT]
        assert scene and all(m.delivered is not False for m in scene)
    finally:
        await store.close()
