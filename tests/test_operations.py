"""Health, readiness and metrics while both platforms run on the embedded model: the figures
of a scrape follow the messages of the flow."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bot.app import run_platforms
from chat.access import REFUSED as ACCESS_NOTICE
from chat.settings import parse_settings
from tests.fake_discord import DM_CHANNEL, FakeDiscord, user
from tests.fake_telegram import FakeTelegram
from tests.waiting import free_port, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: aiohttp.ClientSession, base: str) -> Samples:
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def status(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as response:
        return response.status, await response.text()


async def test_a_scrape_during_the_flow_counts_its_messages(tmp_path: Path) -> None:
    discord_server, telegram_server = FakeDiscord(), FakeTelegram()
    await discord_server.start()
    await telegram_server.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    short = {"sampling": {"max_tokens": 12, "seed": 3}}
    settings = parse_settings(
        {
            "bot": {"metrics_listen": f"127.0.0.1:{port}"},
            "models": {"office": short, "character": short},
            "access": {"block_users": ["telegram:666"]},
        },
        env={
            "DISCORD_TOKEN": "d",
            "DISCORD_API_BASE_URL": discord_server.api_url,
            "TELEGRAM_BOT_TOKEN": "1:t",
            "TELEGRAM_BASE_URL": telegram_server.base_url,
        },
    )
    settings = replace(settings, database_url=f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    task = asyncio.create_task(run_platforms(settings))
    async with aiohttp.ClientSession() as http:
        try:
            await wait_until(lambda: task.done() or port_open(port), within=30)
            assert await status(http, f"{base}/healthz") == (200, "ok\n")
            ready = [0]

            async def poll_ready() -> None:
                while ready[0] != 200:
                    ready[0] = (await status(http, f"{base}/readyz"))[0]
                    await asyncio.sleep(0.2)

            await asyncio.wait_for(poll_ready(), 60)  # models loaded, database, both platforms
            before = await scrape(http, base)
            assert value(before, "localbot_messages_received_total", platform="telegram") == 0

            await discord_server.say(DM_CHANNEL, user("11", "Ann"), "Hello from Discord")
            telegram_server.push(501, 501, "Bob", "Hello from Telegram")
            telegram_server.push(666, 666, "Eve", "Let me in")  # blocked: no answer, no model
            await discord_server.wait_for(lambda: discord_server.in_channel(DM_CHANNEL))
            await telegram_server.wait_for(lambda: telegram_server.bot_messages(501))
            await asyncio.sleep(0.5)

            after = await scrape(http, base)
            assert value(after, "localbot_messages_received_total", platform="discord") == 1
            assert value(after, "localbot_messages_received_total", platform="telegram") == 2
            for platform in ("discord", "telegram"):
                answered = value(
                    after, "localbot_messages_answered_total", platform=platform, role="office"
                )
                assert answered == 1
            refused = value(
                after, "localbot_messages_refused_total", platform="telegram", reason="access"
            )
            assert refused == 1
            # The stranger's DM got the one short notice, and no answer.
            assert [m.text for m in telegram_server.bot_messages(666)] == [ACCESS_NOTICE]
            assert value(after, "localbot_tokens_generated_total", role="office") >= 2
            assert value(after, "localbot_first_token_seconds_count", role="office") == 2
            assert value(after, "localbot_reply_seconds_count", role="office") == 2
            assert value(after, "localbot_queue_depth") == 0
            # One model serves both roles; both prompts were evaluated by it.
            model = "character+office"
            computed = value(after, "localbot_prompt_tokens_computed_total", model=model)
            assert computed > value(before, "localbot_prompt_tokens_computed_total", model=model)
            assert value(after, "localbot_model_busy_sequences", model=model) == 0

            # Telegram goes away: the bot is no longer ready, and says why.
            await telegram_server.stop()

            async def poll_unready() -> tuple[int, str]:
                for _ in range(300):
                    found = await status(http, f"{base}/readyz")
                    if found[0] != 200:
                        return found
                    await asyncio.sleep(0.2)
                raise AssertionError("still ready without Telegram")

            code, body = await asyncio.wait_for(poll_unready(), 60)
            assert code == 503 and "platform:telegram: not connected" in body
            assert "database: ok" in body and "platform:discord: ok" in body
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
            await discord_server.stop()
            await telegram_server.stop()


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
