"""Edits and deletions reported by the platforms: the stored history follows them.

An edited message's new text replaces the old one and a deleted message leaves the context
(a moderator's purge deletes many at once); the next prompt differs from that message on, so
llama.cpp reuses the evaluated prefix before it and recomputes only the rest.  They take their
place in the conversation's arrival order but never wait for an answer's turn: a message still
queued is answered with its new text, and one deleted before its answer starts gets none.  An
edit of a message already answered is not answered again, unless ``regenerate_on_edit`` is on
and the edited message is the one the last reply answers (that reply is then written again, as
/regenerate would).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence

from chat.conversations import Conversations
from chat.documents.library import DocumentLibrary
from chat.fairness import LruDict
from chat.limits import clean_text
from chat.messages import OutgoingReply
from chat.prompt.history import HistoryCache
from chat.queues import Arrival, Queues
from chat.settings import Settings
from storage.records import USER
from storage.store import STORAGE_ERRORS, Store

log = logging.getLogger(__name__)

DELETED = object()  # what :meth:`Edits.arrived` returns for a message deleted early
MAX_EARLY = 4096  # edits and deletions remembered for messages not stored yet
MAX_DELETED = 4096  # stored messages remembered as deleted (so a waiting one gets no answer)
MAX_BULK = 100  # Discord deletes at most 100 messages in one purge

Regenerate = Callable[[str, str, bool, str | None], AsyncIterator[OutgoingReply]]


class Edits:
    """The engine's handling of platform edit and delete events."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        conversations: Conversations,
        queues: Queues,
        history: HistoryCache,
        documents: DocumentLibrary | None = None,
    ) -> None:
        self.settings = settings
        self.documents = documents  # a deleted message takes the files it came with
        self.store = store
        self.conversations = conversations
        self.queues = queues
        self.history = history
        # Edits and deletions of messages not stored yet (the events can overtake the message
        # on its way in): applied when it is stored.
        self._early: LruDict[tuple[str, str], object] = LruDict(MAX_EARLY)
        self._deleted: LruDict[int, bool] = LruDict(MAX_DELETED)
        self.regenerate: Regenerate | None = None  # given by the engine: the answer pipeline's

    def arrived(self, key: str, platform_message_id: str | None) -> object:
        """For a message being stored: its newest text if it was edited before, or
        :data:`DELETED`; None when nothing happened to it (the caller holds its arrival)."""
        if platform_message_id is None:
            return None
        return self._early.pop((key, platform_message_id))

    def was_deleted(self, message_id: int) -> bool:
        """Whether stored message ``message_id`` was deleted on the platform since."""
        return self._deleted.get(message_id) is not None

    async def edited(
        self,
        platform: str,
        key: str,
        platform_message_id: str,
        text: str,
        is_dm: bool = False,
        arrival: Arrival | None = None,
    ) -> AsyncIterator[OutgoingReply]:
        """Follow an edit; yields the rewritten reply when ``regenerate_on_edit`` asks for
        one, else nothing."""
        arrival = arrival or self.queues.arrive(key)
        text = clean_text(text).strip()
        if not text:
            arrival.settle()
            return
        async with arrival:
            conv = await self.conversations.known(key)
            if conv is None:  # a channel the bot never stored anything of
                self._early[(key, platform_message_id)] = text
                return
            try:
                changed = await self.store.messages.edit_platform(
                    conv.id, platform_message_id, text
                )
            except STORAGE_ERRORS as exc:
                log.error("could not store an edit in %s: %s", key, exc)
                return
            if changed is None:
                self._early[(key, platform_message_id)] = text
                return
        before, after = changed
        if before.text == after.text:
            return
        self.history.replaced(key, after)
        log.info("%s: message %s edited", key, after.id)
        if not self.settings.regenerate_on_edit or after.role != USER or self.regenerate is None:
            return
        last = await self.store.messages.last_reply(conv.id, after_id=conv.reset_after_id)
        if last is not None and last.reply_to_id == after.id:
            async for reply in self.regenerate(platform, key, is_dm, after.author_id):
                yield reply

    async def deleted(
        self,
        platform: str,
        key: str,
        platform_message_ids: Sequence[str],
        arrival: Arrival | None = None,
    ) -> int:
        """Follow a deletion (a moderator's purge: many): the messages leave the context.
        Returns how many were stored."""
        ids = list(dict.fromkeys(platform_message_ids))[:MAX_BULK]
        async with arrival or self.queues.arrive(key):
            conv = await self.conversations.known(key)
            if conv is None:
                for pid in ids:
                    self._early[(key, pid)] = DELETED
                return 0
            try:
                if self.documents is not None:
                    await self.documents.forget_messages(conv.id, ids)
                gone = await self.store.messages.delete_platform(conv.id, ids)
            except STORAGE_ERRORS as exc:
                log.error("could not store a deletion in %s: %s", key, exc)
                return 0
            found = {m.platform_message_id for m in gone}
            for pid in ids:
                if pid not in found:
                    self._early[(key, pid)] = DELETED
        for message in gone:
            self._deleted[message.id] = True
            self.history.removed(key, message.id)
            log.info("%s: message %s deleted", key, message.id)
        return len(gone)
