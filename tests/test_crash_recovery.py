"""Crashes of the real process: ``python -m bot run`` killed with SIGKILL, then restarted.

The bot runs on the embedded model against the local Telegram and Discord servers.  Each kill
point (:mod:`chat.faults`) is hit five times; then every message must be answered exactly once
and no cut-off stub may be left on the platform.  A run of random kills does the same at
random moments (``LOCALBOT_RANDOM_KILLS`` sets how many; the closing report uses 50).
"""

from __future__ import annotations

import asyncio
import html
import os
import random
import re
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest

from chat.faults import POINTS
from tests.fake_discord import CHANNEL_WORK, FakeDiscord, user
from tests.fake_telegram import FakeTelegram
from tests.test_cli import ROOT

pytestmark = pytest.mark.model

SETTINGS = """
[bot]
rate_limit = 0
max_queued = 100
max_pending_per_user = 100
shutdown_grace_s = 30
[models.office.sampling]
max_tokens = 48
seed = 7
temperature = 0.7
"""
DM = 501
ANN_ID = "11"
KILLS_PER_POINT = 5


@dataclass
class BotProcess:
    """Starts and restarts ``python -m bot run`` against a fake platform."""

    tmp_path: Path
    env: dict[str, str]
    starts: int = 0
    process: asyncio.subprocess.Process | None = None
    logs: list[Path] = field(default_factory=list)

    async def start(self, kill_at: str | None = None) -> None:
        env = dict(self.env)
        if kill_at is not None:
            env["LOCALBOT_KILL_AT"] = kill_at
            env["LOCALBOT_KILL_ONCE"] = str(self.tmp_path / f"killed-{self.starts}")
        self.starts += 1
        log = self.tmp_path / f"bot-{self.starts}.log"
        self.logs.append(log)
        with _log_file(log) as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot",
                "run",
                cwd=self.tmp_path,
                env=env,
                stdout=out,
                stderr=out,
            )

    async def killed(self, within: float = 120) -> None:
        """Wait for the armed kill point to end the process."""
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), within)
        assert code == -signal.SIGKILL, self.log_text()

    async def kill(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM: a graceful stop, exit code 0.

        Sent once the bot is up: a signal that arrives while the interpreter itself starts,
        before any code of ours runs, ends it as the signal's default (nothing is at stake).
        """
        assert self.process is not None
        deadline = time.monotonic() + 60
        while not re.search(r"polling as|discord: connected", self.logs[-1].read_text()):
            assert time.monotonic() < deadline, self.log_text()
            await asyncio.sleep(0.1)
        self.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(self.process.wait(), 90) == 0, self.log_text()

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs)

    def killed_after_a_send(self) -> int:
        """Killed runs whose last act was a send: the id of that message may not be recorded
        (the documented window between a platform send and its record)."""
        lasts = [p.read_text(errors="replace").strip().splitlines()[-1:] for p in self.logs[:-1]]
        return sum(1 for last in lasts if last and "sendMessage" in last[0])

    def recovery_times(self) -> list[float]:
        found = re.findall(r"recovery finished in ([0-9.]+)s", self.log_text())
        return [float(t) for t in found]


def _log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # handed to the process, which writes to it until it ends


def bot_env(tmp_path: Path, **platform: str) -> dict[str, str]:
    (tmp_path / "bot.toml").write_text(SETTINGS)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DISCORD_TOKEN", "TELEGRAM_BOT_TOKEN", "BOT_CONFIG"}
    }
    env.update(
        BOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
        PYTHONPATH=str(ROOT),
        **platform,
    )
    return env


def answers(tmp_path: Path) -> dict[str, tuple[str | None, list[str]]]:
    """For each stored user message (by platform id): its reply state and stored answers."""
    with sqlite3.connect(tmp_path / "bot.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        users = db.execute(
            "SELECT id, platform_message_id, reply_state FROM messages WHERE role = 'user'"
        ).fetchall()
        found = {}
        for message_id, platform_id, state in users:
            replies = db.execute(
                "SELECT text FROM messages WHERE role = 'assistant' AND reply_to_id = ? "
                "AND in_context ORDER BY id",
                (message_id,),
            ).fetchall()
            found[str(platform_id)] = (state, [r[0] for r in replies])
        return found


def words(text: str) -> list[str]:
    """What a reader sees, whatever the formatting: the words, in order."""
    return re.findall(r"\w+", html.unescape(re.sub(r"<[^>]+>", "", text)))


@dataclass
class Report:
    sent: int
    lost: int
    duplicates: int
    stubs: int


def check_exactly_once(tmp_path: Path, sent: list[str], shown: list[str]) -> Report:
    """``sent``: platform ids of the user messages; ``shown``: the bot's messages' texts."""
    stored = answers(tmp_path)
    lost = [m for m in sent if m not in stored or stored[m][0] != "answered"]
    duplicates = [m for m in sent if m in stored and len(stored[m][1]) > 1]
    expected = sorted(words(stored[m][1][0]) for m in sent if m in stored and stored[m][1])
    # Each bot message on the platform must show one stored answer, in full, and no answer
    # may be shown twice.
    full = [text for text in shown if words(text) in expected]
    extra = max(0, len(full) - len(expected))
    return Report(len(sent), len(lost), len(duplicates) + extra, len(shown) - len(full))


# -- Telegram -----------------------------------------------------------------------------------


@pytest.fixture
async def telegram_bot(
    tmp_path: Path, telegram: FakeTelegram
) -> AsyncIterator[tuple[BotProcess, FakeTelegram]]:
    env = bot_env(tmp_path, TELEGRAM_BOT_TOKEN="123:TEST", TELEGRAM_BASE_URL=telegram.base_url)
    bot = BotProcess(tmp_path, env)
    yield bot, telegram
    if bot.process is not None:
        await bot.kill()


def telegram_shown(server: FakeTelegram) -> list[str]:
    return [m.text for m in server.bot_messages(DM)]


async def all_answered(
    tmp_path: Path,
    sent: list[str],
    shown: Callable[[], list[str]],
    within: float = 240,
    stubs_allowed: int = 0,
) -> None:
    def done() -> bool:
        try:
            report = check_exactly_once(tmp_path, sent, shown())
        except sqlite3.Error:
            return False
        return report.lost == 0 and report.stubs <= stubs_allowed

    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, f"not all answered: {answers(tmp_path)} {shown()}"
        await asyncio.sleep(0.3)


@pytest.mark.parametrize("point", POINTS)
async def test_telegram_kill_point_five_times_each_message_answered_once(
    tmp_path: Path, telegram_bot: tuple[BotProcess, FakeTelegram], point: str
) -> None:
    bot, server = telegram_bot
    sent: list[str] = []
    for i in range(KILLS_PER_POINT):
        await bot.start(kill_at=point)
        sent.append(str(server.push(DM, DM, "Ann", f"Question {i}: name a fruit and a colour.")))
        await bot.killed()
        # Only what was stored may have been confirmed to Telegram.
        stored = answers(tmp_path)
        assert all(
            str(u["message"]["message_id"]) in stored
            for u in server.updates
            if u["update_id"] <= server.confirmed
        )
    await bot.start()
    await all_answered(tmp_path, sent, lambda: telegram_shown(server))
    await bot.stop()
    report = check_exactly_once(tmp_path, sent, telegram_shown(server))
    assert (report.lost, report.duplicates, report.stubs) == (0, 0, 0), report
    assert len(server.bot_messages(DM)) == len(sent)
    assert "Traceback" not in bot.log_text()


async def test_telegram_random_kills_lose_nothing_and_duplicate_nothing(
    tmp_path: Path, telegram_bot: tuple[BotProcess, FakeTelegram]
) -> None:
    bot, server = telegram_bot
    kills = int(os.environ.get("LOCALBOT_RANDOM_KILLS", "8"))
    rng = random.Random(int(os.environ.get("LOCALBOT_RANDOM_SEED", "20261123")))
    sent: list[str] = []
    started = time.monotonic()
    for i in range(kills):
        await bot.start()
        for j in range(rng.randint(1, 2)):
            await asyncio.sleep(rng.uniform(0.0, 2.0))
            sent.append(str(server.push(DM, DM, "Ann", f"Kill {i}.{j}: say something short.")))
        await asyncio.sleep(rng.uniform(0.0, 6.0))
        await bot.kill()
    await bot.start()
    window = bot.killed_after_a_send()
    await all_answered(
        tmp_path, sent, lambda: telegram_shown(server), within=600, stubs_allowed=window
    )
    await bot.stop()
    report = check_exactly_once(tmp_path, sent, telegram_shown(server))
    times = bot.recovery_times()
    line = (
        f"random kills: {kills}, messages: {report.sent}, lost: {report.lost}, "
        f"duplicates: {report.duplicates}, stubs: {report.stubs} "
        f"(kills right after a send: {window}), recoveries: {len(times)}, "
        f"recovery median {sorted(times)[len(times) // 2] if times else 0:.1f}s "
        f"max {max(times, default=0):.1f}s, wall {time.monotonic() - started:.0f}s"
    )
    print(line)
    (ROOT / ".reports").mkdir(exist_ok=True)
    (ROOT / ".reports" / "random-kills.txt").write_text(line + "\n")
    assert (report.lost, report.duplicates) == (0, 0), report
    # A stub can only come from a kill between a send and its record (README, "Limits").
    assert report.stubs <= window, report


# -- Discord ------------------------------------------------------------------------------------


@pytest.fixture
async def discord_bot(tmp_path: Path) -> AsyncIterator[tuple[BotProcess, FakeDiscord]]:
    server = FakeDiscord()
    await server.start()
    env = bot_env(tmp_path, DISCORD_TOKEN="TEST", DISCORD_API_BASE_URL=server.api_url)
    bot = BotProcess(tmp_path, env)
    yield bot, server
    if bot.process is not None:
        await bot.kill()
    await server.stop()


def discord_shown(server: FakeDiscord) -> list[str]:
    return [p.content for p in server.in_channel(CHANNEL_WORK)]


async def connected(server: FakeDiscord) -> None:
    await asyncio.wait_for(server.identified.wait(), 120)


@pytest.mark.parametrize("point", POINTS)
async def test_discord_kill_point_five_times_each_message_answered_once(
    tmp_path: Path, discord_bot: tuple[BotProcess, FakeDiscord], point: str
) -> None:
    bot, server = discord_bot
    ann = user(ANN_ID, "Ann")
    # The channel is known to the bot (a message stored), as any channel it has talked in.
    await bot.start()
    await connected(server)
    sent = [await server.say(CHANNEL_WORK, ann, "Hello there.", mention_bot=True)]
    await all_answered(tmp_path, sent, lambda: discord_shown(server))
    await bot.stop()
    for i in range(KILLS_PER_POINT):
        await bot.start(kill_at=point)
        await connected(server)
        text = f"Question {i}: name a fruit and a colour."
        sent.append(await server.say(CHANNEL_WORK, ann, text, mention_bot=True))
        await bot.killed()
    await bot.start()
    await all_answered(tmp_path, sent, lambda: discord_shown(server))
    await bot.stop()
    report = check_exactly_once(tmp_path, sent, discord_shown(server))
    assert (report.lost, report.duplicates, report.stubs) == (0, 0, 0), report
    assert len(discord_shown(server)) == len(sent)
    assert "Traceback" not in bot.log_text()


async def test_discord_messages_posted_while_away_are_answered_after_restart(
    tmp_path: Path, discord_bot: tuple[BotProcess, FakeDiscord]
) -> None:
    bot, server = discord_bot
    ann, bob = user(ANN_ID, "Ann"), user("12", "Bob")
    await bot.start()
    await connected(server)
    sent = [await server.say(CHANNEL_WORK, ann, "Hello there.", mention_bot=True)]
    await all_answered(tmp_path, sent, lambda: discord_shown(server))
    await bot.stop()
    # While the bot is away: a mention (answered after the restart) and a plain message
    # (stored as history, not answered, as if it had just arrived).
    sent.append(
        await server.say(CHANNEL_WORK, bob, "Are you back?", mention_bot=True, offline=True)
    )
    aside = await server.say(CHANNEL_WORK, ann, "Lunch at noon, everyone.", offline=True)
    await bot.start()
    await all_answered(tmp_path, sent, lambda: discord_shown(server))
    await bot.stop()
    stored = answers(tmp_path)
    assert stored[aside] == (None, [])
    assert ("HISTORY", CHANNEL_WORK) in server.requests
    assert len(discord_shown(server)) == 2
