"""Chat templates as pieces of text marked *control* (template scaffolding) or *content*.

Why pieces instead of one formatted string: llama.cpp turns ``<|im_end|>`` into a control token
whenever a string is tokenized with ``special=True``.  Keeping scaffolding and content apart lets
:func:`encode` tokenize only the scaffolding with special tokens, so text that came from users
(messages, names, character descriptions) can never become a control token, whatever it contains.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


class Tokenizer(Protocol):
    """The part of ``llama_cpp.Llama`` the prompt code needs (also met by test doubles)."""

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class Piece:
    """A run of prompt text; ``control`` pieces are the template's own markup."""

    text: str
    control: bool


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """One chat format: how a turn is framed and what ends the assistant's reply."""

    name: str
    turn_open: str  # with ``{role}``
    turn_close: str
    stop: tuple[str, ...]

    def turn(self, role: str, content: str) -> tuple[Piece, ...]:
        return (
            Piece(self.turn_open.format(role=role), True),
            Piece(content, False),
            Piece(self.turn_close, True),
        )

    def stops_with(self, *more: Sequence[str]) -> list[str]:
        """The template's own stop strings, then ``more``, without repeats."""
        return list(dict.fromkeys([*self.stop, *(s for group in more for s in group)]))

    def generation_prompt(self, role: str = "assistant") -> tuple[Piece, ...]:
        return (Piece(self.turn_open.format(role=role), True),)


CHATML = ChatTemplate(
    name="chatml",
    turn_open="<|im_start|>{role}\n",
    turn_close="<|im_end|>\n",
    stop=("<|im_end|>", "<|im_start|>"),
)
# <|begin_of_text|> is the model's BOS token: the tokenizer adds it, so the template does not.
LLAMA3 = ChatTemplate(
    name="llama3",
    turn_open="<|start_header_id|>{role}<|end_header_id|>\n\n",
    turn_close="<|eot_id|>",
    stop=("<|eot_id|>", "<|start_header_id|>", "<|end_of_text|>"),
)
TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (CHATML, LLAMA3)}


class UnknownTemplateError(ValueError):
    """The GGUF file's chat template is not one this project can frame safely."""


def detect_template(jinja_source: str | None) -> ChatTemplate:
    """Pick the template family from the GGUF ``tokenizer.chat_template`` metadata."""
    source = jinja_source or ""
    if "<|start_header_id|>" in source:
        return LLAMA3
    if "<|im_start|>" in source:
        return CHATML
    raise UnknownTemplateError(
        "the model's chat template is not recognised; set chat_template to one of: "
        + ", ".join(TEMPLATES)
    )


def template_by_name(name: str, jinja_source: str | None) -> ChatTemplate:
    """``auto`` reads the GGUF metadata; anything else names a template explicitly."""
    if name == "auto":
        return detect_template(jinja_source)
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UnknownTemplateError(
            f"unknown chat_template {name!r}; use auto or one of: {', '.join(TEMPLATES)}"
        ) from None


def encode(pieces: Iterable[Piece], tokenizer: Tokenizer) -> list[int]:
    """Token ids for ``pieces``: markup with special tokens, content strictly as plain text."""
    ids: list[int] = []
    for piece in pieces:
        if piece.text:
            ids.extend(
                tokenizer.tokenize(piece.text.encode("utf-8"), add_bos=False, special=piece.control)
            )
    return ids


def render(pieces: Sequence[Piece]) -> str:
    """The prompt as text (for logs and tests); not what the model reads, :func:`encode` is."""
    return "".join(piece.text for piece in pieces)


_MARKER = re.compile(r"<\|[^|<>\s]{1,64}\|>")
ROLES = ("system", "user", "assistant")


def template_markers(template: ChatTemplate) -> list[str]:
    """Every piece of markup the template writes: whole turn frames and each ``<|...|>``."""
    frames = [template.turn_open.format(role=role) for role in ROLES]
    frames += [template.turn_close, *template.stop]
    found = {marker for frame in frames for marker in _MARKER.findall(frame)}
    return list(dict.fromkeys([*frames, *sorted(found)]))


def plain_text_leaks(
    template: ChatTemplate, tokenizer: Tokenizer, is_control: Callable[[int], bool]
) -> list[str]:
    """The template markers that still yield a control (or user-defined special) token when
    tokenized as plain text.

    llama.cpp matches *user-defined* tokens even when special tokens are off, so a GGUF that
    marks ``<|im_start|>`` as user-defined would let any user open a turn of their own.
    """
    leaks = []
    for marker in template_markers(template):
        ids = tokenizer.tokenize(marker.encode("utf-8"), add_bos=False, special=False)
        if any(is_control(i) for i in ids):
            leaks.append(marker)
    return leaks
