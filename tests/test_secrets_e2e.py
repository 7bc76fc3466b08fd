"""Secrets in the whole debug log of a real run: the bot process with -v, both platforms on the
local servers, PostgreSQL with a password in its URL, an engine key and a webhook secret."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from tests.fake_discord import DM_CHANNEL, FakeDiscord, user
from tests.fake_telegram import FakeTelegram
from tests.test_cli import ROOT

pytestmark = pytest.mark.model

TELEGRAM_TOKEN = "424242:TgSecretToken-xyz"
DISCORD_TOKEN = "DiscordSecretToken.abc.def"
PASSWORD = "Pg-Secret-pw-77"
API_KEY = "sk-office-secret-99"


async def test_no_secret_reaches_the_verbose_log(tmp_path: Path, postgres: Any) -> None:
    discord_server, telegram_server = FakeDiscord(), FakeTelegram()
    await discord_server.start()
    await telegram_server.start()
    url = await postgres.new_database()
    with_password = url.replace("@", f":{PASSWORD}@", 1)  # the test server trusts any password
    (tmp_path / "bot.toml").write_text("[models.office.sampling]\nmax_tokens = 8\nseed = 3\n")
    env = {k: v for k, v in os.environ.items() if k != "BOT_CONFIG"}
    env.update(
        DISCORD_TOKEN=DISCORD_TOKEN,
        DISCORD_API_BASE_URL=discord_server.api_url,
        TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN,
        TELEGRAM_BASE_URL=telegram_server.base_url,
        BOT_DATABASE_URL=with_password,
        BOT_OFFICE_API_KEY=API_KEY,
        PYTHONPATH=str(ROOT),
    )
    log_path = tmp_path / "bot.log"
    with _log_file(log_path) as log:
        bot = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bot", "-v", "run"),
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        await telegram_server.wait_for(lambda: "setMyCommands" in telegram_server.methods(), 120)
        await discord_server.identified.wait()
        await discord_server.say(DM_CHANNEL, user("11", "Ann"), "Hello from Discord")
        telegram_server.push(501, 501, "Bob", "Hello from Telegram")
        await discord_server.wait_for(lambda: discord_server.in_channel(DM_CHANNEL), 120)
        await telegram_server.wait_for(lambda: telegram_server.bot_messages(501), 120)
    finally:
        bot.send_signal(signal.SIGTERM)
        await asyncio.wait_for(bot.wait(), 60)
        await discord_server.stop()
        await telegram_server.stop()
    text = log_path.read_text(errors="replace")
    assert " DEBUG " in text and "getUpdates" in text  # the debug log, with request URLs
    assert "bot***/getUpdates" in text
    for secret in (TELEGRAM_TOKEN, DISCORD_TOKEN, PASSWORD, API_KEY):
        assert secret not in text, secret


def _log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # the bot process writes to it until it ends
