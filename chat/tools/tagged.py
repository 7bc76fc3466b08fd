"""The tool format for models without a native one: calls between ``<tool_call>`` tags, held to
a grammar.

The form is the one Hermes- and Qwen-style templates use.  The system turn lists the tools
(one JSON definition a line, between ``<tools>`` tags) and says how to call one; a call is the
assistant's ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``, which the grammar of
:mod:`chat.tools.grammar` holds to the tools' schemas once the model opens it; a result goes
back in a user turn, between ``<tool_response>`` tags.  Every piece is text in the model's own
turns (:meth:`chat.prompt.window.TurnEncoder.compose` frames them), tokenized as content: a
result can never open a turn, whatever it holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from chat.tools.grammar import CLOSE, OPEN, call_in

RESULT_OPEN = "<tool_response>"
RESULT_CLOSE = "</tool_response>"
INSTRUCTION = (
    "You can call tools. They are listed here, one JSON definition a line:\n<tools>\n{tools}\n"
    "</tools>\n"
    "When a tool would help, reply with only this, and nothing after it:\n"
    f'{OPEN}\n{{"name": <tool name>, "arguments": <the arguments, a JSON object>}}\n{CLOSE}\n'
    f"Its result comes back between {RESULT_OPEN} tags; then answer the user with it. "
    "When no tool helps, answer in words.\n"
    'For example, to "What is 12% of 250?" reply:\n'
    f'{OPEN}\n{{"name": "calculate", "arguments": {{"expression": "12/100*250"}}}}\n{CLOSE}\n'
    'and to "What did we say about the budget?" reply:\n'
    f'{OPEN}\n{{"name": "search_history", "arguments": {{"query": "budget"}}}}\n{CLOSE}'
)

__all__ = ["CLOSE", "OPEN", "answer", "call_in", "result_text", "system_text", "visible"]


def system_text(tools: Sequence[Mapping[str, Any]], system: str) -> str:
    """The system turn's text with the tools offered after the bot's own."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    offer = INSTRUCTION.replace("{tools}", listed)
    return f"{system.rstrip()}\n\n{offer}" if system.strip() else offer


def result_text(result: str) -> str:
    """A tool's result as the user turn that brings it back."""
    return f"{RESULT_OPEN}\n{result}\n{RESULT_CLOSE}"


def answer(text: str) -> str:
    """The answer in a generation that made no call: the words before an unfinished call,
    without the result tags a small model may echo."""
    words = visible(text)
    for tag in (RESULT_OPEN, RESULT_CLOSE):
        words = words.replace(tag, "")
    return words.strip()


def visible(text: str) -> str:
    """What of streamed ``text`` the user may see now: the words before a call, never the call
    nor the start of its tag."""
    start = text.find(OPEN)
    if start >= 0:
        return text[:start]
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return text[:-size]
    return text
