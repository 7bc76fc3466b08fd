"""Which conversations the office model may act in, and the tool rounds of one reply.

A reply with tools is one or more generations.  Each one's text is kept from the user while it
may still be a call (it opens with ``{``); a call is read, checked and run
(:mod:`chat.tools.registry`), and its result goes back to the model in the next generation's
prompt, after the call itself (:class:`ToolPrompt`, placed by :mod:`chat.prompt.assembly`).
Bounds: ``max_rounds`` tools per reply, and one bad call (unknown tool, invalid arguments, a
refusal) answered to the model as an error; past either, the user is told, in one line.  Only
models framed as Llama 3.x get tools: Meta's format (:mod:`chat.tools.llama3`) is the one a
model is known to follow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ai_model.templates import ChatTemplate
from chat.limits import shorten
from chat.tools import llama3
from chat.tools.registry import MAX_CALL_CHARS, BadCall, ToolContext, Tools, read_call
from storage.records import Conversation, StoredMessage

GAVE_UP = (
    "Sorry, I could not finish this with my tools ({why}). Please ask again, perhaps more simply."
)


@dataclass(frozen=True, slots=True)
class ToolSettings:
    """``[tools]``: where the office model may use its tools, and how much one reply may do."""

    enabled: bool = True  # work conversations and DMs, unless a channel's admins turn them off
    roleplay: bool = False  # roleplay conversations, unless a channel's admins turn them on
    max_rounds: int = 3  # tools run for one reply

    def validate(self) -> None:
        """Raise ValueError naming the key of a value out of range."""
        if not 1 <= self.max_rounds <= 8:
            raise ValueError("max_rounds must be from 1 to 8")


@dataclass(frozen=True, slots=True)
class ToolPrompt:
    """What a prompt offering tools holds: the definitions, and this reply's rounds so far
    (each call as the model wrote it, and its result)."""

    definitions: tuple[Mapping[str, Any], ...]
    rounds: tuple[tuple[str, str], ...] = ()


async def _no_rights() -> bool:
    return False


def tools_on(conv: Conversation, roleplay: bool, settings: ToolSettings) -> bool:
    """Whether ``conv`` uses tools: its admins' choice, else the default for its mode."""
    chosen = conv.settings.get("tools")
    if isinstance(chosen, bool):
        return chosen
    return settings.roleplay if roleplay else settings.enabled


def format_has_tools(template: ChatTemplate) -> bool:
    """Whether the model's chat format is one whose tool calls are known (Llama 3.x).  The
    prompt merges its system parts itself (:func:`chat.prompt.assembly.assemble`); a format
    that would fold, merge or split other turns is not Meta's."""
    return (
        llama3.speaks_llama3(template)
        and template.system_role
        and not template.merges_users
        and not template.splits_assistants
    )


def could_be_call(text: str) -> bool:
    """Whether streamed text may still turn out to be a call (kept from the user till known)."""
    head = text.lstrip()
    return not head or head.startswith(("{", llama3.PYTHON_TAG))


@dataclass(slots=True)
class ToolRounds:
    """The tool rounds of one reply."""

    tools: Tools
    context: ToolContext
    max_rounds: int
    rounds: list[tuple[str, str]] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    errors: int = 0
    gave_up: str = ""  # why the rounds ended without an answer

    @classmethod
    def acting_for(
        cls,
        asked: StoredMessage | None,
        platform: str,
        key: str,
        tools: Tools,
        settings: ToolSettings,
    ) -> ToolRounds:
        """The rounds of a reply to ``asked``, acting for its author.  A message carries no
        admin rights nor mentions: what needs them (a reminder for someone else) is refused
        to the model, and the user can use /remind."""
        author = (asked.author_id or "", asked.author_name or "") if asked else ("", "")
        context = ToolContext(platform, key, author[0], author[1], False, _no_rights)
        return cls(tools, context, settings.max_rounds)

    @property
    def prompt(self) -> ToolPrompt:
        return ToolPrompt(tuple(self.tools.definitions()), tuple(self.rounds))

    async def after(self, text: str) -> bool:
        """Run the call that the generation ``text`` makes, if it makes one; whether the model
        is to be asked again (with the result).  A text that is no call is the answer."""
        written = llama3.call_in(text)
        if written is None:
            return False
        if len(self.rounds) >= self.max_rounds:
            self.gave_up = f"more than {self.max_rounds} tools for one reply"
            return False
        try:
            call = read_call(written)
        except BadCall as exc:
            if '"name"' not in written:
                return False  # JSON for the user, not a call
            ran, result = False, f"Error: {exc}"
        else:
            ran, result = await self.tools.run(call, self.context)
            if ran:
                self.used.append(call.name)
        if not ran:
            self.errors += 1
            if self.errors > 1:
                self.gave_up = shorten(result.removeprefix("Error: "), 200)
                return False
        self.rounds.append((written[:MAX_CALL_CHARS], result))
        return True

    def footer(self) -> str:
        """The reply's last line: which tools ran (none: no line)."""
        names = list(dict.fromkeys(self.used))
        return f"Tools used: {', '.join(names)}." if names else ""
