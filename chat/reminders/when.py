"""Reading when a reminder is due from what people type, and when a recurring one comes next.

One-off times ("in 2 hours", "tomorrow 9:00", "at 3 pm", "2027-01-05 14:00") are read by
dateparser, in the user's time zone, preferring the future.  Recurrence ("every Monday 10:00",
"every weekday at 9", "every day 18:30", "every 2 hours") becomes a cron expression (iterated by
croniter in the user's zone, so 10:00 stays 10:00 across summer time) or a fixed interval.

A request is "<when> <what>" or "<what> <when>"; the longest run of leading (or trailing) words
that reads as a time is the when.  Only the first and last few words are tried, so the work a
request causes is bounded whatever its length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import dateparser
from croniter import croniter

MAX_WHEN_WORDS = 6  # the longest time phrase tried, from either end
FILLER = {"to", "that", "about", "of", "-", ":", "—"}
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
UNITS_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}
UNIT_ALIASES = {"sec": "second", "secs": "second", "min": "minute", "mins": "minute", "hr": "hour"}
_EVERY_N = re.compile(r"^(?:(\d{1,6})\s+)?([a-z]+?)s?$")


@lru_cache(maxsize=1)
def _zones() -> dict[str, str]:
    return {name.lower(): name for name in available_timezones()} | {"utc": "UTC"}


def zone_named(name: str) -> str | None:
    """The IANA name of zone ``name`` (any case), or None if there is no such zone."""
    found = _zones().get(name.strip().lower())
    if found is None:
        return None
    try:
        ZoneInfo(found)
    except (ZoneInfoNotFoundError, ValueError):
        return None
    return found


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a reminder is first due (UTC), and how it recurs (None: once)."""

    due_at: datetime
    recurrence: str | None = None  # "cron:M H D M W" or "every:SECONDS"


@dataclass(frozen=True, slots=True)
class Request:
    schedule: Schedule
    what: str


class NotUnderstood(ValueError):
    """The request does not say when, or what; the message says how to write it."""


def _parse_time(phrase: str, zone: str, at: datetime) -> datetime | None:
    base = at.astimezone(ZoneInfo(zone)).replace(tzinfo=None)
    settings = {
        "PREFER_DATES_FROM": "future",
        "TIMEZONE": zone,
        "RETURN_AS_TIMEZONE_AWARE": True,
        "RELATIVE_BASE": base,
    }
    try:
        found = dateparser.parse(phrase, languages=["en"], settings=settings)
    except (ValueError, OverflowError, TypeError):
        return None
    return found.astimezone(UTC) if found is not None else None


def _clean_what(words: list[str]) -> str:
    while words and words[0].lower() in FILLER:
        words = words[1:]
    return " ".join(words).strip()


def parse_request(text: str, zone: str, at: datetime, min_interval_s: int) -> Request:
    """Split ``text`` into when and what (``zone``: the user's; ``at``: now)."""
    words = text.split()
    if words and words[0].lower() in {"me", "us"}:
        words = words[1:]
    if not words:
        raise NotUnderstood("Tell me when and what: /remind in 2 hours send the report.")
    if words[0].lower() == "every":
        return _recurring(words[1:], zone, at, min_interval_s)
    if len(words) <= MAX_WHEN_WORDS and _parse_time(" ".join(words), zone, at) is not None:
        raise NotUnderstood("What should I remind you of? /remind in 2 hours send the report.")
    for n in range(min(MAX_WHEN_WORDS, len(words) - 1), 0, -1):
        if (due := _parse_time(" ".join(words[:n]), zone, at)) is not None:
            return _once(due, _clean_what(words[n:]), at)
    for n in range(min(MAX_WHEN_WORDS, len(words) - 1), 0, -1):
        if (due := _parse_time(" ".join(words[-n:]), zone, at)) is not None:
            return _once(due, _clean_what(words[:-n]), at)
    raise NotUnderstood(
        "I could not tell when. Try: /remind in 2 hours …, /remind tomorrow 9:00 …, "
        "/remind every Monday 10:00 …"
    )


def _once(due: datetime, what: str, at: datetime) -> Request:
    if not what:
        raise NotUnderstood("What should I remind you of? /remind in 2 hours send the report.")
    if due <= at - timedelta(seconds=1):
        raise NotUnderstood("That time has already passed; give me one still to come.")
    return Request(Schedule(due), what)


_CLOCK = re.compile(r"^(?:at\s+)?(\d{1,2})(?:[:.h](\d{2}))?\s*(am|pm|a\.m\.|p\.m\.)?$")


def _clock(phrase: str) -> tuple[int, int] | None:
    """A time of day: "at 9", "9am", "18:30", "6.30 pm", "noon", "midnight"."""
    phrase = phrase.lower().strip()
    named = {"noon": (12, 0), "midday": (12, 0), "midnight": (0, 0)}
    if phrase.removeprefix("at ") in named:
        return named[phrase.removeprefix("at ")]
    match = _CLOCK.match(phrase)
    if match is None:
        return None
    hour, minute = int(match.group(1)), int(match.group(2) or 0)
    half = (match.group(3) or "").replace(".", "")
    if half and not 1 <= hour <= 12:
        return None
    if half == "pm" and hour != 12:
        hour += 12
    elif half == "am" and hour == 12:
        hour = 0
    return (hour, minute) if hour < 24 and minute < 60 else None


