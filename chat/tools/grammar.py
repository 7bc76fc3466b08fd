"""The call format for models without Meta's tool format, held to a grammar.

A call is ``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` (the form Hermes- and
Qwen-style templates use).  :func:`call_grammar` turns the tools' own JSON schemas into a
GBNF grammar (:func:`ai_model.sampling.schema_gbnf`) whose root is that form; lazy, it switches
on only when the model opens a call, so replies in words are untouched.  The converter drops
schema features it does not support, so a call that follows the grammar is still validated
before it runs (:meth:`chat.tools.registry.Tools.check`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ai_model.sampling import Grammar, schema_gbnf
from chat.tools.registry import Tools

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
# Strings in a call are held to this many characters by the grammar (a nested rule per
# character); the schema's own, larger bound is checked when the call is read.
GRAMMAR_MAX_CHARS = 160
GRAMMAR_MAX_CHOICES = 1000
JSON_CHAR = (
    r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] '
    r"[0-9a-fA-F] [0-9a-fA-F])"
)


def _bounded(schema: Any) -> Any:
    """``schema`` as the converter can hold to it: every string's maxLength at most
    :data:`GRAMMAR_MAX_CHARS`, and an integer's range (which the converter drops) as the list
    of its values, when it has at most :data:`GRAMMAR_MAX_CHOICES`."""
    if isinstance(schema, Mapping):
        out = {k: _bounded(v) for k, v in schema.items() if k != "description"}
        if out.get("type") == "string":
            out["maxLength"] = min(int(out.get("maxLength", GRAMMAR_MAX_CHARS)), GRAMMAR_MAX_CHARS)
        low, high = out.get("minimum"), out.get("maximum")
        if (
            out.get("type") == "integer"
            and isinstance(low, int)
            and isinstance(high, int)
            and 0 <= high - low < GRAMMAR_MAX_CHOICES
        ):
            return {"enum": list(range(low, high + 1))}
        return out
    if isinstance(schema, list):
        return [_bounded(v) for v in schema]
    return schema


def call_grammar(tools: Tools, lazy: bool = True) -> Grammar:
    """A grammar for one call of one of ``tools``; ``lazy``: only once the model writes
    :data:`OPEN` (else from the first token)."""
    choices = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": _bounded(t.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    body = schema_gbnf({"oneOf": choices})
    body = re.sub(r"^root ::=", "call ::=", body, flags=re.MULTILINE)
    # JSON strings hold no raw control characters (the converter's own rule lets a newline in).
    body = re.sub(r"^char ::= .*$", lambda _: JSON_CHAR, body, flags=re.MULTILINE)
    gbnf = f"root ::= {json.dumps(OPEN)} space call {json.dumps(CLOSE)}\n{body}"
    # llama.cpp matches a trigger against everything written so far, and holds the output to
    # the grammar from the first group on.
    triggers = (rf"[\s\S]*?({re.escape(OPEN)})[\s\S]*",) if lazy else ()
    return Grammar(gbnf, triggers)


def call_in(reply: str) -> str | None:
    """The JSON of the call a reply makes in this format, if it makes one."""
    start = reply.find(OPEN)
    if start < 0:
        return None
    end = reply.rfind(CLOSE, start)  # the string values may hold the marker themselves
    inner = reply[start + len(OPEN) : end if end >= 0 else len(reply)].strip()
    return inner or None
