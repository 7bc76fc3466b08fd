"""Prompt building and the context window: turns as token ids, trimmed in chunks.

The prompt is ``BOS + system + turns + reply cue``.  Each turn is encoded on its own (template
markup with special tokens, text as plain text) and cached, so earlier turns keep exactly the
same tokens from one request to the next and llama.cpp can reuse the evaluated prefix.

When the history no longer fits, the window start moves forward by a *chunk* (a quarter of the
history budget by default) rather than by one message, so the front of the prompt stays the same
for many turns after each trim.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ai_model.templates import ChatTemplate, Piece, Tokenizer, adapt, encode
from storage.records import ASSISTANT, StoredMessage

MAX_NAME_CHARS = 64
_NAME_JUNK = re.compile(r"[\s:]+")


@functools.lru_cache(maxsize=4096)
def clean_name(name: str | None) -> str:
    """A display name safe to put in front of a turn: one line, no colon, bounded length."""
    cleaned = _NAME_JUNK.sub(" ", name or "").strip()[:MAX_NAME_CHARS].strip()
    return cleaned or "User"


@dataclass(frozen=True, slots=True)
class Turn:
    """One history message as the model sees it."""

    position: int  # conversation order: the answered message's id for replies, else own id
    message_id: int
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Window:
    """The turns that fit, and the window start to remember for the next request."""

    turns: tuple[Turn, ...]
    start: int
    trimmed: bool


class PromptTooLong(Exception):
    """The newest message alone does not fit in the context next to the pinned part."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"message needs {needed} tokens, {available} available")
        self.needed = needed
        self.available = available


@dataclass(frozen=True, slots=True)
class Part:
    """One run of a prompt, in order: a history message (``message``), or a block of the
    bot's or the card's text (role ``system``) or of what users wrote to steer (``user``)."""

    role: str
    text: str = ""
    message: StoredMessage | None = None
    named: bool = False
    label: str = ""  # which part of the prompt this is (for the prompt inspector)
    # A turn framed otherwise than the template frames ``role`` (tools: Meta's system turn,
    # the definitions before the first message, calls and results), piece by piece.
    pieces: tuple[Piece, ...] = ()


