"""Reminders: setting, listing and cancelling them, time zones, and their delivery.

Each platform adapter runs one :class:`DeliveryLoop` while it is connected.  Every ``poll_s``
it claims the due reminders of its platform in storage (``pending`` → ``sending``, one process
only), posts each with a mention of its owner, then records it ``delivered`` (a recurring one
goes back to ``pending`` at its next time).  A reminder that fell due while the bot was down is
claimed at start and says it is late.  A platform error is retried twice, then the reminder is
given up with a log line.  A process that dies between posting and recording leaves a claim
that another process (or the next start) takes again after ``STALE_CLAIM_S``: that instant is
the one case where a reminder can arrive twice; never is one lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from chat.conversations import Conversations
from chat.messages import Mention, OutgoingReply, ReplyKind
from chat.metrics import Metrics
from chat.reminders.limits import ReminderSettings
from chat.reminders.when import (
    NotUnderstood,
    describe_recurrence,
    local_time,
    next_due,
    parse_request,
    zone_named,
)
from storage.records import Conversation, Reminder
from storage.store import STORAGE_ERRORS, Store

log = logging.getLogger(__name__)

Send = Callable[[OutgoingReply], Awaitable[Any]]
Clock = Callable[[], datetime]

SEND_TIMEOUT_S = 60.0  # one delivery; a claim lives longer than this by far
STALE_CLAIM_S = 300.0
RETRY_AFTER_S = (30.0, 120.0)  # then it is given up
CLAIM_BATCH = 20
ZONE_HINT = "Time zones are IANA names: Europe/Berlin, America/New_York, Asia/Tokyo, UTC."


def _owner() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Reminders:
    """The reminders of every conversation, backed by the store."""

    def __init__(
        self,
        settings: ReminderSettings,
        store: Store,
        conversations: Conversations,
        *,
        metrics: Metrics | None = None,
        clock: Clock = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.store = store
        self.conversations = conversations
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.owner = _owner()

    # -- time zones ---------------------------------------------------------------------------

    async def zone_of(self, platform: str, user_id: str, conv: Conversation) -> str:
        """The user's own zone, else the conversation's, else ``default_timezone``."""
        own = await self.store.reminders.user_timezone(platform, user_id)
        here = conv.settings.get("timezone")
        for name in (own, here if isinstance(here, str) else None):
            if name and zone_named(name):
                return name
        return self.settings.default_timezone

    async def describe_zones(self, platform: str, key: str, user_id: str) -> str:
        conv = await self.conversations.get(platform, key)
        own = await self.store.reminders.user_timezone(platform, user_id)
        here = conv.settings.get("timezone") or f"{self.settings.default_timezone} (the default)"
        now = local_time(self.clock(), await self.zone_of(platform, user_id, conv), self.clock())
        mine = own or "not set (the conversation's is used)"
        return f"Your time zone: {mine}. This conversation's: {here}. Your time now: {now}."

    async def set_zone(
        self, platform: str, key: str, user_id: str, name: str, *, conversation: bool
    ) -> str:
        """Set the user's zone, or the conversation's default; ``name`` "none" clears it."""
        clear = name.strip().lower() in {"none", "off", "clear"}
        zone = None if clear else zone_named(name)
        if zone is None and not clear:
            return f"{name.strip()[:64]!r} is not a time zone I know. {ZONE_HINT}"
        if conversation:
            conv = await self.conversations.get(platform, key)
            await self.conversations.update_settings(conv, timezone=zone)
            return f"This conversation's time zone is now {zone or self.settings.default_timezone}."
        await self.store.reminders.set_user_timezone(platform, user_id, zone)
        return f"Your time zone is now {zone}." if zone else "Your own time zone is cleared."

    # -- setting, listing, cancelling ---------------------------------------------------------

    async def add(self, platform: str, key: str, user_id: str, user_name: str, words: str) -> str:
        """Set a reminder from "<when> <what>"; the answer confirms it or says what is wrong."""
        settings = self.settings
        if not settings.enabled:
            return "Reminders are turned off on this bot ([reminders] enabled)."
        conv = await self.conversations.get(platform, key)
        zone = await self.zone_of(platform, user_id, conv)
        now = self.clock()
        words = words[: settings.max_text_chars + 200]  # bounds the parsing below
        try:
            request = await asyncio.to_thread(
                parse_request, words, zone, now, settings.min_interval_s
            )
        except NotUnderstood as exc:
            return str(exc)
        if len(request.what) > settings.max_text_chars:
            return f"That reminder is too long: {settings.max_text_chars} characters at most."
        if request.schedule.due_at > now + timedelta(days=settings.max_ahead_days):
            return f"That is too far ahead: at most {settings.max_ahead_days} days."
        here, mine = await self.store.reminders.open_counts(conv.id, platform, user_id)
        if mine >= settings.max_per_user:
            return (
                f"You have {mine} reminders to come already, the most one person may have "
                "(max_per_user). /reminders cancel one first."
            )
        if here >= settings.max_per_conversation:
            return (
                f"This conversation has {here} reminders to come already, the most it may hold "
                "(max_per_conversation)."
            )
        schedule = request.schedule
        await self.store.reminders.add(
            conv.id, platform, user_id, user_name, request.what, schedule.due_at,
            schedule.recurrence, zone,
        )  # fmt: skip
        when = local_time(schedule.due_at, zone, now)
        repeat = f" ({describe_recurrence(schedule.recurrence)})" if schedule.recurrence else ""
        return f"⏰ I will remind you {when}{repeat}: {request.what}"

    async def open_in(self, platform: str, key: str) -> list[Reminder]:
        conv = await self.conversations.get(platform, key)
        return await self.store.reminders.of_conversation(conv.id)

    async def listing(self, platform: str, key: str) -> str:
        held = await self.open_in(platform, key)
        if not held:
            return "No reminders to come here. Set one: /remind in 2 hours send the report."
        now = self.clock()
        lines = [f"Reminders here ({len(held)}):"]
        for number, reminder in enumerate(held, 1):
            repeat = f", {describe_recurrence(reminder.recurrence)}" if reminder.recurrence else ""
            when = local_time(reminder.due_at, reminder.timezone, now)
            lines.append(f"{number}. {when}{repeat} · {reminder.user_name}: {reminder.text[:120]}")
        lines.append("/reminders cancel <number> cancels one.")
        return "\n".join(lines)

    async def cancel(self, platform: str, key: str, reminder: Reminder) -> str:
        conv = await self.conversations.get(platform, key)
        if await self.store.reminders.cancel(reminder.id, conv.id):
            return f"Cancelled: {reminder.text[:120]}"
        return "That reminder was delivered or cancelled meanwhile."

    # -- delivery -----------------------------------------------------------------------------

    def loop(self, platform: str, send: Send) -> DeliveryLoop:
        return DeliveryLoop(self, platform, send)

    async def deliver_due(self, platform: str, send: Send) -> int:
        """Claim and deliver what is due on ``platform`` now; how many were claimed."""
        now = self.clock()
        stale = now - timedelta(seconds=STALE_CLAIM_S)
        claimed = await self.store.reminders.claim_due(
            (platform,), self.owner, now, stale, CLAIM_BATCH
        )
        for reminder in claimed:
            await self._deliver(reminder, send)
        return len(claimed)

    def _text(self, reminder: Reminder, now: datetime) -> str:
        text = f"⏰ Reminder: {reminder.text}"
        if (now - reminder.due_at).total_seconds() > self.settings.late_after_s:
            due = local_time(reminder.due_at, reminder.timezone, now)
            text += f"\n(Late: this was due {due}, while I was offline.)"
        if reminder.recurrence:
            text += f"\n({describe_recurrence(reminder.recurrence)} · /reminders cancel to stop)"
        return text

    async def _deliver(self, reminder: Reminder, send: Send) -> None:
        now = self.clock()
        late = (now - reminder.due_at).total_seconds() > self.settings.late_after_s
        reply = OutgoingReply(
            reminder.conversation_key,
            self._text(reminder, now),
            final=True,
            kind=ReplyKind.NOTICE,
            mention=Mention(reminder.user_id, reminder.user_name),
        )
        reminders = self.store.reminders
        try:
            await asyncio.wait_for(send(reply), SEND_TIMEOUT_S)
        except Exception as exc:  # whatever the platform raised: retried, then given up
            tries = reminder.attempts + 1
            retry = (
                now + timedelta(seconds=RETRY_AFTER_S[tries - 1])
                if tries <= len(RETRY_AFTER_S)
                else None
            )
            outcome = "retried" if retry else "failed"
            log.warning(
                "reminder %s in %s not delivered (%s): %s",
                reminder.id,
                reminder.conversation_key,
                "will retry" if retry else "giving up",
                exc or type(exc).__name__,
            )
            self.metrics.reminders.labels(outcome).inc()
            await reminders.not_delivered(reminder.id, self.owner, repr(exc), retry)
            return
        following = None
        if reminder.recurrence:
            # The next time after now: a recurring reminder missed while down fires once.
            following = next_due(reminder.recurrence, reminder.timezone, max(now, reminder.due_at))
        self.metrics.reminders.labels("late" if late else "delivered").inc()
        await reminders.delivered(reminder.id, self.owner, following)


class DeliveryLoop:
    """One platform's deliveries, from :meth:`start` until :meth:`stop` (which lets a
    delivery under way finish, so that its state is recorded)."""

    def __init__(self, reminders: Reminders, platform: str, send: Send) -> None:
        self.reminders = reminders
        self.platform = platform
        self.send = send
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and self.reminders.settings.enabled:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        poll = self.reminders.settings.poll_s
        while not self._stop.is_set():
            try:
                claimed = CLAIM_BATCH
                while claimed >= CLAIM_BATCH and not self._stop.is_set():
                    # A full batch: more may be due already.
                    claimed = await self.reminders.deliver_due(self.platform, self.send)
            except STORAGE_ERRORS as exc:
                log.warning("%s: could not look for due reminders: %s", self.platform, exc)
            except Exception:
                log.exception("%s: delivering reminders failed", self.platform)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), poll)
