"""Reminders: reading when, the stored life of a reminder on both databases, caps, time zones,
and delivery that is exactly once even with two processes on one PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from chat.conversations import Conversations
from chat.messages import OutgoingReply
from chat.reminders.limits import ReminderSettings
from chat.reminders.service import Reminders
from chat.reminders.when import NotUnderstood, describe_recurrence, next_due, parse_request
from chat.roleplay.characters import CharacterLibrary, shipped_characters
from chat.settings import Settings
from storage import Store
from tests.conftest import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
BERLIN = "Europe/Berlin"
AT = datetime(2026, 12, 3, 21, 0, tzinfo=UTC)  # 22:00 in Berlin, a Thursday


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def local(moment: datetime, zone: str = BERLIN) -> str:
    from zoneinfo import ZoneInfo

    return f"{moment.astimezone(ZoneInfo(zone)):%a %Y-%m-%d %H:%M}"


# -- reading when ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_text", "due", "what"),
    [
        ("in 2 hours send the report", "Fri 2026-12-04 00:00", "send the report"),
        ("me in 2 hours to send the report", "Fri 2026-12-04 00:00", "send the report"),
        ("tomorrow 9:00 call Bob", "Fri 2026-12-04 09:00", "call Bob"),
        ("at 3 pm call mom", "Fri 2026-12-04 15:00", "call mom"),  # 15:00 passed today
        ("send the report at 3pm", "Fri 2026-12-04 15:00", "send the report"),
        ("2027-01-05 14:00 dentist", "Tue 2027-01-05 14:00", "dentist"),
        ("in 5 seconds ping", "Thu 2026-12-03 22:00", "ping"),
    ],
)
def test_one_off_times_are_read_in_the_users_zone(request_text: str, due: str, what: str) -> None:
    found = parse_request(request_text, BERLIN, AT, 60)
    assert (local(found.schedule.due_at), found.what) == (due, what)
    assert found.schedule.recurrence is None


@pytest.mark.parametrize(
    ("request_text", "first", "described", "what"),
    [
        (
            "every Monday 10:00 team sync",
            "Mon 2026-12-07 10:00",
            "every Monday at 10:00",
            "team sync",
        ),
        ("every weekday at 9 standup", "Fri 2026-12-04 09:00", "every weekday at 09:00", "standup"),
        ("every day 18:30 walk", "Fri 2026-12-04 18:30", "every day at 18:30", "walk"),
        ("every 2 hours stretch", "Fri 2026-12-04 00:00", "every 2 hours", "stretch"),
        (
            "every mon, wed and fri at 8am gym",
            "Fri 2026-12-04 08:00",
            "every Monday, Wednesday, Friday at 08:00",
            "gym",
        ),
    ],
)
def test_recurrence_becomes_cron_or_an_interval(
    request_text: str, first: str, described: str, what: str
) -> None:
    found = parse_request(request_text, BERLIN, AT, 60)
    assert found.schedule.recurrence is not None
    assert local(found.schedule.due_at) == first
    assert describe_recurrence(found.schedule.recurrence) == described
    assert found.what == what


def test_a_weekly_reminder_keeps_its_local_time_across_summer_time() -> None:
    # 10:00 in Berlin is 09:00 UTC in winter and 08:00 UTC in summer (from 28 March 2027).
    before = datetime(2027, 3, 19, 12, 0, tzinfo=UTC)
    first = next_due("cron:0 10 * * 1", BERLIN, before)
    second = next_due("cron:0 10 * * 1", BERLIN, first)
    assert (first.hour, second.hour) == (9, 8)
    assert local(first).endswith("10:00") and local(second).endswith("10:00")


@pytest.mark.parametrize(
    ("request_text", "says"),
    [
        ("", "when and what"),
        ("nothing about a time", "could not tell when"),
        ("in 2 hours", "What should I remind you of"),
        ("yesterday at 9 water the plants", "already passed"),
        ("every 10 seconds blink", "repeats too often"),
        ("every fortnight something", "how often"),
        ("every Monday 10:00", "What should I remind you of"),
    ],
)
def test_requests_that_do_not_say_when_or_what_are_refused_politely(
    request_text: str, says: str
) -> None:
    with pytest.raises(NotUnderstood, match=says):
        parse_request(request_text, BERLIN, AT, 60)


def test_a_huge_request_costs_a_bounded_amount_of_parsing() -> None:
    import time

    words = "lorem ipsum " * 50_000
    started = time.perf_counter()
    with pytest.raises(NotUnderstood):
        parse_request(words, BERLIN, AT, 60)
    assert time.perf_counter() - started < 5  # only the first and last words are tried


# -- the service, on both databases -----------------------------------------------------------


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def service(
    settings: Settings, store: Store, clock: Clock, **changes: Any
) -> tuple[Reminders, list[OutgoingReply]]:
    characters = CharacterLibrary(list(shipped_characters()))
    conversations = Conversations(store, settings, characters)
    reminders = Reminders(replace(ReminderSettings(), **changes), store, conversations, clock=clock)
    return reminders, []


async def test_a_reminder_is_delivered_once_with_a_mention_and_only_when_due(
    settings: Settings, store: Store
) -> None:
    clock = Clock(AT)
    reminders, sent = service(settings, store, clock)

    async def send(reply: OutgoingReply) -> None:
        sent.append(reply)

    said = await reminders.add("telegram", "telegram:7", "501", "Ann", "in 10 minutes stand up")
    assert said.startswith("⏰ I will remind you 21:10 UTC") and said.endswith("stand up")
    assert await reminders.deliver_due("telegram", send) == 0
    clock.at = AT + timedelta(minutes=10)
    assert await reminders.deliver_due("discord", send) == 0  # another platform's loop
    assert await reminders.deliver_due("telegram", send) == 1
    assert await reminders.deliver_due("telegram", send) == 0
    assert [r.text for r in sent] == ["⏰ Reminder: stand up"]
    assert sent[0].mention is not None and sent[0].mention.user_id == "501"
    assert sent[0].conversation_key == "telegram:7"
    assert "No reminders" in await reminders.listing("telegram", "telegram:7")


async def test_one_due_while_down_says_it_is_late_and_a_recurring_one_fires_once_for_the_gap(
    settings: Settings, store: Store
) -> None:
    clock = Clock(AT)
    reminders, sent = service(settings, store, clock)

    async def send(reply: OutgoingReply) -> None:
        sent.append(reply)

    await reminders.add("telegram", "telegram:7", "501", "Ann", "in 1 hour water plants")
    await reminders.add("telegram", "telegram:7", "501", "Ann", "every 2 hours stretch")
    clock.at = AT + timedelta(hours=9)  # the bot was down for nine hours
    assert await reminders.deliver_due("telegram", send) == 2
    assert await reminders.deliver_due("telegram", send) == 0  # not once per missed time
    late = [r.text for r in sent]
    assert "Late: this was due Thu 3 Dec 22:00 UTC" in late[0] and "water plants" in late[0]
    assert "stretch" in late[1] and "every 2 hours" in late[1]
    listing = await reminders.listing("telegram", "telegram:7")
    assert "1. 08:00 UTC, every 2 hours · Ann: stretch" in listing  # next: two hours on


async def test_time_zones_per_user_and_per_conversation(settings: Settings, store: Store) -> None:
    clock = Clock(AT)
    reminders, _ = service(settings, store, clock)
    key = "discord:100"
    said = await reminders.set_zone("discord", key, "11", "europe/berlin", conversation=True)
    assert said == "This conversation's time zone is now Europe/Berlin."
    assert "23:00 CET: x" in await reminders.add("discord", key, "11", "Ann", "at 23:00 x")
    assert "23:00 CET" in await reminders.listing("discord", key)
    assert "Tokyo" in await reminders.set_zone(
        "discord", key, "12", "Asia/Tokyo", conversation=False
    )
    said = await reminders.add("discord", key, "12", "Bob", "tomorrow 9:00 y")
    assert "09:00 JST" in said  # Bob's own zone wins over the conversation's
    assert "not a time zone" in await reminders.set_zone(
        "discord", key, "12", "Mars/Olympus", conversation=False
    )
    zones = await reminders.describe_zones("discord", key, "12")
    assert "Your time zone: Asia/Tokyo" in zones and "Europe/Berlin" in zones


async def test_caps_per_user_and_conversation_and_cancel(settings: Settings, store: Store) -> None:
    clock = Clock(AT)
    reminders, _ = service(settings, store, clock, max_per_user=2, max_per_conversation=3)
    key = "telegram:-100"
    for n in range(2):
        assert "I will remind" in await reminders.add(
            "telegram", key, "1", "Ann", f"in 1 hour a{n}"
        )
    assert "max_per_user" in await reminders.add("telegram", key, "1", "Ann", "in 1 hour a3")
    assert "I will remind" in await reminders.add("telegram", key, "2", "Bob", "in 1 hour b")
    assert "max_per_conversation" in await reminders.add("telegram", key, "3", "Cy", "in 1 h c")
    held = await reminders.open_in("telegram", key)
    assert await reminders.cancel("telegram", key, held[0]) == "Cancelled: a0"
    assert "meanwhile" in await reminders.cancel("telegram", key, held[0])
    assert "I will remind" in await reminders.add("telegram", key, "1", "Ann", "in 1 hour a4")
    long = await reminders.add("telegram", key, "2", "Bob", "in 1 hour " + "x" * 600)
    assert "too long" in long


async def test_a_platform_error_is_retried_then_given_up_with_a_log_line(
    settings: Settings, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(AT)
    reminders, _ = service(settings, store, clock)
    calls = 0

    async def refuse(_reply: OutgoingReply) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("Forbidden: bot was kicked")

    await reminders.add("telegram", "telegram:9", "1", "Ann", "in 1 minute x")
    for minutes in (1, 2, 5, 60):
        clock.at = AT + timedelta(minutes=minutes)
        await reminders.deliver_due("telegram", refuse)
    assert calls == 3
    assert "giving up" in caplog.text and "kicked" in caplog.text
    async with store.engine.connect() as conn:
        state = await conn.scalar(text("SELECT state FROM reminders"))
    assert state == "failed"


async def test_a_claim_left_by_a_dead_process_is_taken_again_later(
    settings: Settings, store: Store
) -> None:
    clock = Clock(AT)
    dead, _ = service(settings, store, clock)
    alive, sent = service(settings, store, clock)

    async def send(reply: OutgoingReply) -> None:
        sent.append(reply)

    await dead.add("telegram", "telegram:9", "1", "Ann", "in 1 minute x")
    clock.at = AT + timedelta(minutes=1)
    claimed = await store.reminders.claim_due(("telegram",), dead.owner, clock.at, AT, 20)
    assert len(claimed) == 1  # then the process died before it posted anything
    assert await alive.deliver_due("telegram", send) == 0  # a live claim is left alone
    clock.at += timedelta(minutes=10)
    assert await alive.deliver_due("telegram", send) == 1
    assert not await store.reminders.delivered(claimed[0].id, dead.owner, None)


# -- two processes on one PostgreSQL ------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from chat.conversations import Conversations
    from chat.reminders.limits import ReminderSettings
    from chat.reminders.service import Reminders
    from chat.roleplay.characters import CharacterLibrary, shipped_characters
    from chat.settings import parse_settings
    from storage import Store, open_database

    async def main(url, seconds):
        store = Store(await open_database(url))
        settings = parse_settings({}, env={})
        conversations = Conversations(store, settings, CharacterLibrary(list(shipped_characters())))
        reminders = Reminders(ReminderSettings(poll_s=0.05), store, conversations)

        async def send(reply):
            await asyncio.sleep(0.01)  # a platform round trip
            print(json.dumps([reminders.owner, reply.text]), flush=True)

        loop = reminders.loop("telegram", send)
        loop.start()
        await asyncio.sleep(seconds)
        await loop.stop()
        await store.close()

    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
    """
)


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_two_processes_on_one_postgresql_deliver_each_reminder_once(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    clock = Clock(datetime.now(UTC))
    reminders, _ = service(settings, store, clock)
    for n in range(60):
        # Due over the next few seconds, in three conversations.
        said = await reminders.add(
            "telegram", f"telegram:{n % 3}", str(n), "Ann", f"in {n % 4 + 3} seconds r{n}"
        )
        assert said.startswith("⏰ I will remind you")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            settings.database_url,
            "8",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [await w.communicate() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err.decode()[-2000:] for _, err in outputs]
    lines = [json.loads(line) for out, _ in outputs for line in out.decode().splitlines()]
    texts = sorted(t.removeprefix("⏰ Reminder: ") for _, t in lines)
    assert texts == sorted(f"r{n}" for n in range(60)), [e.decode()[-3000:] for _, e in outputs]


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_claim_that_waits_on_another_processes_claim_takes_nothing(
    settings: Settings, store: Store
) -> None:
    from storage import open_database

    clock = Clock(datetime.now(UTC))
    reminders, _ = service(settings, store, clock)
    await reminders.add("telegram", "telegram:1", "1", "Ann", "in 1 second x")
    other = Store(await open_database(settings.database_url))
    try:
        async with other.engine.connect() as conn:
            first = await conn.begin()
            # Another process claims it and has not committed yet.
            await conn.execute(
                text("UPDATE reminders SET state = 'sending', claimed_by = 'a', claimed_at = now()")
            )
            later = clock.at + timedelta(seconds=5)
            second = asyncio.create_task(
                store.reminders.claim_due(("telegram",), "b", later, clock.at, 20)
            )
            await asyncio.sleep(0.5)
            assert not second.done()  # it waits on the row
            await first.commit()
        assert await asyncio.wait_for(second, 10) == []
    finally:
        await other.close()
