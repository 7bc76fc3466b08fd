"""Which conversations the office model may act in, and the tool rounds of one reply.

A reply with tools is one or more generations.  What of each one may still be a call is kept
from the user (:meth:`ToolRounds.visible`); a call is read, checked and run
(:mod:`chat.tools.registry`), and its result goes back to the model in the next generation's
prompt, after the call itself (:class:`ToolPrompt`, placed by :mod:`chat.prompt.assembly`).
Bounds: ``max_rounds`` tools per reply, and one bad call (unknown tool, invalid arguments, a
refusal) answered to the model as an error; past either, the user is told, in one line.

Two formats (:func:`style_for`): models framed as Llama 3.x get Meta's own
(:mod:`chat.tools.llama3`), which they were trained on; any other model gets calls between
``<tool_call>`` tags (:mod:`chat.tools.tagged`), held to the tools' schemas by a lazy grammar
(:mod:`chat.tools.grammar`) where the backend can hold one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ai_model.base import ChatModel
from ai_model.sampling import Grammar
from ai_model.templates import ChatTemplate
from chat.limits import shorten
from chat.messages import IncomingMessage
from chat.tools import llama3, tagged
from chat.tools.grammar import call_grammar
from chat.tools.registry import MAX_CALL_CHARS, BadCall, ToolContext, Tools, read_call
from storage.records import Conversation, StoredMessage
from storage.store import Store

GAVE_UP = (
    "Sorry, I could not finish this with my tools ({why}). Please ask again, perhaps more simply."
)


@dataclass(frozen=True, slots=True)
class ToolSettings:
    """``[tools]``: where the office model may use its tools, and how much one reply may do."""

    enabled: bool = True  # work conversations and DMs, unless a channel's admins turn them off
    roleplay: bool = False  # roleplay conversations, unless a channel's admins turn them on
    max_rounds: int = 3  # tools run for one reply
    # "auto": Meta's format for Llama 3.x models, tagged calls held to a grammar for other
    # models whose own chat template takes tools (trained with them); "all": tagged calls
    # for every other model too; "native": Llama 3.x models only.
    format: str = "auto"
    # "auto": the model decides whether to call; "required": the first generation of every
    # reply with tools is a call, held to the grammar from its first token (tagged format; for
    # channels where every message asks for an action, and for small models that never call).
    choice: str = "auto"

    def validate(self) -> None:
        """Raise ValueError naming the key of a value out of range."""
        if not 1 <= self.max_rounds <= 8:
            raise ValueError("max_rounds must be from 1 to 8")
        if self.format not in ("auto", "all", "native"):
            raise ValueError(f'format must be "auto", "all" or "native", not {self.format!r}')
        if self.choice not in ("auto", "required"):
            raise ValueError(f'choice must be "auto" or "required", not {self.choice!r}')


@dataclass(frozen=True, slots=True)
class ToolPrompt:
    """What a prompt offering tools holds: the definitions, and this reply's rounds so far
    (each call as the model wrote it, and its result)."""

    definitions: tuple[Mapping[str, Any], ...]
    rounds: tuple[tuple[str, str], ...] = ()
    style: str = "llama3"  # or "tagged" (see style_for)


async def no_rights() -> bool:
    """The rights of a message whose author's are unknown (recovered after a restart)."""
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


def style_for(template: ChatTemplate, settings: ToolSettings) -> str | None:
    """The tool format a model gets: ``llama3``, ``tagged``, or none.  Under ``auto`` a model
    gets tagged calls when its own (GGUF) chat template takes tools: a model never trained
    with tools (SmolLM2, Gemma 2, Phi-3.5) pays the offer's ~900 tokens in every prompt and
    does not call them (the embedded 135M model answered seven of seven questions in words)."""
    if format_has_tools(template):
        return "llama3"
    if settings.format == "all" or (settings.format == "auto" and "tools" in template.source):
        return "tagged"
    return None


def could_be_call(text: str) -> bool:
    """Whether streamed text may still turn out to be a call in Meta's format (kept from the
    user till known)."""
    head = text.lstrip()
    return not head or head.startswith(("{", llama3.PYTHON_TAG))


