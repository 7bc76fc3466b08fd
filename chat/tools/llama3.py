"""Meta's Llama 3.1 tool format, as its own chat template writes it.

With tools, the system turn starts ``Environment: ipython``; the tool definitions (JSON, four
spaces of indent) and Meta's instruction go in front of the first user message; a call is the
assistant's ``{"name": …, "parameters": {…}}``; a result is an ``ipython`` turn holding the
result as a JSON string.  The pieces below keep the format's markup (control) apart from the
text (content), so a tool result, like any user text, is tokenized as plain text: it can never
open a turn.  ``tests/test_tools.py`` checks them token for token against the vendored
Llama 3.1 template rendered with ``tools``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ai_model.templates import ChatTemplate, Piece
from chat.tools.registry import Call

HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
END_OF_TURN = "<|eot_id|>"
END_OF_MESSAGE = "<|eom_id|>"  # the model waits for a tool's result (ipython mode)
PYTHON_TAG = "<|python_tag|>"
ENVIRONMENT = "Environment: ipython\n"
INSTRUCTION = (
    "Given the following functions, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name '
    "and its value}.Do not use variables.\n\n"
)


def speaks_llama3(template: ChatTemplate) -> bool:
    """Whether ``template`` frames turns as Llama 3.x does."""
    return all(
        template.open.get(role, "").startswith(HEADER.format(role=role))
        and template.close.get(role) == END_OF_TURN
        for role in ("system", "user", "assistant")
    )


def system_turn(template: ChatTemplate, text: str) -> tuple[Piece, ...]:
    """The system turn of a prompt that offers tools."""
    header = HEADER.format(role="system")
    opening = template.open["system"]
    content = text.strip() if template.trims else text
    return (
        Piece(header, True),
        Piece(ENVIRONMENT + opening[len(header) :], True),  # the template's own preamble
        Piece(content, False),
        Piece(END_OF_TURN, True),
    )


def definitions(tools: Sequence[Mapping[str, Any]]) -> str:
    """What goes in front of the first user message: the instruction and each definition."""
    return INSTRUCTION + "".join(
        json.dumps(tool, indent=4, ensure_ascii=False) + "\n\n" for tool in tools
    )


def first_user_turn(tools: Sequence[Mapping[str, Any]], text: str) -> tuple[Piece, ...]:
    return (
        Piece(HEADER.format(role="user"), True),
        Piece(definitions(tools) + text.strip(), False),
        Piece(END_OF_TURN, True),
    )


def call_text(call: Call) -> str:
    """A call as the model writes it (and as the template writes a stored one)."""
    arguments = json.dumps(dict(call.arguments), ensure_ascii=False)
    return f'{{"name": "{call.name}", "parameters": {arguments}}}'


def call_turn(call: Call) -> tuple[Piece, ...]:
    return written_call_turn(call_text(call))


def written_call_turn(written: str) -> tuple[Piece, ...]:
    """A call as the model wrote it (content: a call is never markup, whatever it holds)."""
    return (
        Piece(HEADER.format(role="assistant"), True),
        Piece(written, False),
        Piece(END_OF_TURN, True),
    )


def result_turn(result: str) -> tuple[Piece, ...]:
    """A tool's result: content, as a JSON string (what the template's ``tojson`` writes)."""
    return (
        Piece(HEADER.format(role="ipython"), True),
        Piece(json.dumps(result, ensure_ascii=False), False),
        Piece(END_OF_TURN, True),
    )


def call_in(reply: str) -> str | None:
    """The call a reply makes, if it is one: JSON after an optional ``<|python_tag|>``."""
    text = reply.strip().removeprefix(PYTHON_TAG).strip()
    for end in (END_OF_MESSAGE, END_OF_TURN):
        text = text.removesuffix(end).strip()
    return text if text.startswith("{") and text.endswith("}") else None
