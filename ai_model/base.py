"""The generation interface the conversation core talks to, and the errors it may see."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from ai_model.config import SamplingSettings
from ai_model.templates import ChatTemplate


class ModelError(Exception):
    """A model could not be loaded or used; the message is meant for the user."""


class ModelFileMissing(ModelError):
    """A configured GGUF file does not exist."""


class GenerationError(ModelError):
    """llama.cpp failed while generating a reply."""


class ChatModel(Protocol):
    """A loaded model: its tokenizer, chat template and a streaming generator.

    ``stream`` is an async iterator of text pieces; implementations serve one generation at a
    time and queue the rest fairly (first come, first served).  ``background`` marks work that
    nobody waits for (a summary job): a backend that generates for several conversations at
    once may evaluate its prompt in small steps, so that a reply starting meanwhile waits little.
    """

    name: str
    template: ChatTemplate
    n_ctx: int
    bos: tuple[int, ...]

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def generated(self, slot: str | None) -> Sequence[int]:
        """The token ids the last generation for ``slot`` produced (and evaluated)."""
        ...

    def stream(
        self,
        tokens: Sequence[int],
        sampling: SamplingSettings,
        stop: Sequence[str] = (),
        slot: str | None = None,
        background: bool = False,
    ) -> AsyncIterator[str]: ...
