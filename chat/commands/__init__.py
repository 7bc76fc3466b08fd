"""The commands users type, declared once, and the rules every platform applies to them.

Each declaration (:mod:`chat.commands.spec`) lives in :mod:`chat.commands.conversation`,
:mod:`chat.commands.replies`, :mod:`chat.commands.memory`,
:mod:`chat.commands.documents` or :mod:`chat.commands.reminders`; adding a command means one
declaration and its tests.  :class:`CommandSet` holds them and runs one: the rate limit, the
rights rule, then its work.  For text platforms it also reads a typed command's words
(:meth:`CommandSet.parse`) and writes /help.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from chat.access import REFUSED, Requester
from chat.commands import conversation, documents, memory, reminders, replies, tools
from chat.commands.conversation import allowed
from chat.commands.spec import (
    Answer,
    Arg,
    ArgKind,
    Command,
    Engine,
    Invocation,
    Rights,
    RightsUnknown,
)
from chat.limits import shorten

log = logging.getLogger(__name__)

# What adapters say outside any one command (their wording lives here too).
HANDLER_FAILED = "Sorry, something went wrong on my side while handling that. Please try again."
SLASH_POINTER = "My commands are slash commands: type / and pick one (/help)."
TEXT_ONLY = "I can only read text for now — please send it as a message."
SLOW_DOWN = "You are sending commands too quickly; please wait a moment."
NOT_HERE = REFUSED  # a refused caller's private answer where the platform gives one
GROUP_HINT = "In groups I answer when mentioned, replied to, or (in roleplay) named."


@dataclass(frozen=True, slots=True)
class Parsed:
    """A typed command read against its declaration."""

    command: Command
    args: dict[str, object]
    path: str  # "character set": what was run, for logs


class CommandSet:
    """Every command, and how one is run."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        help_ = Command("help", "What I do here and my commands", self._help, private=True)
        self.all: tuple[Command, ...] = (
            *conversation.COMMANDS,
            *replies.COMMANDS,
            *memory.COMMANDS,
            *documents.COMMANDS,
            *reminders.COMMANDS,
            *tools.COMMANDS,
            help_,
        )

    def on(self, platform: str) -> list[Command]:
        """The commands a platform shows (its menu, its slash commands, its /help)."""
        return [c for c in self.all if c.on(platform)]

    def find(self, name: str, platform: str) -> Command | None:
        return next((c for c in self.on(platform) if c.name == name.lower()), None)

    # -- running ------------------------------------------------------------------------------

    async def run(self, command: Command, inv: Invocation) -> Answer:
        """Run ``command`` (a leaf, not a group) for ``inv``: the rate limit (for commands the
        engine does not ration itself), then the rights rule, then its work."""
        engine = self.engine
        who = Requester(inv.platform, inv.user_id, inv.key, inv.is_dm, inv.roles, inv.guild_id)
        if not engine.access.permits(who):  # private where the platform can; a DM is told
            if inv.arrival is not None:
                inv.arrival.settle()
            return Answer(text=engine.access.notice(who) or "", ack=NOT_HERE, private=True)
        if not command.rationed:
            admitted, told = engine.queues.admit(inv.platform, inv.user_id)
            if not admitted:
                if inv.arrival is not None:
                    inv.arrival.settle()
                return Answer(text=told or "", ack=SLOW_DOWN, private=True)
        try:
            if not await allowed(inv, command.rights, engine):
                if inv.arrival is not None:
                    inv.arrival.settle()
                return self._refusal(inv, command)
            assert command.run is not None, f"/{command.name} is a group"
            return await command.run(engine, inv)
        except RightsUnknown as exc:
            log.warning("%s: could not check the rights of %s: %s", inv.key, inv.user_id, exc)
            if inv.arrival is not None:
                inv.arrival.settle()
            return Answer(
                text=f"I could not check whether you may {command.what or 'do that'}: "
                f"{inv.terms.platform_name} did not tell me your role. Please try again in a "
                "moment.",
                private=True,
            )

    @staticmethod
    def _refusal(inv: Invocation, command: Command) -> Answer:
        if command.rights is Rights.OWNER:
            return Answer(
                text=f"Only the bot's owners can {command.what}: they are shared by every "
                "conversation. (Owners are listed in the bot's settings.)",
                private=True,
            )
        return conversation.refusal(inv, command.what)

    # -- text platforms -----------------------------------------------------------------------

    def parse(self, command: Command, words: str, has_file: bool = False) -> Parsed | str:
        """Read the words after ``/command`` (Telegram, the terminal): the subcommand, then
        the arguments; or the usage line when they do not fit."""
        path = command.name
        rest = words.strip()
        if command.subcommands:
            first, _, after = rest.partition(" ")
            chosen = command.sub(first) if first else command.subcommands[0]
            if chosen is not None and first:
                rest = after.strip()
            elif chosen is None:
                chosen = command.sub(command.default or "")
            if chosen is None:
                return self.usage(command)
            command, path = chosen, f"{path} {chosen.name}"
        args: dict[str, object] = {}
        left = rest.split()
        for arg in command.args:
            if arg.kind is ArgKind.FLAG:
                found = [w for w in left if w.lower() == arg.name]
                args[arg.name] = bool(found)
                left = [w for w in left if w.lower() != arg.name]
            elif arg.kind is ArgKind.FILE:
                args[arg.name] = has_file
            elif arg.choices:
                word = left[0].lower() if left else ""
                value = arg.aliases.get(word, word)
                if value in arg.choices:
                    args[arg.name] = value
                    left = left[1:]
                elif word:
                    args[arg.name] = " ".join(left)  # the command says what is wrong
                    left = []
            elif arg.kind is ArgKind.NUMBER:
                if left:
                    word = left.pop(0)
                    args[arg.name] = int(word) if word.isdigit() else word
            else:
                args[arg.name] = " ".join(left)
                left = []
            if arg.required and not args.get(arg.name) and arg.kind is not ArgKind.FLAG:
                return self.usage(command, path)
        return Parsed(command, args, path)

    @staticmethod
    def usage(command: Command, path: str | None = None) -> str:
        shown = " ".join(f"<{a.name}>" if a.required else f"[{a.name}]" for a in command.args)
        if command.subcommands:
            shown = "|".join(c.name for c in command.subcommands) + " ..."
        return f"Usage: /{path or command.name} {command.usage or shown}".rstrip() + "."

    @staticmethod
    def unknown(name: str) -> str:
        return f"{shorten(name, 40)} is not one of my commands; send /help."

    # -- help ---------------------------------------------------------------------------------

    def help_text(self, platform: str, who: str, is_dm: bool, extra: Sequence[str] = ()) -> str:
        lines = [who, "Commands:"]
        for command in self.on(platform):
            head = f"/{command.name} {command.usage}".rstrip()
            lines.append(f"  {head:<22} {command.description}")
        lines.extend(extra)
        if not is_dm:
            lines.append(GROUP_HINT)
        return "\n".join(lines)

    async def _help(self, engine: Engine, inv: Invocation) -> Answer:
        who = await engine.actions.who_am_i(inv.platform, inv.key, inv.is_dm)
        extra = ["  /quit                  leave the chat"] if inv.platform == "console" else []
        return Answer(text=self.help_text(inv.platform, who, inv.is_dm, extra), private=True)


__all__ = [
    "HANDLER_FAILED",
    "SLASH_POINTER",
    "SLOW_DOWN",
    "TEXT_ONLY",
    "Answer",
    "Arg",
    "ArgKind",
    "Command",
    "CommandSet",
    "Invocation",
    "Parsed",
    "Rights",
    "RightsUnknown",
]
