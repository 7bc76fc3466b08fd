"""Chat formats as pieces of text marked *control* (the format's markup) or *content*.

Why pieces instead of one formatted string: llama.cpp turns ``<|im_end|>`` into a control token
whenever a string is tokenized with ``special=True``.  Keeping markup and content apart lets
:func:`encode` tokenize only the markup with special tokens, so text that came from users
(messages, names, character descriptions) can never become a control token, whatever it contains.

A :class:`ChatTemplate` frames each turn as ``open[role] + content + close[role]``, after a
``head`` that starts the prompt, and opens the reply with ``cue``.  The named formats below are
written out; ``chat_template = "auto"`` derives one from the model's own Jinja template
(:mod:`ai_model.jinja_format`), checked against that template's own rendering.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

ROLES = ("system", "user", "assistant")


class Tokenizer(Protocol):
    """The part of ``llama_cpp.Llama`` the prompt code needs (also met by test doubles)."""

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class Piece:
    """A run of prompt text; ``control`` pieces are the format's own markup."""

    text: str
    control: bool


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """One chat format: how each turn is framed, how the reply is opened, where it ends.

    ``system_role`` false: the format has no system turn, and what the bot would say as the
    system is folded into a user turn.  ``merges_users`` and ``splits_assistants``: the format
    cannot frame two turns of one role in a row (strict alternation, or replies it merges),
    so consecutive user turns are merged and consecutive replies get a short user turn between
    them.  ``trims``: the format strips the whitespace
    around each message.  ``reasoning``: the (open, close) markers of a reasoning block the
    format drops from earlier replies.
    """

    name: str
    open: Mapping[str, str]
    close: Mapping[str, str]
    cue: str
    stop: tuple[str, ...] = ()
    head: str = ""  # markup before the first turn (a BOS the tokenizer does not add, a preamble)
    system_role: bool = True
    merges_users: bool = False  # consecutive user turns become one (names kept)
    splits_assistants: bool = False  # consecutive replies get a short user turn between
    merges_systems: bool = False  # consecutive system parts become one system turn
    trims: bool = False
    reasoning: tuple[str, str] | None = None
    source: str = field(default="", compare=False, repr=False)  # the Jinja source, if derived

    @property
    def adapts(self) -> bool:
        """Whether turns must be folded, merged or split before they are framed."""
        return (
            not self.system_role
            or self.merges_users
            or self.splits_assistants
            or self.merges_systems
        )

    def turn(self, role: str, content: str) -> tuple[Piece, ...]:
        if role == "system" and not self.system_role:
            role = "user"  # folded: the caller should have merged it (see chat.prompt)
        if self.trims:
            content = content.strip()
        return (
            Piece(self.open[role], True),
            Piece(content, False),
            Piece(self.close[role], True),
        )

    def generation_prompt(self, role: str = "assistant") -> tuple[Piece, ...]:
        return (Piece(self.cue, True),)

    def start(self) -> tuple[Piece, ...]:
        return (Piece(self.head, True),) if self.head else ()

    def stops_with(self, *more: Sequence[str]) -> list[str]:
        """The format's own stop strings, then ``more``, without repeats."""
        return list(dict.fromkeys([*self.stop, *(s for group in more for s in group)]))


def framed(
    name: str,
    open: Mapping[str, str],
    close: Mapping[str, str] | str,
    cue: str | None = None,
    **more: object,
) -> ChatTemplate:
    """A format from its turn markup; ``close`` may be one string for every role, ``cue``
    defaults to the assistant's opening."""
    closes = {role: close for role in open} if isinstance(close, str) else dict(close)
    return ChatTemplate(
        name,
        _frozen(open),
        _frozen(closes),
        open["assistant"] if cue is None else cue,
        **more,  # type: ignore[arg-type]
    )


