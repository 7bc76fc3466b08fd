"""Ordered, named schema migrations, applied at start-up inside one transaction each.

Each migration describes its own tables rather than importing :mod:`storage.schema`, so that a
later change to the current schema never rewrites what an old migration did.  Add new ones at the
end; never edit or reorder applied ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    select,
    text,
)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Connection], None]


_meta = MetaData()
schema_migrations = Table(
    "schema_migrations",
    _meta,
    Column("version", Integer, primary_key=True),
    Column("name", String(255), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)


def _create_conversations_and_messages(conn: Connection) -> None:
    meta = MetaData()
    Table(
        "conversations",
        meta,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("platform", String(32), nullable=False),
        Column("key", String(255), nullable=False, unique=True),
        Column("mode", String(16), nullable=True),
        Column("character", String(255), nullable=True),
        Column("settings", Text, nullable=False),
        Column("reset_after_id", Integer, nullable=False),
        Column("window_start_id", Integer, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "messages",
        meta,
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
        Column("reply_to_id", Integer, nullable=True),
        Column("in_context", Boolean, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
    )
    meta.create_all(conn)


def _add_cards_world_books_and_swipes(conn: Connection) -> None:
    meta = MetaData()
    for name in ("characters", "world_books"):
        Table(
            name,
            meta,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("name", String(255), nullable=False, unique=True),
            Column("data", Text, nullable=False),
            Column("created_at", DateTime(timezone=True), nullable=False),
            Column("updated_at", DateTime(timezone=True), nullable=False),
        )
    meta.create_all(conn)
    # Versions of one bot message (regenerations, alternative greetings) share the id of the
    # first version here; exactly one of them is in context.
    conn.execute(text("ALTER TABLE messages ADD COLUMN swipe_of INTEGER"))


def _add_reply_states(conn: Connection) -> None:
    # A user message that expects an answer moves through reply_state: received -> answering
    # -> answered, or -> failed (reply_error says why).  reply_pieces lists the platform ids of
    # the answer streamed so far, so a restart can edit them instead of leaving a stub.  A bot
    # reply's delivered is false until its final text reached the platform.  Older rows keep
    # NULL: they predate the states and are never recovered.
    for statement in (
        "ALTER TABLE messages ADD COLUMN reply_state VARCHAR(16)",
        "ALTER TABLE messages ADD COLUMN reply_error TEXT",
        "ALTER TABLE messages ADD COLUMN reply_pieces TEXT",
        "ALTER TABLE messages ADD COLUMN delivered BOOLEAN",
        "CREATE INDEX ix_messages_reply_state ON messages (reply_state, created_at)",
        "CREATE INDEX ix_messages_platform_message_id "
        "ON messages (conversation_id, platform_message_id)",
    ):
        conn.execute(text(statement))


def _add_memory_and_edits(conn: Connection) -> None:
    # Rolling summaries of what fell out of the window: each covers the conversation's messages
    # from first_id to last_id (everything since its reset), the newest per conversation wins.
    # Messages remember when the platform edited or deleted them.
    meta = MetaData()
    Table("conversations", meta, Column("id", Integer, primary_key=True))
    Table(
        "summaries",
        meta,
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
    meta.create_all(conn, tables=[meta.tables["summaries"]])
    for statement in (
        "ALTER TABLE messages ADD COLUMN edited_at TIMESTAMP WITH TIME ZONE",
        "ALTER TABLE messages ADD COLUMN deleted_at TIMESTAMP WITH TIME ZONE",
    ):
        conn.execute(text(statement))


def _add_reply_plans(conn: Connection) -> None:
    # A turn's speakers, in order, stored with its question: each speaker's reply carries its
    # own delivery state, so a restart finishes the speaker that was cut and repeats none.
    conn.execute(text("ALTER TABLE messages ADD COLUMN reply_plan TEXT"))


def _add_documents(conn: Connection) -> None:
    # Files posted in a conversation and their chunks, searched with the database's own full-text
    # index: FTS5 (bm25) on SQLite, a tsvector column with a GIN index on PostgreSQL.  Both index
    # ``search_text``: the chunk's stemmed words, text that has no spaces as character pairs.
    meta = MetaData()
    Table("conversations", meta, Column("id", Integer, primary_key=True))
    Table(
        "documents",
        meta,
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
    Table(
        "document_chunks",
        meta,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column(
            "document_id", Integer, ForeignKey("documents.id", ondelete="CASCADE"), nullable=False
        ),
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
    meta.create_all(conn, tables=[meta.tables["documents"], meta.tables["document_chunks"]])
    statements: tuple[str, ...]
    if conn.dialect.name == "sqlite":
        statements = (
            # Contentless: the chunk's text lives in document_chunks; the index holds its
            # terms and its conversation (``scope``, a term of its own: a search intersects it
            # first, so its cost follows its conversation's chunks, not every conversation's).
            "CREATE VIRTUAL TABLE document_index USING fts5(scope, search_text, content='', "
            "tokenize='unicode61 remove_diacritics 2')",
            # How many chunks hold each term: the search leaves out terms too common to rank.
            "CREATE VIRTUAL TABLE document_terms USING fts5vocab(document_index, 'row')",
            "CREATE TRIGGER document_chunks_indexed AFTER INSERT ON document_chunks BEGIN "
            "INSERT INTO document_index(rowid, scope, search_text) "
            "VALUES (new.id, 'c' || new.conversation_id, new.search_text); END",
            "CREATE TRIGGER document_chunks_unindexed AFTER DELETE ON document_chunks BEGIN "
            "INSERT INTO document_index(document_index, rowid, scope, search_text) "
            "VALUES ('delete', old.id, 'c' || old.conversation_id, old.search_text); END",
        )
    else:
        statements = (
            "ALTER TABLE document_chunks ADD COLUMN search tsvector "
            "GENERATED ALWAYS AS (to_tsvector('simple', search_text)) STORED",
            "CREATE INDEX ix_document_chunks_search ON document_chunks USING GIN (search)",
        )
    for statement in statements:
        conn.execute(text(statement))


def _add_reminders(conn: Connection) -> None:
    meta = MetaData()
    Table("conversations", meta, Column("id", Integer, primary_key=True))
    Table(
        "reminders",
        meta,
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
    Table(
        "user_timezones",
        meta,
        Column("platform", String(32), primary_key=True),
        Column("user_id", String(64), primary_key=True),
        Column("timezone", String(64), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    meta.create_all(conn, tables=[meta.tables["reminders"], meta.tables["user_timezones"]])


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create_conversations_and_messages", _create_conversations_and_messages),
    Migration(2, "add_cards_world_books_and_swipes", _add_cards_world_books_and_swipes),
    Migration(3, "add_reply_states", _add_reply_states),
    Migration(4, "add_memory_and_edits", _add_memory_and_edits),
    Migration(5, "add_reply_plans", _add_reply_plans),
    Migration(6, "add_documents", _add_documents),
    Migration(7, "add_reminders", _add_reminders),
)


def applied_versions(conn: Connection) -> set[int]:
    if not inspect(conn).has_table("schema_migrations"):
        return set()
    return set(conn.execute(select(schema_migrations.c.version)).scalars())


def migrate(conn: Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet recorded, in order; return the names applied."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise RuntimeError("migrations must have unique, increasing versions")
    _meta.create_all(conn, tables=[schema_migrations])
    done = applied_versions(conn)
    applied: list[str] = []
    for migration in migrations:
        if migration.version in done:
            continue
        with conn.begin_nested():
            migration.apply(conn)
            conn.execute(
                schema_migrations.insert().values(
                    version=migration.version, name=migration.name, applied_at=datetime.now(UTC)
                )
            )
        applied.append(migration.name)
    return applied
