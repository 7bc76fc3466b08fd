"""The in-context history of recently active conversations, kept in memory.

Building a prompt needs every message since the window start; reading them from the database on
every message costs more than everything else the core does.  The cache is filled from the
database on first use, updated as messages are stored, and dropped whenever messages change in
ways it does not follow (reset, regenerate, swipes).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import replace

from storage.records import Conversation, StoredMessage
from storage.store import Store


def position(message: StoredMessage) -> tuple[int, int]:
    """Conversation order: a reply sorts right after the message it answers."""
    anchor = message.reply_to_id if message.reply_to_id is not None else message.id
    return (anchor, message.id)


class HistoryCache:
    """In-context messages after ``max(reset, window start - 1)``, per conversation key."""

    def __init__(self, store: Store, max_conversations: int = 512, max_rows: int = 8192) -> None:
        self.store = store
        self.max_conversations = max_conversations
        # More messages than could ever fit in a window (every turn costs at least two tokens)
        # are never read nor kept: a channel's unaddressed chatter costs a bounded amount.
        self.max_rows = max_rows
        self._cache: OrderedDict[str, list[StoredMessage]] = OrderedDict()
        # Messages stored while a conversation's history is being read: the read may or may
        # not see them, so they are merged in afterwards.
        self._loading: dict[str, list[StoredMessage]] = {}

    async def get(self, conv: Conversation) -> list[StoredMessage]:
        found = self._cache.get(conv.key)
        if found is not None:
            self._cache.move_to_end(conv.key)
            return found
        after = max(conv.reset_after_id, conv.window_start_id - 1)
        arrived = self._loading.setdefault(conv.key, [])
        try:
            found = await self.store.messages.history(conv.id, after_id=after, newest=self.max_rows)
        finally:
            self._loading.pop(conv.key, None)
        known = {m.id for m in found}
        found.extend(m for m in arrived if m.id not in known and m.id > after)
        found.sort(key=position)
        del found[: -self.max_rows]
        self._cache[conv.key] = found
        if len(self._cache) > self.max_conversations:
            self._cache.popitem(last=False)
        return found

    async def save(self, conv: Conversation, message: StoredMessage) -> StoredMessage:
        """Store ``message`` in ``conv`` (its id is assigned) and keep the cache in step."""
        fields = {
            name: getattr(message, name)
            for name in (
                "author_id",
                "author_name",
                "token_count",
                "platform_message_id",
                "reply_to_id",
                "in_context",
                "swipe_of",
                "reply_state",
                "delivered",
            )
        }
        message_id = await self.store.messages.add(conv.id, message.role, message.text, **fields)
        stored = replace(message, id=message_id)
        self.added(conv.key, stored, after=conv.reset_after_id)
        return stored

    def added(self, key: str, message: StoredMessage, after: int = 0) -> None:
        """A message was stored in context; keep the cached order.

        ``after`` is the conversation's reset boundary: a reply to a message from before a
        reset (finished after it) is stored but is not part of the new history.
        """
        if not message.in_context or position(message)[0] <= after:
            return
        if key in self._loading:
            self._loading[key].append(message)
        found = self._cache.get(key)
        if found is not None:
            if not found or position(found[-1]) <= position(message):
                found.append(message)  # the usual case: the newest message
            else:
                bisect.insort(found, message, key=position)
            if len(found) > self.max_rows:
                del found[: len(found) - self.max_rows]

    def replaced(self, key: str, message: StoredMessage) -> None:
        """A stored message's text changed (a platform edit)."""
        found = self._cache.get(key)
        if found is not None:
            found[:] = [message if m.id == message.id else m for m in found]
        for arrived in self._loading.get(key, []):
            if arrived.id == message.id:
                self.forget(key)  # rare: being read right now; read it again next time
                return

    def removed(self, key: str, message_id: int) -> None:
        """A stored message left the context (a platform deletion)."""
        found = self._cache.get(key)
        if found is not None:
            found[:] = [m for m in found if m.id != message_id]
        if key in self._loading:
            self.forget(key)

    def window_moved(self, key: str, start: int) -> None:
        found = self._cache.get(key)
        if found is not None:
            found[:] = [m for m in found if m.id >= start]

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)
        self._loading.pop(key, None)