@dataclass(slots=True)
class ToolRounds:
    """The tool rounds of one reply."""

    tools: Tools
    context: ToolContext
    max_rounds: int
    style: str = "llama3"
    grammar: Grammar | None = None  # what holds a call to the tools' schemas (tagged calls)
    first: Grammar | None = None  # what holds the first generation, where it must be a call
    rounds: list[tuple[str, str]] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    errors: int = 0
    gave_up: str = ""  # why the rounds ended without an answer

    @classmethod
    def acting_for(
        cls,
        asked: StoredMessage | None,
        context: ToolContext,
        tools: Tools,
        settings: ToolSettings,
        style: str,
        grammar: Grammar | None = None,
        first: Grammar | None = None,
    ) -> ToolRounds:
        """The rounds of a reply to ``asked``, acting for its author in ``context`` (whose
        rights and mentions are those of the message as it arrived; none after a restart);
        ``grammar`` holds tagged calls (:func:`chat.tools.grammar.call_grammar`), ``first``
        the first generation where it must be one."""
        if asked is not None:
            context = replace(
                context,
                user_id=asked.author_id or "",
                user_name=asked.author_name or "",
                message_id=asked.id,
            )
        return cls(tools, context, settings.max_rounds, style, grammar, first)

    @property
    def next_grammar(self) -> Grammar | None:
        """What holds the next generation."""
        return self.first if self.first is not None and not self.rounds else self.grammar

    @property
    def prompt(self) -> ToolPrompt:
        return ToolPrompt(tuple(self.tools.definitions()), tuple(self.rounds), self.style)

    def answer_text(self, text: str) -> str:
        """The answer in a generation's ``text`` once it ended as no call (a tagged call
        left unfinished is cut off)."""
        return tagged.answer(text) if self.style == "tagged" else text

    def visible(self, text: str) -> str:
        """What of a generation's streamed ``text`` the user may see now: nothing that may
        still be a call."""
        if self.style == "tagged":
            return tagged.visible(text)
        return "" if could_be_call(text) else text

    async def after(self, text: str) -> bool:
        """Run the call that the generation ``text`` makes, if it makes one; whether the model
        is to be asked again (with the result).  A text that is no call is the answer."""
        if self.style == "tagged":
            written, key = tagged.call_in(text), "arguments"
        else:
            written, key = llama3.call_in(text), "parameters"
        if written is None:
            return False
        if len(self.rounds) >= self.max_rounds:
            self.gave_up = f"more than {self.max_rounds} tools for one reply"
            return False
        try:
            call = read_call(written, key)
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
        # The call as the model wrote it, words before it included: the next prompt then
        # extends this one, and the evaluated cache is reused.
        said = written if self.style == "llama3" else text.strip()
        self.rounds.append((said[:MAX_CALL_CHARS], result))
        return True

    def footer(self) -> str:
        """The reply's last line: which tools ran (none: no line)."""
        names = list(dict.fromkeys(self.used))
        return f"Tools used: {', '.join(names)}." if names else ""


class ToolUse:
    """Which tools the office model has, and the tool rounds of each reply."""

    def __init__(self, tools: Tools, settings: ToolSettings, store: Store) -> None:
        self.tools = tools
        self.settings = settings
        self.store = store
        # The tools' tagged calls, converted once: lazy, and held from the first token.
        self._grammars: tuple[Grammar, Grammar] | None = None

    async def rounds(
        self,
        model: ChatModel,
        platform: str,
        key: str,
        asked: int,
        asker: IncomingMessage | None,
    ) -> ToolRounds | None:
        """The tool rounds of ``model``'s reply to message ``asked``, acting for its author
        with the rights and mentions of ``asker`` (the message as it arrived, if it did in
        this process); none where the model gets no tool format."""
        style = style_for(model.template, self.settings)
        if style is None:
            return None
        if style == "tagged" and self._grammars is None:
            made = await asyncio.to_thread(call_grammar, self.tools, True)
            self._grammars = (made, replace(made, triggers=()))
        found = await self.store.messages.get(asked)
        context = ToolContext(
            platform,
            key,
            "",
            "",
            asker.is_dm if asker else False,
            asker.is_admin if asker and asker.is_admin else no_rights,
            asker.mentions if asker else (),
        )
        lazy: Grammar | None = None
        first: Grammar | None = None
        if style == "tagged" and self._grammars is not None:
            lazy, held = self._grammars
            first = held if self.settings.choice == "required" else None
        return ToolRounds.acting_for(found, context, self.tools, self.settings, style, lazy, first)