class TurnEncoder:
    """Encodes system text and history turns for one model, caching per message."""

    def __init__(
        self, tokenizer: Tokenizer, template: ChatTemplate, max_cached_tokens: int = 4_000_000
    ):
        self.tokenizer = tokenizer
        self.template = template
        self._cache: OrderedDict[tuple[int, str, str, bool], Turn] = OrderedDict()
        # Bounded by tokens, not turns: a flood of huge messages must not grow memory.
        self._max_cached_tokens = max_cached_tokens
        self._cached_tokens = 0
        self._system: dict[tuple[str, str], tuple[int, ...]] = {}
        self._replies: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # generated content
        self._cue: tuple[int, ...] | None = None
        self._head: tuple[int, ...] | None = None
        # Prompts are assembled on worker threads, several conversations at once.
        self._lock = threading.Lock()

    @staticmethod
    def text_of(message: StoredMessage, named: bool = False) -> str:
        """A turn's content; ``named`` puts the speaker's name in front (for replies: several
        characters share the assistant role; for users: several humans)."""
        role = "assistant" if message.role == ASSISTANT else "user"
        if named and (message.author_name or role == "user"):
            return f"{clean_name(message.author_name)}: {message.text}"
        return message.text

    def pieces(self, message: StoredMessage, named: bool = False) -> tuple[Piece, ...]:
        """The template pieces of one turn (see :meth:`text_of`)."""
        role = "assistant" if message.role == ASSISTANT else "user"
        return self.template.turn(role, self.text_of(message, named))

    def turn(self, message: StoredMessage, named: bool = False) -> Turn:
        """``named``: see :meth:`text_of`."""
        key = (message.id, message.author_name or "", message.text, named)
        turn = self._cache.get(key)
        if turn is None:
            tokens = tuple(encode(self.pieces(message, named), self.tokenizer))
            anchor = message.reply_to_id if message.reply_to_id is not None else message.id
            turn = Turn(position=anchor, message_id=message.id, tokens=tokens)
            self._keep(key, turn)
        return turn

    def _keep(self, key: tuple[int, str, str, bool], turn: Turn) -> None:
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._cached_tokens -= len(old.tokens)
            self._cache[key] = turn
            self._cached_tokens += len(turn.tokens)
            while self._cached_tokens > self._max_cached_tokens and len(self._cache) > 1:
                _, dropped = self._cache.popitem(last=False)
                self._cached_tokens -= len(dropped.tokens)

    def remember_reply(self, message: StoredMessage, content: Sequence[int]) -> None:
        """Use these tokens (what the model generated) for a reply's content from now on."""
        key = (message.id, message.author_name or "", message.text, False)
        opening, _content, closing = self.template.turn("assistant", "")
        tokens = (*encode([opening], self.tokenizer), *content, *encode([closing], self.tokenizer))
        anchor = message.reply_to_id if message.reply_to_id is not None else message.id
        self._keep(key, Turn(position=anchor, message_id=message.id, tokens=tokens))
        with self._lock:
            self._replies[message.id] = tuple(content)
            while len(self._replies) > 4096:
                self._replies.popitem(last=False)

    def content(self, message: StoredMessage, named: bool = False) -> list[int]:
        """A turn's content tokens without its markup: what the model wrote (for a reply whose
        generated tokens are remembered) or the text encoded (blocking)."""
        remembered = self._replies.get(message.id)
        if remembered is not None and not named:
            return list(remembered)
        return encode([Piece(self.text_of(message, named), False)], self.tokenizer)

    def system(self, text: str) -> list[int]:
        """A system turn's tokens (the bot's and the card's text); cached, since the same story
        heads every prompt."""
        return self._fixed("system", text)

    def user(self, text: str) -> list[int]:
        """A user turn that is not a message (what players wrote to steer); cached."""
        return self._fixed("user", text)

    def fixed(self, role: str, text: str) -> list[int]:
        """A turn of ``role`` that is not a stored message (a tool call or result); cached."""
        return self._fixed(role, text)

    def _fixed(self, role: str, text: str) -> list[int]:
        return self._kept((role, text), lambda: self.template.turn(role, text))

    def framed(self, pieces: tuple[Piece, ...]) -> list[int]:
        """The tokens of a turn framed piece by piece (a :class:`Part`'s ``pieces``); cached."""
        key = ("pieces", "\x00".join(f"{int(p.control)}{p.text}" for p in pieces))
        return self._kept(key, lambda: pieces)

    def _kept(self, key: tuple[str, str], pieces: Callable[[], Sequence[Piece]]) -> list[int]:
        tokens = self._system.get(key)
        if tokens is None:
            tokens = tuple(encode(pieces(), self.tokenizer))
            with self._lock:
                if len(self._system) >= 256:
                    self._system.clear()
                self._system[key] = tokens
        return list(tokens)

    def cue(self) -> list[int]:
        if self._cue is None:
            self._cue = tuple(encode(self.template.generation_prompt(), self.tokenizer))
        return list(self._cue)

    def head(self) -> list[int]:
        """What the format writes before the first turn (after the tokenizer's BOS)."""
        if self._head is None:
            self._head = tuple(encode(self.template.start(), self.tokenizer))
        return list(self._head)

    # -- whole prompts ------------------------------------------------------------------------

    def _text(self, part: Part) -> str:
        return self.text_of(part.message, part.named) if part.message is not None else part.text

    def compose(self, parts: Sequence[Part]) -> list[int]:
        """The tokens of ``parts`` in order, after the format's head: each turn cached; turns
        the format folds, merges or splits (:func:`ai_model.templates.adapt`) as it takes them."""
        tokens = self.head()
        if not self.template.adapts:
            for part in parts:
                tokens.extend(self._tokens(part))
            return tokens
        for turn in adapt(self.template, [(p.role, self._text(p)) for p in parts]):
            if len(turn.sources) == 1 and parts[turn.sources[0]].role == turn.role:
                tokens.extend(self._tokens(parts[turn.sources[0]]))
            else:
                tokens.extend(self._fixed(turn.role, turn.text))
        return tokens

    def _tokens(self, part: Part) -> list[int]:
        if part.pieces:
            return self.framed(part.pieces)
        if part.message is not None:
            return list(self.turn(part.message, part.named).tokens)
        return self._fixed(part.role, part.text)


def fit_window(
    turns: Sequence[Turn],
    *,
    budget: int,
    start: int,
    chunk_fraction: float = 0.25,
    cut_after: int | None = None,
) -> Window:
    """Choose the turns to send, oldest first, so that their tokens fit in ``budget``.

    ``start`` is the window start remembered from the previous request (a turn position).  While
    everything from there fits, it is kept unchanged, so the prompt's front does not move.  When
    it no longer fits, the oldest turns are dropped until the rest uses at most
    ``budget * (1 - chunk_fraction)``, leaving room for the next several turns.  A trim drops
    at least every turn up to position ``cut_after`` (where a prepared summary ends), while a
    newer turn remains.
    """
    if not turns:
        return Window((), start, False)
    newest = len(turns[-1].tokens)
    if newest > budget:
        raise PromptTooLong(newest, budget)
    kept = [t for t in turns if t.position >= start] or [turns[-1]]
    total = sum(len(t.tokens) for t in kept)
    if total <= budget:
        return Window(tuple(kept), start, False)
    target = max(newest, int(budget * (1.0 - chunk_fraction)))
    first = 0
    while first < len(kept) - 1 and (
        total > target or (cut_after is not None and kept[first].position <= cut_after)
    ):
        total -= len(kept[first].tokens)
        first += 1
    # Never open the window on a bot reply whose question was cut off.
    while first < len(kept) - 1 and kept[first].position != kept[first].message_id:
        total -= len(kept[first].tokens)
        first += 1
    kept = kept[first:]
    return Window(tuple(kept), kept[0].position, True)
