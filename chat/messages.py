"""The two value types that cross between adapters and the core.

Adapters build an :class:`IncomingMessage` from a platform event (no platform object crosses into
``chat/``) and render each :class:`OutgoingReply` the core yields.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from chat.limits import MAX_AUTHOR_NAME_CHARS, clean_text


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file that came with a message or command; ``read`` downloads it (call it only after
    ``size`` was checked)."""

    name: str
    size: int
    read: Callable[[], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """One user message, normalised by an adapter.

    ``conversation_key`` is computed by the adapter (``discord:<channel>``, ``telegram:<chat>``,
    ``console:<user>``); ``mentions_bot`` is true when the message addresses the bot (mention,
    reply to the bot, command); in DMs every message addresses the bot.
    """

    platform: str
    conversation_key: str
    author_id: str
    author_name: str
    text: str
    mentions_bot: bool = True
    is_dm: bool = False
    platform_message_id: str | None = None
    # Discord: the author's role ids and the guild (for [access]); none elsewhere.
    roles: tuple[str, ...] = ()
    guild_id: str | None = None
    # Other users the message mentions (id, name), and whether its author administers the
    # conversation (asked only when a tool needs it; no rights without it), for the tools.
    mentions: tuple[tuple[str, str], ...] = ()
    is_admin: Callable[[], Awaitable[bool]] | None = None

    def __post_init__(self) -> None:
        # The one place platform text enters the bot: whatever a platform delivers, what the
        # core stores and tokenizes is valid text, and a display name is bounded.
        name = clean_text(self.author_name)[:MAX_AUTHOR_NAME_CHARS]
        object.__setattr__(self, "author_name", name)
        object.__setattr__(self, "text", clean_text(self.text))
        object.__setattr__(self, "author_id", clean_text(self.author_id))

    @property
    def addresses_bot(self) -> bool:
        return self.is_dm or self.mentions_bot


@dataclass(frozen=True, slots=True)
class Mention:
    """A user a reply pings (a reminder's owner); each adapter renders it its own way."""

    user_id: str
    name: str


class ReplyKind(Enum):
    """What an outgoing reply is, so adapters can style notices and apologies differently."""

    ANSWER = "answer"
    NOTICE = "notice"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class OutgoingReply:
    """A snapshot of the bot's reply: the full text so far, and whether it is the final one.

    Streaming yields several snapshots with growing ``text``; the last has ``final=True``.
    ``delta`` is what was added since the previous snapshot (for terminals that append).
    """

    conversation_key: str
    text: str
    delta: str = ""
    final: bool = False
    kind: ReplyKind = ReplyKind.ANSWER
    speaker: str | None = None
    reply_to: str | None = None
    swipe: tuple[int, int] | None = None  # (version shown, versions stored), for swipes
    stored_id: int | None = None  # the database id of a final, stored reply
    # The database id of the user message this answers: adapters report its delivery
    # (``chat.answers.Answers.piece_sent`` / ``delivered``) so a restart can finish it.
    answers: int | None = None
    # The platform messages this reply is written into instead of new ones (a regenerated,
    # swiped or continued reply: chosen in the conversation's turn, never before it).
    replaces: tuple[str, ...] = ()
    grows: bool = False  # the text grows in the messages it replaces (/continue)
    mention: Mention | None = None  # pinged at the start of the reply's first message


def notice(key: str, text: str, reply_to: str | None = None) -> OutgoingReply:
    """A complete notice: a refusal, a pointer, a limit reached."""
    return OutgoingReply(key, text, final=True, kind=ReplyKind.NOTICE, reply_to=reply_to)
