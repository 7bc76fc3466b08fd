"""Edits and deletions reported by the platforms: the stored history follows them.

An edited message's new text replaces the old one and a deleted message leaves the context;
the next prompt differs from that message on, so llama.cpp reuses the evaluated prefix before
it and recomputes only the rest.  Neither waits for the conversation's turn: a message still
queued is answered with its new text.  An edit of a message already answered is not answered
again, unless ``regenerate_on_edit`` is on and the edited message is the one the last reply
answers (that reply is then written again, as /regenerate would).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from chat.conversations import ConversationState
from chat.fairness import LruDict
from chat.limits import clean_text
from chat.messages import OutgoingReply
from storage.records import USER, Conversation
from storage.store import STORAGE_ERRORS

log = logging.getLogger(__name__)

DELETED = object()  # what :meth:`FollowsEdits.arrived` returns for a message deleted early
MAX_EARLY = 4096  # edits and deletions remembered for messages not stored yet


class FollowsEdits(ConversationState):
    """The core's handling of platform edit and delete events."""

    # Edits and deletions of messages not stored yet (the events can overtake the message
    # on its way in): applied when it is stored.  Both sides hold the conversation's intake.
    _early: LruDict[tuple[str, str], object] | None = None

    def arrived(self, key: str, platform_message_id: str | None) -> object:
        """For a message being stored: its newest text if it was edited before, or
        :data:`DELETED`; None when nothing happened to it (caller holds the intake)."""
        if platform_message_id is None or self._early is None:
            return None
        return self._early.pop((key, platform_message_id))

    async def _known(self, key: str) -> Conversation | None:
        """The conversation, if it exists: edits elsewhere never create one."""
        conv = self._conversations.get(key)
        if conv is None:
            conv = await self.store.get_conversation(key)
            if conv is not None:
                self._conversations[key] = conv
        return conv

    def _remember_early(self, key: str, platform_message_id: str, change: object) -> None:
        if self._early is None:
            self._early = LruDict(MAX_EARLY)
        self._early[(key, platform_message_id)] = change

    def regenerate(
        self, platform: str, key: str, is_dm: bool, user_id: str | None = None
    ) -> AsyncIterator[OutgoingReply]:
        raise NotImplementedError  # the answer pipeline (chat.core) provides it

    async def message_edited(
        self, platform: str, key: str, platform_message_id: str, text: str, is_dm: bool = False
    ) -> AsyncIterator[OutgoingReply]:
        """Follow an edit; yields the rewritten reply when ``regenerate_on_edit`` asks for
        one, else nothing."""
        text = clean_text(text).strip()
        if not text:
            return
        async with self._channel(key).intake:
            conv = await self._known(key)
            if conv is None:  # a channel the bot never stored anything of
                self._remember_early(key, platform_message_id, text)
                return
            try:
                changed = await self.store.edit_platform_message(conv.id, platform_message_id, text)
            except STORAGE_ERRORS as exc:
                log.error("could not store an edit in %s: %s", key, exc)
                return
            if changed is None:
                self._remember_early(key, platform_message_id, text)
                return
        before, after = changed
        if before.text == after.text:
            return
        self.history.replaced(key, after)
        log.info("%s: message %s edited", key, after.id)
        if not self.settings.regenerate_on_edit or after.role != USER:
            return
        last = await self.store.last_reply(conv.id, after_id=conv.reset_after_id)
        if last is not None and last.reply_to_id == after.id:
            async for reply in self.regenerate(platform, key, is_dm, after.author_id):
                yield reply

    async def message_deleted(self, platform: str, key: str, platform_message_id: str) -> bool:
        """Follow a deletion: the message leaves the context.  False: nothing stored for it."""
        async with self._channel(key).intake:
            conv = await self._known(key)
            if conv is None:
                self._remember_early(key, platform_message_id, DELETED)
                return False
            try:
                gone = await self.store.delete_platform_message(conv.id, platform_message_id)
            except STORAGE_ERRORS as exc:
                log.error("could not store a deletion in %s: %s", key, exc)
                return False
            if gone is None:
                self._remember_early(key, platform_message_id, DELETED)
                return False
        self.history.removed(key, gone.id)
        log.info("%s: message %s deleted", key, gone.id)
        return True