CHATML = framed(
    "chatml",
    {r: f"<|im_start|>{r}\n" for r in ROLES},
    "<|im_end|>\n",
    stop=("<|im_end|>", "<|im_start|>"),
)
# <|begin_of_text|> is the model's BOS token: the tokenizer adds it, so the format does not.
LLAMA3 = framed(
    "llama3",
    {r: f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in ROLES},
    "<|eot_id|>",
    stop=("<|eot_id|>", "<|start_header_id|>", "<|end_of_text|>"),
)
# Gemma: no system role (folded into the first user turn), the assistant is the "model".
GEMMA = framed(
    "gemma",
    {"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n"},
    "<end_of_turn>\n",
    stop=("<end_of_turn>", "<start_of_turn>"),
    system_role=False,
    merges_users=True,
    splits_assistants=True,
    trims=True,
)
PHI3 = framed(
    "phi3",
    {r: f"<|{r}|>\n" for r in ROLES},
    "<|end|>\n",
    stop=("<|end|>", "<|endoftext|>", "<|user|>"),
)
# Mistral's [INST] format (v3/tekken): no system turn, strict alternation; the reply ends
# with the EOS token, which the next user turn follows.
MISTRAL = framed(
    "mistral",
    {"user": "[INST]", "assistant": ""},
    {"user": "[/INST]", "assistant": "</s>"},
    cue="",
    stop=("[INST]", "</s>"),
    system_role=False,
    merges_users=True,
    splits_assistants=True,
)
COMMAND_R = framed(
    "command-r",
    {
        "system": "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>",
        "user": "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>",
        "assistant": "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    },
    "<|END_OF_TURN_TOKEN|>",
    stop=("<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>"),
)
GRANITE = framed(
    "granite",
    {r: f"<|start_of_role|>{r}<|end_of_role|>" for r in ROLES},
    "<|end_of_text|>\n",
    stop=("<|end_of_text|>", "<|start_of_role|>"),
)
DEEPSEEK = framed(
    "deepseek",
    {"system": "", "user": "<｜User｜>", "assistant": "<｜Assistant｜>"},
    {"system": "", "user": "", "assistant": "<｜end▁of▁sentence｜>"},
    stop=("<｜end▁of▁sentence｜>", "<｜User｜>"),
)
TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t for t in (CHATML, LLAMA3, GEMMA, PHI3, MISTRAL, COMMAND_R, GRANITE, DEEPSEEK)
}


class UnknownTemplateError(ValueError):
    """The GGUF file's chat template cannot be framed safely; the message says why."""


FILLER = "(continue)"  # the user turn between two replies, for formats that cannot frame them


@dataclass(frozen=True, slots=True)
class Adapted:
    """A turn as the format takes it: its role, its text, and the turns it stands for (their
    indices; none for a filler)."""

    role: str
    text: str
    sources: tuple[int, ...]


def adapt(template: ChatTemplate, turns: Sequence[tuple[str, str]]) -> list[Adapted]:
    """``turns`` (role, text) as ``template`` takes them: system text folded into user turns
    where it has no system role; consecutive turns of one role merged, or replies split by a
    short user turn, where it cannot frame them in a row (names stay in the merged text)."""
    out: list[Adapted] = []
    for i, (role, text) in enumerate(turns):
        if role == "system" and not template.system_role:
            role = "user"
        if template.trims:
            text = text.strip()
        previous = out[-1] if out else None
        merge = (role == "system" and template.merges_systems) or (
            role == "user" and template.merges_users
        )
        if previous is not None and previous.role == role and merge:
            out[-1] = Adapted(role, previous.text + "\n\n" + text, (*previous.sources, i))
            continue
        if (
            previous is not None
            and previous.role == role == "assistant"
            and (template.splits_assistants)
        ):
            out.append(Adapted("user", FILLER, ()))
        out.append(Adapted(role, text, (i,)))
    return out


def frame(template: ChatTemplate, turns: Sequence[tuple[str, str]]) -> list[Piece]:
    """The pieces of a whole prompt: the head, ``turns`` adapted to the format, the cue."""
    pieces = list(template.start())
    for turn in adapt(template, turns):
        pieces.extend(template.turn(turn.role, turn.text))
    pieces.extend(template.generation_prompt())
    return pieces