def _time_of_day(words: list[str]) -> tuple[tuple[int, int], int]:
    """The time of day at the start of ``words``, and how many words it took; 9:00 and none
    when there is no time."""
    for n in range(min(3, len(words)), 0, -1):
        if (found := _clock(" ".join(words[:n]))) is not None:
            return found, n
    return (9, 0), 0


def _recurring(words: list[str], zone: str, at: datetime, min_interval_s: int) -> Request:
    if not words:
        raise NotUnderstood("Every what? /remind every Monday 10:00 team sync.")
    days: list[int] = []
    taken = 0
    for word in words:
        bare = word.lower().strip(",").removesuffix("s")
        if bare in {"and", ""}:
            taken += 1
            continue
        day = next(
            (i for i, d in enumerate(WEEKDAYS) if d.startswith(bare) and len(bare) >= 3), None
        )
        if bare == "weekday":
            days.extend(range(5))
        elif bare == "weekend":
            days.extend((5, 6))
        elif day is not None:
            days.append(day)
        else:
            break
        taken += 1
    if days:
        (hour, minute), used = _time_of_day(words[taken:])
        # cron counts Sunday as 0.
        cron_days = ",".join(str((d + 1) % 7) for d in sorted(set(days)))
        return _cron(f"{minute} {hour} * * {cron_days}", words[taken + used :], zone, at)
    for n in (2, 1):
        match = _EVERY_N.match(" ".join(words[:n]).lower())
        if match is None:
            continue
        unit = UNIT_ALIASES.get(match.group(2), match.group(2))
        if unit not in UNITS_S:
            continue
        count = int(match.group(1) or 1)
        rest = words[n:]
        if unit == "day" and count == 1:
            (hour, minute), used = _time_of_day(rest)
            return _cron(f"{minute} {hour} * * *", rest[used:], zone, at)
        seconds = count * UNITS_S[unit]
        if seconds < min_interval_s:
            raise NotUnderstood(
                f"That repeats too often: the shortest is every {min_interval_s} seconds "
                "(min_interval_s in [reminders])."
            )
        what = _clean_what(rest)
        if not what:
            raise NotUnderstood("What should I remind you of? /remind every 2 hours stretch.")
        return Request(Schedule(at + timedelta(seconds=seconds), f"every:{seconds}"), what)
    raise NotUnderstood(
        "I could not tell how often. Try: every Monday 10:00, every weekday at 9, "
        "every day 18:30, every 2 hours."
    )


def _cron(expression: str, rest: list[str], zone: str, at: datetime) -> Request:
    what = _clean_what(rest)
    if not what:
        raise NotUnderstood("What should I remind you of? /remind every Monday 10:00 team sync.")
    recurrence = f"cron:{expression}"
    return Request(Schedule(next_due(recurrence, zone, at), recurrence), what)


def next_due(recurrence: str, zone: str, after: datetime) -> datetime:
    """The first time of ``recurrence`` after ``after`` (UTC)."""
    kind, _, spec = recurrence.partition(":")
    if kind == "every":
        return after + timedelta(seconds=int(spec))
    local = after.astimezone(ZoneInfo(zone))
    found: datetime = croniter(spec, local).get_next(datetime)
    return found.astimezone(UTC)


def describe_recurrence(recurrence: str) -> str:
    """ "every Monday at 10:00", "every 2 hours"."""
    kind, _, spec = recurrence.partition(":")
    if kind == "every":
        seconds = int(spec)
        for unit in ("week", "day", "hour", "minute", "second"):
            size = UNITS_S[unit]
            if seconds % size == 0:
                count = seconds // size
                return f"every {unit}" if count == 1 else f"every {count} {unit}s"
    minute, hour, _, _, dow = spec.split()
    clock = f"{int(hour):02d}:{int(minute):02d}"
    if dow == "*":
        return f"every day at {clock}"
    names = [WEEKDAYS[(int(d) - 1) % 7].capitalize() for d in dow.split(",")]
    if names == [d.capitalize() for d in WEEKDAYS[:5]]:
        return f"every weekday at {clock}"
    return f"every {', '.join(names)} at {clock}"


def local_time(moment: datetime, zone: str, at: datetime) -> str:
    """``moment`` as the user reads it: "15:00 CET" today, "Fri 4 Dec 09:00 CET" otherwise."""
    local = moment.astimezone(ZoneInfo(zone))
    today = at.astimezone(ZoneInfo(zone)).date()
    label = local.tzname() or zone
    if local.date() == today:
        return f"{local:%H:%M} {label}"
    if local.year == today.year:
        return f"{local:%a} {local.day} {local:%b %H:%M} {label}"
    return f"{local.day} {local:%b %Y %H:%M} {label}"
