"""The current schema as SQLAlchemy Core tables, used by every query in :mod:`storage.store`.

The tables are created and changed only by the ordered migrations in :mod:`storage.migrations`;
keep this file in step with them.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

conversations = Table(
    "conversations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("platform", String(32), nullable=False),
    Column("key", String(255), nullable=False, unique=True),
    Column("mode", String(16), nullable=True),
    Column("character", String(255), nullable=True),
    Column("settings", Text, nullable=False, default="{}"),
    # Messages with id <= reset_after_id belong to conversations before a /reset.
    Column("reset_after_id", Integer, nullable=False, default=0),
    # First message id the prompt window may include (moved forward in chunks when trimming).
    Column("window_start_id", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "conversation_id",
        Integer,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("role", String(16), nullable=False),
    Column("author_id", String(64), nullable=True),
    Column("author_name", String(255), nullable=True),
    Column("text", Text, nullable=False),
    Column("token_count", Integer, nullable=True),
    Column("platform_message_id", String(64), nullable=True),
    # For bot replies: the user message answered; orders a reply right after its question.
    Column("reply_to_id", Integer, nullable=True),
    # False for notices (e.g. "message too long") and messages that can never fit the window.
    Column("in_context", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Versions of one bot message (swipes) point at the first version's id.
    Column("swipe_of", Integer, nullable=True),
    # User messages that expect an answer: received -> answering -> answered | failed.
    Column("reply_state", String(16), nullable=True),
    Column("reply_error", Text, nullable=True),
    # JSON list of the platform ids showing the answer streamed so far (edited on recovery).
    Column("reply_pieces", Text, nullable=True),
    # JSON list of the speakers a turn planned, in order (a group scene may have several).
    Column("reply_plan", Text, nullable=True),
    # Bot replies: whether the final text reached the platform (NULL: stored before states).
    Column("delivered", Boolean, nullable=True),
    # Set when the platform reports an edit (the text is replaced) or a deletion (the message
    # also leaves the context).
    Column("edited_at", DateTime(timezone=True), nullable=True),
    Column("deleted_at", DateTime(timezone=True), nullable=True),
    Index("ix_messages_conversation_id_id", "conversation_id", "id"),
    Index("ix_messages_reply_state", "reply_state", "created_at"),
    Index("ix_messages_platform_message_id", "conversation_id", "platform_message_id"),
)


# Rolling summaries: each covers a conversation's messages first_id..last_id (since its reset).
summaries = Table(
    "summaries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "conversation_id",
        Integer,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("first_id", Integer, nullable=False),
    Column("last_id", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("token_count", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_summaries_conversation_id_last_id", "conversation_id", "last_id"),
)


# Files posted in a conversation (storage/migrations.py adds each backend's full-text index).
documents = Table(
    "documents",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "conversation_id",
        Integer,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("name", String(255), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("size", Integer, nullable=False),
    Column("pages", Integer, nullable=True),
    Column("chars", Integer, nullable=False),
    Column("poster_id", String(64), nullable=False),
    Column("poster_name", String(255), nullable=False),
    Column("platform_message_id", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_documents_conversation_id", "conversation_id"),
)

# A document's text in pieces sized in the office model's tokens; ``conversation_id`` is the
# document's, kept here so that a search never leaves its conversation.
document_chunks = Table(
    "document_chunks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("document_id", Integer, ForeignKey("documents.id", ondelete="CASCADE"), nullable=False),
    Column("conversation_id", Integer, nullable=False),
    Column("ordinal", Integer, nullable=False),
    Column("page", Integer, nullable=True),
    Column("char_start", Integer, nullable=False),
    Column("char_end", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("search_text", Text, nullable=False),
    Column("token_count", Integer, nullable=False),
    Index("ix_document_chunks_document_id", "document_id"),
    Index("ix_document_chunks_conversation_id", "conversation_id"),
)


# Reminders set by /remind or the set_reminder tool; ``state`` is their delivery's life:
# pending -> sending (claimed by one process) -> delivered | cancelled | failed; a recurring one
# goes back to pending with its next ``due_at``.
reminders = Table(
    "reminders",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "conversation_id",
        Integer,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("platform", String(32), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("user_name", String(255), nullable=False),
    Column("text", Text, nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("recurrence", String(64), nullable=True),
    Column("timezone", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_at", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("fired", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Index("ix_reminders_state_due_at", "state", "platform", "due_at"),
    Index("ix_reminders_conversation_id", "conversation_id", "state"),
    Index("ix_reminders_user", "platform", "user_id", "state"),
)

# Each user's own time zone (a conversation's default is in its settings).
user_timezones = Table(
    "user_timezones",
    metadata,
    Column("platform", String(32), primary_key=True),
    Column("user_id", String(64), primary_key=True),
    Column("timezone", String(64), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def _named_json(name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("name", String(255), nullable=False, unique=True),
        Column("data", Text, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )


# Imported character cards (the card JSON, unknown fields kept) and channel world books.
characters = _named_json("characters")
world_books = _named_json("world_books")