def template_by_name(name: str) -> ChatTemplate:
    """A named format (``auto`` is resolved by :func:`ai_model.jinja_format.choose_template`)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UnknownTemplateError(
            f"unknown chat_template {name!r}; use auto or one of: {', '.join(TEMPLATES)}"
        ) from None


def encode(pieces: Iterable[Piece], tokenizer: Tokenizer) -> list[int]:
    """Token ids for ``pieces``, as llama.cpp tokenizes the whole text with special tokens:
    it splits the text at special tokens and tokenizes each run between them as plain text.

    The special tokens come only from markup; every character of content is in a plain run
    (tokenized with ``special=False``), together with the plain markup beside it (a ``user\n``
    after ``<|im_start|>``), so content can never become a control token, and the ids are the
    ones the model saw in training.
    """
    ids: list[int] = []
    plain: list[str] = []
    eat_left = False  # the special token before the run eats the whitespace after it

    def flush(eat_right: bool = False) -> None:
        nonlocal eat_left
        text = "".join(plain)
        if eat_left:
            text = text.lstrip()
        if eat_right:
            text = text.rstrip()
        if text:
            ids.extend(tokenizer.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        plain.clear()
        eat_left = False

    for piece in pieces:
        if not piece.text:
            continue
        if not piece.control:
            plain.append(piece.text)
            continue
        for span in special_spans(piece.text, tokenizer):
            if span.special:
                flush(eat_right=span.lstrip)
                ids.extend(
                    tokenizer.tokenize(span.text.encode("utf-8"), add_bos=False, special=True)
                )
                eat_left = span.rstrip
            else:
                plain.append(span.text)
    flush()
    return ids


@dataclass(frozen=True, slots=True)
class Span:
    """A run of markup: a special token (which may eat the whitespace beside it, as llama.cpp
    does for tokens marked lstrip/rstrip) or plain text."""

    text: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False


_SPANS: weakref.WeakKeyDictionary[Tokenizer, dict[str, tuple[Span, ...]]] = (
    weakref.WeakKeyDictionary()
)


def special_spans(markup: str, tokenizer: Tokenizer) -> tuple[Span, ...]:
    """``markup`` cut into spans, as this tokenizer sees it: a marker is special when it
    tokenizes, with special tokens on, to one token of its own."""
    try:
        cache = _SPANS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        cache = {}
    found = cache.get(markup)
    if found is not None:
        return found

    def ids(text: str, special: bool = True) -> list[int]:
        return tokenizer.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    spans: list[Span] = []
    pos = 0
    for match in _MARKER.finditer(markup):
        marker = match.group()
        special = ids(marker)
        if len(special) == 1 and special != ids(marker, False):
            if match.start() > pos:
                spans.append(Span(markup[pos : match.start()], False))
            eats_after = ids(marker + "\n\nx") == ids(marker + "x")
            eats_before = ids("x\n\n" + marker) == ids("x" + marker)
            spans.append(Span(marker, True, eats_before, eats_after))
            pos = match.end()
    if pos < len(markup):
        spans.append(Span(markup[pos:], False))
    found = tuple(spans)
    if len(cache) > 4096:
        cache.clear()
    cache[markup] = found
    return found


def render(pieces: Sequence[Piece]) -> str:
    """The prompt as text (for logs and tests); not what the model reads, :func:`encode` is."""
    return "".join(piece.text for piece in pieces)


# Markers: <|im_start|>, <start_of_turn>, [INST], <｜User｜>, <|START_OF_TURN_TOKEN|> ...
_MARKER = re.compile(
    r"<\|[^|<>\s]{1,64}\|>|<\|[^|<>\s]{1,64}>|<[^|<>\s]{1,64}\|>|<｜[^｜<>]{1,40}｜>"
    r"|</?[A-Za-z_][^<>\s]{0,40}>|\[/?[A-Z_]{2,40}\]"
)


def template_markers(template: ChatTemplate) -> list[str]:
    """Every piece of markup the format writes: whole turn frames and each marker in them."""
    frames = [template.open[r] for r in template.open] + [template.close[r] for r in template.close]
    frames += [template.cue, template.head, *template.stop]
    frames = [f for f in frames if f]
    found = {marker for frame in frames for marker in _MARKER.findall(frame)}
    return list(dict.fromkeys([*frames, *sorted(found)]))


def plain_text_leaks(
    template: ChatTemplate, tokenizer: Tokenizer, is_control: Callable[[int], bool]
) -> list[str]:
    """The format markers that still yield a control (or user-defined special) token when
    tokenized as plain text: each marker alone where one does, else the whole frame.

    llama.cpp matches *user-defined* tokens even when special tokens are off, so a GGUF that
    marks ``<|im_start|>`` as user-defined would let any user open a turn of their own.
    """
    leaks = []
    for marker in template_markers(template):
        ids = tokenizer.tokenize(marker.encode("utf-8"), add_bos=False, special=False)
        if any(is_control(i) for i in ids):
            leaks.append(marker)
    markers = [m for m in leaks if _MARKER.fullmatch(m)]
    return markers or [m if len(m) <= 60 else m[:57] + "..." for m in leaks]
