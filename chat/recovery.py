"""Finishing, after a restart, the answers a crash or a stop left undone.

Every user message that expects an answer carries its reply state in storage (received →
answering → answered, or failed).  At start-up each platform adapter asks :class:`Recovery`
for the messages of its platform still received or answering:

- those within ``[bot] recover_window`` are answered once, in their conversation's order: a
  stored but undelivered answer is delivered, otherwise the answer is written again; either
  edits the messages a cut-off stream left on the platform (``pieces``) or quotes the message;
- older ones are closed as failed, and each conversation gets one short "I was offline" notice
  (or none, with ``offline_notice = false``).

Discord also fetches the messages that arrived while the bot was away (:meth:`catch_up_points`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from chat.answers import Answers
from chat.conversations import Conversations
from chat.messages import OutgoingReply, ReplyKind
from chat.queues import Queues, Ticket
from chat.settings import Settings
from storage.records import ANSWERED, FAILED, Unanswered
from storage.store import STORAGE_ERRORS, Store

log = logging.getLogger(__name__)

OFFLINE = (
    "Sorry, I was offline when you sent this and could not answer it then. "
    "If you still need an answer, please send it again."
)
MAX_OFFLINE_NOTICES = 100  # per start: a long outage must not turn into a flood of notices
# Discord catch-up: channels with a stored user message in the last week, at most this many.
CATCH_UP_ACTIVE = timedelta(days=7)
MAX_CATCH_UP_CHANNELS = 200


@dataclass(slots=True)
class Resumable:
    """One message to answer again, holding its place in its conversation's queue."""

    item: Unanswered
    ticket: Ticket

    @property
    def conversation_key(self) -> str:
        return self.item.conversation_key

    @property
    def platform_message_id(self) -> str | None:
        return self.item.message.platform_message_id

    @property
    def pieces(self) -> tuple[str, ...]:
        return self.item.pieces


@dataclass(frozen=True, slots=True)
class RecoveryPlan:
    resume: list[Resumable]
    notices: list[OutgoingReply]  # one "I was offline" per conversation with older messages


class Recovery:
    """What one platform must finish after a restart, and the answers that finish it."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        conversations: Conversations,
        queues: Queues,
        answers: Answers,
        started_at: datetime,
    ) -> None:
        self.settings = settings
        self.store = store
        self.conversations = conversations
        self.queues = queues
        self.answers = answers
        self.started_at = started_at  # messages stored from then on are this run's to answer

    def _window_start(self) -> datetime:
        return self.started_at - timedelta(seconds=self.settings.recover_window)

    async def plan(self, platform: str) -> RecoveryPlan:
        """The unfinished messages of ``platform``; each recent one takes its answering turn
        now, so that it is answered before anything that arrives after the restart.

        Only messages stored before this run started count: a message that arrives while
        the plan is made (Discord delivers them as soon as it is connected) is answered live.
        """
        since = self._window_start()
        store = self.store
        recent = await store.replies.unanswered(platform, since=since, before=self.started_at)
        # Synchronously after the query: no new message can take a turn in between.
        resume = [Resumable(item, self.queues.ticket(item.conversation_key)) for item in recent]
        older = await store.replies.unanswered(platform, before=since)
        # One write closes them all: after a long outage there may be many.
        await store.replies.close([item.message.id for item in older], error="offline")
        newest = {item.conversation_key: item for item in older}  # oldest first: newest wins
        notices: dict[str, OutgoingReply] = {}
        if self.settings.offline_notice:
            for key, item in list(newest.items())[:MAX_OFFLINE_NOTICES]:
                notices[key] = OutgoingReply(
                    key,
                    OFFLINE,
                    final=True,
                    kind=ReplyKind.NOTICE,
                    reply_to=item.message.platform_message_id,
                )
        if resume or older:
            log.info(
                "%s: %d unanswered message(s) to finish, %d older one(s) closed (%d notice(s))",
                platform,
                len(resume),
                len(older),
                len(notices),
            )
        return RecoveryPlan(resume, list(notices.values()))

    async def resume(self, job: Resumable, is_dm: bool) -> AsyncIterator[OutgoingReply]:
        """The answer to one unfinished message, to stream with ``resume=job.pieces``.

        A turn of several speakers is finished speaker by speaker: a reply stored but not
        delivered is delivered as it was, the speaker that was cut is written again (into the
        pieces it had shown), and those delivered before are left alone.
        """
        item = job.item
        message = item.message
        key = item.conversation_key
        try:
            await job.ticket.wait()
            conv = await self.conversations.get(item.platform, key)
            if message.id <= conv.reset_after_id:
                # Reset since: the answer would belong to a conversation that is over.
                await self.store.replies.set_state(message.id, FAILED, error="reset", pieces=[])
                return
            replies = [
                r
                for r in await self.store.replies.replies_to(message.id)
                if r.in_context and r.swipe_of is None
            ]
            pending = [r for r in replies if r.delivered is False]
            for stored in pending:  # written before the stop, never shown in full: show it now
                yield OutgoingReply(
                    key,
                    stored.text,
                    final=True,
                    speaker=stored.author_name,
                    reply_to=message.platform_message_id,
                    stored_id=stored.id,
                    answers=message.id,
                )
            plan = item.plan
            spoken = [r.author_name for r in replies]
            if plan is None:  # stopped before the turn began (or stored before plans existed)
                if replies and not job.pieces:
                    await self.store.replies.set_state(message.id, ANSWERED, pieces=[])
                    return
            elif len(spoken) >= len(plan):
                if not pending:  # answered; only the bookkeeping was cut off
                    await self.store.replies.set_state(message.id, ANSWERED, pieces=[])
                return
            yield OutgoingReply(key, "", reply_to=message.platform_message_id)
            async for reply in self.answers.answer_turn(
                item.platform,
                key,
                is_dm,
                message,
                message.platform_message_id,
                plan=plan,
                done=spoken if plan is not None else (),
            ):
                yield reply
        except STORAGE_ERRORS as exc:
            log.error("%s: could not finish message %s: %s", key, message.id, exc)
        finally:
            job.ticket.release()

    async def catch_up_points(self, platform: str, connected_at: datetime) -> list[tuple[str, str]]:
        """(conversation key, platform id of its newest user message stored before
        ``connected_at``) of the channels to look through for messages that arrived while
        the bot was away.  A message stored since came over this connection: it is no mark,
        or the missed ones before it would never be fetched."""
        since = datetime.now(UTC) - CATCH_UP_ACTIVE
        return await self.store.messages.recent_channels(
            platform, since, MAX_CATCH_UP_CHANNELS, before=connected_at
        )

    def window_start(self) -> datetime:
        """Messages older than this are not caught up."""
        return self._window_start()


async def finish(platform: str, jobs: list[asyncio.Task[Any]], started: float) -> None:
    """Wait for an adapter's recovery jobs; log their failures and how long it all took
    (``started``: the loop time when recovery began)."""
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            log.error("%s: recovering a message failed: %r", platform, result)
    if jobs:
        took = asyncio.get_running_loop().time() - started
        log.info("%s: recovery finished in %.1fs (%d job(s))", platform, took, len(jobs))
