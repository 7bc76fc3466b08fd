"""What the database's rows become: conversations, messages, summaries, unfinished answers,
and the names of message roles and reply states."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Row

USER = "user"
ASSISTANT = "assistant"
NOTICE = "notice"

# The life of a user message that expects an answer (messages.reply_state).
RECEIVED = "received"  # stored, waiting for its turn
ANSWERING = "answering"  # the model is writing the answer, or it is being delivered
ANSWERED = "answered"  # a complete answer reached the platform
FAILED = "failed"  # the user got a notice instead (reply_error says why)
OPEN_STATES = (RECEIVED, ANSWERING)


@dataclass(frozen=True, slots=True)
class Conversation:
    """A channel, chat or console session, identified by its adapter-made ``key``."""

    id: int
    platform: str
    key: str
    mode: str | None
    character: str | None
    settings: Mapping[str, Any] = field(default_factory=dict)
    reset_after_id: int = 0
    window_start_id: int = 0


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    role: str
    text: str
    author_id: str | None = None
    author_name: str | None = None
    token_count: int | None = None
    reply_to_id: int | None = None
    in_context: bool = True
    platform_message_id: str | None = None
    swipe_of: int | None = None
    reply_state: str | None = None
    delivered: bool | None = None

    @property
    def swipe_group(self) -> int:
        """The id shared by every version of this message."""
        return self.swipe_of if self.swipe_of is not None else self.id


@dataclass(frozen=True, slots=True)
class Summary:
    """A rolling summary of a conversation's messages ``first_id`` .. ``last_id``."""

    id: int
    first_id: int
    last_id: int
    text: str
    token_count: int


def conversation_of(row: Row[Any]) -> Conversation:
    return Conversation(
        id=row.id,
        platform=row.platform,
        key=row.key,
        mode=row.mode,
        character=row.character,
        settings=json.loads(row.settings or "{}"),
        reset_after_id=row.reset_after_id,
        window_start_id=row.window_start_id,
    )


def message_of(r: Row[Any]) -> StoredMessage:
    return StoredMessage(
        id=r.id,
        role=r.role,
        text=r.text,
        author_id=r.author_id,
        author_name=r.author_name,
        token_count=r.token_count,
        reply_to_id=r.reply_to_id,
        in_context=r.in_context,
        platform_message_id=r.platform_message_id,
        swipe_of=r.swipe_of,
        reply_state=r.reply_state,
        delivered=r.delivered,
    )


@dataclass(frozen=True, slots=True)
class Unanswered:
    """A user message whose answer never completed: what a restart must finish."""

    message: StoredMessage
    conversation_key: str
    platform: str
    pieces: tuple[str, ...]  # platform ids of the answer streamed before the stop
    # The speakers the turn planned, in order (None: the turn had not started).
    plan: tuple[str | None, ...] | None = None


@dataclass(frozen=True, slots=True)
class Document:
    """A file posted in a conversation, as the bot read it."""

    id: int
    name: str
    kind: str  # text, markdown, csv, json, code, html, pdf, docx
    size: int
    pages: int | None
    chars: int
    poster_id: str
    poster_name: str
    chunks: int = 0


@dataclass(frozen=True, slots=True)
class ChunkHit:
    """A chunk a search found, with where it comes from; a lower ``rank`` is a better match."""

    id: int
    document_id: int
    document_name: str
    page: int | None
    text: str
    token_count: int
    terms: str  # what the index holds for it (chat.documents.terms.search_text)
    rank: float


# The life of a reminder (reminders.state).
PENDING = "pending"  # waiting for its time
SENDING = "sending"  # one process claimed it and is delivering it
DELIVERED = "delivered"
CANCELLED = "cancelled"
GAVE_UP = "failed"  # the platform refused it every time (last_error says why)


@dataclass(frozen=True, slots=True)
class Reminder:
    """A reminder, with where it is delivered (``conversation_key``)."""

    id: int
    conversation_key: str
    platform: str
    user_id: str
    user_name: str
    text: str
    due_at: datetime
    recurrence: str | None
    timezone: str
    state: str
    attempts: int = 0
    fired: int = 0
