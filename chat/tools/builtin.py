"""The built-in tools, all offline: the time, arithmetic, reminders, and searches of this
conversation's history and documents.  Each acts only in the conversation it is called from,
for the user whose message the model is answering."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from chat.commands.spec import RightsUnknown
from chat.conversations import Conversations
from chat.documents.library import DocumentLibrary
from chat.limits import shorten
from chat.reminders.service import Reminders
from chat.reminders.when import zone_named
from chat.tools.calculator import CalculationError, calculate
from chat.tools.registry import Tool, ToolContext, ToolRefused, Tools
from storage.store import Store

MAX_QUERY_WORDS = 6
HISTORY_HITS = 5
SNIPPET_CHARS = 300


def _string(maximum: int, description: str) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": maximum, "description": description}


async def _admin(ctx: ToolContext) -> bool:
    """Whether the caller administers the conversation; refused when the platform cannot say."""
    try:
        return await ctx.is_admin()
    except RightsUnknown:
        raise ToolRefused("your rights could not be checked just now; try again") from None


class Toolbox:
    """Builds the built-in tools over the engine's parts."""

    def __init__(
        self,
        store: Store,
        conversations: Conversations,
        reminders: Reminders,
        documents: DocumentLibrary,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.conversations = conversations
        self.reminders = reminders
        self.documents = documents
        self.clock = clock

    def tools(self) -> Tools:
        no_args: dict[str, Any] = {
            "type": "object",
            "properties": {},
            "additionalProperties": False,
        }
        return Tools(
            [
                Tool(
                    "current_time",
                    "The current date and time, in the user's time zone or a named one.",
                    {
                        "type": "object",
                        "properties": {
                            "timezone": _string(64, "An IANA zone such as Europe/Berlin")
                        },
                        "additionalProperties": False,
                    },
                    self.current_time,
                ),
                Tool(
                    "calculate",
                    "Evaluate an arithmetic expression exactly: + - * / // % ** ( ), sqrt, "
                    "log, round, min, max, pi. Write percentages as fractions: 17% of 2340 is "
                    "17/100*2340.",
                    {
                        "type": "object",
                        "properties": {"expression": _string(300, "e.g. 17/100*2340")},
                        "required": ["expression"],
                        "additionalProperties": False,
                    },
                    self.calculate,
                    timeout_s=2.0,
                ),
                Tool(
                    "set_reminder",
                    "Remind the user later, in this conversation.",
                    {
                        "type": "object",
                        "properties": {
                            "when": _string(100, "in 2 hours, tomorrow 9:00, every Monday 10:00"),
                            "what": _string(500, "What to remind of"),
                            "for_user": _string(64, "A mentioned user's id or name"),
                        },
                        "required": ["when", "what"],
                        "additionalProperties": False,
                    },
                    self.set_reminder,
                ),
                Tool("list_reminders", "The reminders to come here.", no_args, self.list_reminders),
                Tool(
                    "cancel_reminder",
                    "Cancel one of the user's reminders by its number in list_reminders.",
                    {
                        "type": "object",
                        "properties": {
                            "number": {"type": "integer", "minimum": 1, "maximum": 1000}
                        },
                        "required": ["number"],
                        "additionalProperties": False,
                    },
                    self.cancel_reminder,
                ),
                Tool(
                    "search_history",
                    "Find earlier messages of this conversation, also those no longer in view.",
                    {
                        "type": "object",
                        "properties": {"query": _string(200, "Words the message holds")},
                        "required": ["query"],
                        "additionalProperties": False,
                    },
                    self.search_history,
                ),
                Tool(
                    "search_documents",
                    "Search the documents posted in this conversation.",
                    {
                        "type": "object",
                        "properties": {"query": _string(300, "What to look up")},
                        "required": ["query"],
                        "additionalProperties": False,
                    },
                    self.search_documents,
                ),
            ]
        )

    async def current_time(self, ctx: ToolContext, args: Mapping[str, Any]) -> str:
        named = args.get("timezone")
        if named:
            zone = zone_named(str(named))
            if zone is None:
                raise ToolRefused(f"{shorten(str(named), 64)!r} is not a time zone")
        else:
            conv = await self.conversations.get(ctx.platform, ctx.key)
            zone = await self.reminders.zone_of(ctx.platform, ctx.user_id, conv)
        now = self.clock()
        from zoneinfo import ZoneInfo

        local = now.astimezone(ZoneInfo(zone))
        return f"{local:%A %d %B %Y, %H:%M} ({zone}, UTC{local:%z})"

    async def calculate(self, _ctx: ToolContext, args: Mapping[str, Any]) -> str:
        try:
            # Bounded to milliseconds (chat.tools.calculator); off the loop all the same.
            return await asyncio.to_thread(calculate, str(args["expression"]))
        except CalculationError as exc:
            raise ToolRefused(str(exc)) from None

    async def set_reminder(self, ctx: ToolContext, args: Mapping[str, Any]) -> str:
        user_id, user_name = ctx.user_id, ctx.user_name
        other = str(args.get("for_user") or "").strip().removeprefix("@")
        other = other.removeprefix("<@").removeprefix("!").removesuffix(">")  # <@id> as typed
        if other and other not in (ctx.user_id, ctx.user_name):
            chosen = [(i, n) for i, n in ctx.mentions if other in (i, n) or other == n.lower()]
            if not chosen:
                raise ToolRefused("a reminder for someone else needs their mention in the message")
            if not ctx.is_dm and not await _admin(ctx):
                raise ToolRefused("only admins may set reminders for someone else")
            user_id, user_name = chosen[0]
        request = f"{args['when']} {args['what']}"
        return await self.reminders.add(ctx.platform, ctx.key, user_id, user_name, request)

    async def list_reminders(self, ctx: ToolContext, _args: Mapping[str, Any]) -> str:
        return await self.reminders.listing(ctx.platform, ctx.key)

    async def cancel_reminder(self, ctx: ToolContext, args: Mapping[str, Any]) -> str:
        held = await self.reminders.open_in(ctx.platform, ctx.key)
        number = int(args["number"])
        if not 1 <= number <= len(held):
            raise ToolRefused(f"there is no reminder {number} here")
        chosen = held[number - 1]
        if chosen.user_id != ctx.user_id and not ctx.is_dm and not await _admin(ctx):
            raise ToolRefused("only whoever set it, or admins, can cancel that reminder")
        return await self.reminders.cancel(ctx.platform, ctx.key, chosen)

    async def search_history(self, ctx: ToolContext, args: Mapping[str, Any]) -> str:
        words = [w for w in str(args["query"]).split() if len(w) > 1][:MAX_QUERY_WORDS]
        if not words:
            raise ToolRefused("give a word or two to look for")
        conv = await self.conversations.get(ctx.platform, ctx.key)
        found = await self.store.messages.search(
            conv.id, conv.reset_after_id, words, HISTORY_HITS, before_id=ctx.message_id
        )
        if not found:
            return "No earlier message holds all of: " + " ".join(words)
        lines = []
        for message in found:
            who = message.author_name or ("assistant" if message.role == "assistant" else "user")
            lines.append(f"- {who}: {shorten(message.text, SNIPPET_CHARS)}")
        return "Earlier messages, newest first:\n" + "\n".join(lines)

    async def search_documents(self, ctx: ToolContext, args: Mapping[str, Any]) -> str:
        conv = await self.conversations.get(ctx.platform, ctx.key)
        hits = await self.documents.search(conv.id, [str(args["query"])])
        if not hits:
            return "The documents here hold nothing on that."
        return "\n\n".join(
            f"[{n}] {hit.document_name}"
            + (f", page {hit.page}" if hit.page else "")
            + f":\n{shorten(hit.text, 1200)}"
            for n, hit in enumerate(hits, 1)
        )
