"""A graceful stop of the real process: SIGTERM lets the answer finish, saves state, exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.fake_telegram import FakeTelegram
from tests.test_cli import ROOT

pytestmark = pytest.mark.model

SETTINGS = """
[bot]
shutdown_grace_s = 60
[models.office.sampling]
max_tokens = 400
seed = 3
temperature = 0.8
"""


async def start_bot(tmp_path: Path, server: FakeTelegram) -> asyncio.subprocess.Process:
    (tmp_path / "bot.toml").write_text(SETTINGS)
    env = {k: v for k, v in os.environ.items() if k not in {"DISCORD_TOKEN", "BOT_CONFIG"}}
    env.update(
        TELEGRAM_BOT_TOKEN="123:TEST",
        TELEGRAM_BASE_URL=server.base_url,
        BOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
        PYTHONPATH=str(ROOT),
    )
    log = _log_file(tmp_path / "bot.log")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", cwd=tmp_path, env=env, stdout=log, stderr=log
    )


def _log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # the bot process writes to it until it ends


def stored(tmp_path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / "bot.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return list(db.execute("SELECT role, text FROM messages ORDER BY id"))


async def test_sigterm_mid_stream_finishes_the_answer_saves_state_and_exits_0(
    tmp_path: Path, telegram: FakeTelegram
) -> None:
    bot = await start_bot(tmp_path, telegram)
    await telegram.wait_for(lambda: "setMyCommands" in telegram.methods(), 120)
    telegram.push(501, 501, "Ann", "Write a long story about a dragon who learns to bake bread.")

    # Mid-stream: the reply has been sent and edited, and is not final yet.
    def streaming() -> bool:
        shown = telegram.bot_messages(501)
        return bool(shown and shown[-1].edits and shown[-1].parse_mode is None)

    await telegram.wait_for(streaming, 120)
    bot.send_signal(signal.SIGTERM)
    at_signal = telegram.bot_messages(501)[-1].text
    assert await asyncio.wait_for(bot.wait(), 90) == 0, (tmp_path / "bot.log").read_text()
    log = (tmp_path / "bot.log").read_text()
    assert "Traceback" not in log
    reply = [text for role, text in stored(tmp_path) if role == "assistant"]
    assert len(reply) == 1
    shown = telegram.bot_messages(501)[-1]
    assert shown.parse_mode == "HTML"  # the final edit went out before the bot stopped
    assert len(shown.text) > len(at_signal)  # the answer went on after the signal
    assert reply[0].split()[-1] in shown.text
    assert list((tmp_path / "data" / "llama-states").glob("*.state"))  # KV state saved


async def test_a_second_signal_stops_at_once_without_damage(
    tmp_path: Path, telegram: FakeTelegram
) -> None:
    bot = await start_bot(tmp_path, telegram)
    await telegram.wait_for(lambda: "setMyCommands" in telegram.methods(), 120)
    telegram.push(501, 501, "Ann", "Tell me everything you know about bread.")
    await telegram.wait_for(lambda: telegram.bot_messages(501), 120)
    bot.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    bot.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(bot.wait(), 15) == 1
    assert ("user", "Tell me everything you know about bread.") in stored(tmp_path)
