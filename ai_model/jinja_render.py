"""A GGUF's chat template rendered as Hugging Face's ``apply_chat_template`` renders it.

Compiled once in Jinja's immutable sandbox, with what the Hub gives templates
(``bos_token``, ``eos_token``, ``add_generation_prompt``, ``raise_exception``,
``strftime_now``, the ``generation`` tag); each rendering is bounded in time and output size,
so a broken, looping or huge template is refused rather than run.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ai_model.templates import UnknownTemplateError

MAX_RENDER_S = 2.0  # one rendering of the template
MAX_RENDER_CHARS = 200_000
MAX_SOURCE_CHARS = 200_000

Message = dict[str, str]


class Refused(UnknownTemplateError):
    """The template cannot be framed safely; the message says why."""


class Exceeded(Refused):
    """The template ran past its time or output bound: it is refused, whatever it was given."""


class _Generation(Extension):
    """``{% generation %}…{% endgeneration %}`` (Hugging Face's assistant-mask tag): its body."""

    tags = frozenset({"generation"})  # type: ignore[assignment]

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Timeout(Exception):
    pass


def _raise(message: str) -> None:
    raise Refused(f"the template refuses the conversation: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def today() -> datetime.date:
    """The date templates are given: the prompt changes at most once a day."""
    return datetime.datetime.now(datetime.UTC).date()


class Renderer:
    """The template, compiled once in a sandbox; each rendering bounded."""

    def __init__(self, source: str, bos: str, eos: str, day: datetime.date | None = None):
        if len(source) > MAX_SOURCE_CHARS:
            raise Refused(f"the template is {len(source)} characters long")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_Generation, "jinja2.ext.loopcontrols"],
        )
        stamp = datetime.datetime.combine(day or today(), datetime.time(12, 0))
        env.globals.update(
            raise_exception=_raise,
            strftime_now=lambda fmt: stamp.strftime(str(fmt)),
        )
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise Refused(f"the template does not compile: {exc}") from exc
        self.bos = bos
        self.eos = eos

    def __call__(
        self,
        messages: Sequence[Mapping[str, Any]],
        generation: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        context: dict[str, Any] = {
            "messages": list(messages),
            "add_generation_prompt": generation,
            "bos_token": self.bos,
            "eos_token": self.eos,
        }
        if tools is not None:
            # Without tools ``tools`` stays undefined, which templates test as falsy and
            # iterate as empty (``None`` would break the tool-use variants).
            context["tools"] = list(tools)
        deadline = time.monotonic() + MAX_RENDER_S
        calls = 0

        def tracer(frame: FrameType, event: str, arg: object) -> Any:
            nonlocal calls
            calls += 1
            if calls % 1000 == 0 and time.monotonic() > deadline:
                raise _Timeout
            return tracer

        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            out: list[str] = []
            size = 0
            for chunk in self._template.generate(**context):
                out.append(chunk)
                size += len(chunk)
                if size > MAX_RENDER_CHARS:
                    raise Exceeded(f"the template writes more than {MAX_RENDER_CHARS} characters")
            return "".join(out)
        except _Timeout:
            raise Exceeded(f"the template takes more than {MAX_RENDER_S:g}s to render") from None
        except Refused:
            raise
        except Exception as exc:  # anything the template does wrong
            raise Refused(f"the template fails: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.settrace(previous)
