"""What a tool is, how a call the model wrote is read and checked, and how a tool is run.

A model's call is untrusted text.  :func:`read_call` bounds it before parsing (its size, its
nesting), parses it as JSON, and :meth:`Tools.run` validates the arguments against the tool's
own JSON schema (jsonschema) before the tool runs, under a timeout.  Whatever goes wrong, the
model gets one short error as the tool's result, never an exception, and nothing runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

log = logging.getLogger(__name__)

MAX_CALL_CHARS = 4096
MAX_CALL_NESTING = 8
MAX_RESULT_CHARS = 4000
DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Who the model is acting for, and where."""

    platform: str
    key: str
    user_id: str
    user_name: str
    is_dm: bool
    is_admin: Callable[[], Awaitable[bool]]
    # Users the message mentions (id, name): a reminder may be set for one of them only.
    mentions: tuple[tuple[str, str], ...] = ()
    message_id: int | None = None  # the message being answered (searches look before it)


Run = Callable[[ToolContext, Mapping[str, Any]], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Tool:
    """One tool: its name, what it does (for the model), its arguments' JSON schema, its work."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    run: Run
    timeout_s: float = DEFAULT_TIMEOUT_S
    validator: Draft202012Validator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        Draft202012Validator.check_schema(dict(self.parameters))  # a bad schema fails at start
        object.__setattr__(self, "validator", Draft202012Validator(dict(self.parameters)))

    def definition(self) -> dict[str, Any]:
        """The OpenAI-style definition templates expect (``{"type": "function", …}``)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    arguments: Mapping[str, Any]


class BadCall(ValueError):
    """The model's call cannot be run; the message is what the model is told."""


def _nesting(text: str) -> int:
    """The deepest nesting of brackets in ``text`` outside JSON strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def read_call(text: str, arguments_key: str = "parameters") -> Call:
    """``{"name": …, "parameters": {…}}`` (Meta's format; ``arguments`` is read too)."""
    text = text.strip()
    if len(text) > MAX_CALL_CHARS:
        raise BadCall(f"the call is longer than {MAX_CALL_CHARS} characters")
    if _nesting(text) > MAX_CALL_NESTING:
        raise BadCall(f"the call nests deeper than {MAX_CALL_NESTING} levels")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadCall(f"the call is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise BadCall('a call is {"name": tool name, "parameters": {arguments}}')
    arguments = data.get(arguments_key, data.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if len(arguments) <= MAX_CALL_CHARS else None
        except (ValueError, RecursionError):
            arguments = None
    if not isinstance(arguments, dict):
        raise BadCall("the parameters must be a JSON object")
    return Call(data["name"], arguments)


class Tools:
    """The tools a conversation may use, by name."""

    def __init__(self, tools: Sequence[Tool]) -> None:
        self.by_name = {tool.name: tool for tool in tools}

    def __iter__(self) -> Any:
        return iter(self.by_name.values())

    def definitions(self) -> list[dict[str, Any]]:
        return [tool.definition() for tool in self.by_name.values()]

    def check(self, call: Call) -> Tool:
        """The tool ``call`` names, with its arguments valid; BadCall otherwise."""
        tool = self.by_name.get(call.name)
        if tool is None:
            known = ", ".join(self.by_name) or "none"
            raise BadCall(f"there is no tool called {call.name[:64]!r} (tools: {known})")
        try:
            errors = sorted(tool.validator.iter_errors(dict(call.arguments)), key=str)
        except (SchemaError, RecursionError) as exc:
            raise BadCall(f"the arguments cannot be checked ({exc})") from None
        if errors:
            first = errors[0]
            where = "/".join(str(p) for p in first.absolute_path) or "arguments"
            message = first.message if len(first.message) <= 150 else first.message[:149] + "…"
            raise BadCall(f"invalid {where} ({first.validator}): {message}")
        return tool

    async def run(self, call: Call, context: ToolContext) -> tuple[bool, str]:
        """Run ``call`` if it is valid: (whether it ran, the result for the model)."""
        try:
            tool = self.check(call)
        except BadCall as exc:
            return False, f"Error: {exc}"
        try:
            result = await asyncio.wait_for(tool.run(context, call.arguments), tool.timeout_s)
        except TimeoutError:
            return False, f"Error: {tool.name} took longer than {tool.timeout_s:g} s"
        except ToolRefused as exc:
            return False, f"Error: {exc}"
        except Exception:
            log.exception("tool %s failed in %s", tool.name, context.key)
            return False, f"Error: {tool.name} failed"
        return True, result[:MAX_RESULT_CHARS]


class ToolRefused(ValueError):
    """A tool declines the call (a bound, a right); the message is what the model is told."""
