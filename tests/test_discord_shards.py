"""Discord shards: two bot "processes" (two adapters, cores and database connections in this
test) run disjoint shards of one bot against the local Discord server, which routes each
guild's events by ``(guild_id >> 22) % shard_count``.  Nothing is answered twice, live or
when unfinished answers are recovered after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from adapters.discord import DiscordAdapter
from adapters.streaming import StreamLimits
from chat.core import ConversationCore
from chat.settings import PlatformSettings, Settings
from storage import Store, open_database
from storage.records import RECEIVED, USER
from tests.conftest import FixedModels
from tests.fake_discord import CHANNEL_G2, CHANNEL_WORK, DM_CHANNEL, FakeDiscord, user
from tests.scripted import ScriptedModel

ANN = user("11", "Ann")
Start = Callable[[], Any]


@pytest.fixture
async def shards(settings: Settings) -> AsyncIterator[tuple[FakeDiscord, Start]]:
    server = FakeDiscord()
    await server.start()
    running: list[tuple[DiscordAdapter, asyncio.Task[None], Store]] = []

    async def start() -> None:
        await stop()
        for shard in (0, 1):
            store = Store(await open_database(settings.database_url))
            model = ScriptedModel([f"Answered by shard {shard}."])
            core = ConversationCore(settings, store, FixedModels({"office": model}))
            platform = PlatformSettings(
                token="TEST", api_base_url=server.api_url, shard_count=2, shard_ids=(shard,)
            )
            adapter = DiscordAdapter(core, platform, limits=StreamLimits(2000, 0.05, 10))
            running.append((adapter, asyncio.create_task(adapter.start()), store))
        for adapter, _, _ in running:
            await asyncio.wait_for(adapter.recovered.wait(), 30)

    async def stop() -> None:
        for adapter, task, store in running:
            await adapter.stop()
            await asyncio.wait_for(task, 10)
            await store.close()
        running.clear()

    yield server, start
    await stop()
    await server.stop()


def texts(server: FakeDiscord, channel: str) -> list[str]:
    return [p.content for p in server.in_channel(channel)]


async def test_each_guild_is_answered_once_by_the_process_of_its_shard(
    shards: tuple[FakeDiscord, Start],
) -> None:
    server, start = shards
    await start()
    assert sorted(server.shards) == [0, 1]
    await server.say(CHANNEL_WORK, ANN, "hello, first guild", mention_bot=True)
    await server.say(CHANNEL_G2, ANN, "hello, second guild", mention_bot=True)
    await server.say(DM_CHANNEL, ANN, "hello in private")
    await server.wait_for(
        lambda: all(texts(server, c) for c in (CHANNEL_WORK, CHANNEL_G2, DM_CHANNEL))
    )
    await asyncio.sleep(0.5)
    assert texts(server, CHANNEL_WORK) == ["Answered by shard 0."]
    assert texts(server, CHANNEL_G2) == ["Answered by shard 1."]
    assert texts(server, DM_CHANNEL) == ["Answered by shard 0."]  # DMs come on shard 0


async def test_after_a_restart_each_process_recovers_only_its_own_conversations(
    shards: tuple[FakeDiscord, Start], settings: Settings
) -> None:
    server, start = shards
    store = Store(await open_database(settings.database_url))
    try:
        for channel in (CHANNEL_WORK, CHANNEL_G2, DM_CHANNEL):
            conv = await store.conversations.get_or_create("discord", f"discord:{channel}")
            await store.messages.add(
                conv.id,
                USER,
                "answer me after the crash",
                author_id="11",
                author_name="Ann",
                platform_message_id=server.new_id(),
                reply_state=RECEIVED,
            )
    finally:
        await store.close()
    await start()
    await server.wait_for(
        lambda: all(texts(server, c) for c in (CHANNEL_WORK, CHANNEL_G2, DM_CHANNEL))
    )
    await asyncio.sleep(0.5)
    assert texts(server, CHANNEL_WORK) == ["Answered by shard 0."]
    assert texts(server, CHANNEL_G2) == ["Answered by shard 1."]
    assert texts(server, DM_CHANNEL) == ["Answered by shard 0."]
    await start()  # and again: nothing is left, nothing is sent twice
    await asyncio.sleep(0.5)
    assert [len(texts(server, c)) for c in (CHANNEL_WORK, CHANNEL_G2, DM_CHANNEL)] == [1, 1, 1]
