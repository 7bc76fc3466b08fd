"""Both platforms in one process, as `python -m bot run` starts them with both tokens set."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from pathlib import Path

from bot.app import run_platforms
from chat.settings import parse_settings
from tests.fake_discord import DM_CHANNEL, FakeDiscord, user
from tests.fake_telegram import FakeTelegram


async def test_discord_and_telegram_run_together_on_the_embedded_model(tmp_path: Path) -> None:
    discord_server, telegram_server = FakeDiscord(), FakeTelegram()
    await discord_server.start()
    await telegram_server.start()
    short = {"sampling": {"max_tokens": 16, "seed": 3}}
    settings = parse_settings(
        {"models": {"office": short, "character": short}},
        env={
            "DISCORD_TOKEN": "d",
            "DISCORD_API_BASE_URL": discord_server.api_url,
            "TELEGRAM_BOT_TOKEN": "1:t",
            "TELEGRAM_BASE_URL": telegram_server.base_url,
        },
    )
    settings = replace(settings, database_url=f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    task = asyncio.create_task(run_platforms(settings))
    try:
        await discord_server.wait_for(lambda: "global" in discord_server.commands)
        await telegram_server.wait_for(lambda: "setMyCommands" in telegram_server.methods())
        # No guild id configured: the slash commands were registered globally.
        assert "chat" in {c["name"] for c in discord_server.commands["global"]}
        await discord_server.identified.wait()
        await discord_server.say(DM_CHANNEL, user("11", "Ann"), "Hello from Discord")
        telegram_server.push(501, 501, "Bob", "Hello from Telegram")
        await discord_server.wait_for(lambda: discord_server.in_channel(DM_CHANNEL))
        await telegram_server.wait_for(lambda: telegram_server.bot_messages(501))
        assert discord_server.in_channel(DM_CHANNEL)[-1].content.strip()
        assert telegram_server.bot_messages(501)[-1].text.strip()
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        await discord_server.stop()
        await telegram_server.stop()
