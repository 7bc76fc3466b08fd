"""What a command declaration holds, and what a platform hands a command when it runs.

A :class:`Command` names itself, describes its arguments, says who may run it and whether its
answer is private to the caller, and holds what it does.  Adapters render declarations as their
platform expects (slash commands, a command menu, the terminal's ``/commands``) and supply, in
an :class:`Invocation`, the facts only they know: who asks, where, whether they administer the
place, which files came with the command.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from chat.access import Access
from chat.actions import Actions
from chat.answers import Answers
from chat.continuation import Continuation
from chat.conversations import Conversations
from chat.documents.library import DocumentLibrary
from chat.documents.posting import Postings
from chat.messages import Attachment, OutgoingReply
from chat.queues import Arrival, Queues
from chat.reminders.service import Reminders
from chat.roleplay.characters import CharacterLibrary
from chat.roleplay.library import Library
from chat.roleplay.lorebook import Lorebook
from chat.settings import Settings
from chat.steering import Steering
from chat.summarize import Summaries
from chat.versions import Versions


class Rights(enum.Enum):
    """Who may run a command."""

    ANYONE = "anyone"
    ADMIN = "admin"  # administers this chat or channel (anyone, in their own DM)
    OWNER = "owner"  # a bot owner: changes what every conversation shares


class ArgKind(enum.Enum):
    TEXT = "text"
    NUMBER = "number"
    FLAG = "flag"  # a yes/no option; on text platforms, its name as a word
    FILE = "file"  # an attachment


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    description: str
    kind: ArgKind = ArgKind.TEXT
    required: bool = False
    choices: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)  # other words for a choice


class RightsUnknown(Exception):
    """The platform could not say whether the caller administers the place (a failed call)."""


@dataclass(frozen=True, slots=True)
class Terms:
    """How a platform names its admins and its places, for refusals."""

    admins: str = "admins"
    place: str = "conversation"
    platform_name: str = "the platform"


async def _anyone() -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Invocation:
    """One run of a command: who, where, with what."""

    platform: str
    key: str  # the conversation
    user_id: str
    user_name: str
    is_dm: bool
    args: Mapping[str, object] = field(default_factory=dict)
    files: Sequence[Attachment] = ()
    is_admin: Callable[[], Awaitable[bool]] = _anyone  # may raise RightsUnknown
    arrival: Arrival | None = None  # the command's place in its conversation's order
    terms: Terms = Terms()
    roles: tuple[str, ...] = ()  # Discord: the caller's role ids (for [access])
    guild_id: str | None = None

    def text(self, name: str) -> str:
        value = self.args.get(name)
        return "" if value is None else str(value)

    def flag(self, name: str) -> bool:
        return bool(self.args.get(name))


@dataclass(frozen=True, slots=True)
class Answer:
    """What a command answers.

    ``text`` is said on every platform (``private``: to the caller only, where the platform
    can; None: as the command declares).  ``ack`` is a short confirmation for platforms that
    give each command a response of its own (Discord), when ``text`` is empty.  ``posts`` are
    replies for the conversation itself (a greeting, a rewritten reply); ``stream`` is an
    answer streamed as the command's own response (/chat, /summarize).
    """

    text: str = ""
    private: bool | None = None
    ack: str | Callable[[OutgoingReply], str] = ""  # may depend on the first post
    posts: AsyncIterator[OutgoingReply] | None = None
    stream: AsyncIterator[OutgoingReply] | None = None
    markdown: bool = False  # ``text`` uses light Markdown (bold, italics)


class Engine(Protocol):
    """The parts of the engine the commands use (:class:`chat.core.ConversationCore`)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def characters(self) -> CharacterLibrary: ...
    @property
    def world_books(self) -> Mapping[str, Lorebook]: ...
    @property
    def access(self) -> Access: ...
    @property
    def queues(self) -> Queues: ...
    @property
    def conversations(self) -> Conversations: ...
    @property
    def answers(self) -> Answers: ...
    @property
    def actions(self) -> Actions: ...
    @property
    def steering(self) -> Steering: ...
    @property
    def continuation(self) -> Continuation: ...
    @property
    def summaries(self) -> Summaries: ...
    @property
    def library(self) -> Library: ...
    @property
    def versions(self) -> Versions: ...
    @property
    def documents(self) -> DocumentLibrary: ...
    @property
    def postings(self) -> Postings: ...
    @property
    def reminders(self) -> Reminders: ...


Run = Callable[[Engine, Invocation], Awaitable[Answer]]


@dataclass(frozen=True, slots=True)
class Command:
    """A command, declared once for every platform."""

    name: str
    description: str
    run: Run | None = None  # None: a group, run through one of its subcommands
    args: tuple[Arg, ...] = ()
    rights: Rights = Rights.ANYONE
    what: str = ""  # what it does, for refusals ("reset the conversation")
    private: bool = False  # its answer is for the caller only
    usage: str = ""  # how to write it, for help ("[roleplay|work]")
    subcommands: tuple[Command, ...] = ()
    default: str | None = None  # text platforms: the subcommand for words naming none
    # Its work is held to the fair-share limits by the engine itself (it makes the model
    # write); other commands pass the rate limit before they run.
    rationed: bool = False
    platforms: frozenset[str] | None = None  # only where it makes sense (None: everywhere)

    def sub(self, name: str) -> Command | None:
        return next((c for c in self.subcommands if c.name == name.lower()), None)

    def on(self, platform: str) -> bool:
        return self.platforms is None or platform in self.platforms
