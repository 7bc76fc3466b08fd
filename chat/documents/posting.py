"""Files posted with a message: in a work conversation they become its documents.

Adapters hand over the message (as an :class:`IncomingMessage`) and its files; the engine
decides whether they are read (work mode, the poster allowed), and the poster gets one line
per file.  Roleplay scenes keep ignoring files, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from chat.access import Access, Requester
from chat.conversations import Conversations
from chat.documents.library import DocumentLibrary
from chat.messages import Attachment, IncomingMessage
from chat.queues import Queues
from storage.store import STORAGE_ERRORS

log = logging.getLogger(__name__)


class Postings:
    """Reads the files of incoming messages into their conversation's documents."""

    def __init__(
        self,
        library: DocumentLibrary,
        conversations: Conversations,
        access: Access,
        queues: Queues,
    ) -> None:
        self.library = library
        self.conversations = conversations
        self.access = access
        self.queues = queues

    async def receive(self, msg: IncomingMessage, files: Sequence[Attachment]) -> list[str] | None:
        """Read ``files`` posted with ``msg``: the lines for the poster, or None when the
        files are not the bot's business here (a roleplay scene, documents off, a refused
        poster)."""
        if not files or not self.library.settings.enabled:
            return None
        key = msg.conversation_key
        who = Requester(msg.platform, msg.author_id, key, msg.is_dm, msg.roles, msg.guild_id)
        if not self.access.permits(who):
            return None
        try:
            conv = await self.conversations.get(msg.platform, key)
        except STORAGE_ERRORS as exc:
            log.error("documents: no conversation for %s: %s", key, exc)
            return ["I could not save your file right now; please post it again."]
        if self.conversations.mode_of(conv, msg.is_dm) != "work":
            return None
        allowed, told = self.queues.admit(msg.platform, msg.author_id)
        if not allowed:
            return [told] if told else []
        return await self.library.add(
            conv.id, files, msg.author_id, msg.author_name, msg.platform_message_id
        )
