"""The generation interface the conversation core talks to, and the errors it may see."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ai_model.config import SamplingSettings
from ai_model.sampling import Grammar
from ai_model.templates import ChatTemplate


class ModelError(Exception):
    """A model could not be loaded or used; the message is meant for the user."""


class ModelFileMissing(ModelError):
    """A configured GGUF file does not exist."""


class GenerationError(ModelError):
    """llama.cpp failed while generating a reply."""


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """What a loaded model is doing now, and its prompt-token totals since it loaded (read by
    the operator's metrics; only the in-process batched backend knows all of it)."""

    queued: int  # requests waiting for a sequence
    busy: int  # sequences generating now
    parked: int  # conversation states parked in RAM (not resident in a sequence)
    prompt_reused: int  # prompt tokens found in the cache, since load
    prompt_computed: int  # prompt tokens evaluated, since load


BACKGROUND_CHUNK = 32  # prompt tokens per step of background work (summaries)


class ChatModel(Protocol):
    """A loaded model: its tokenizer, chat template and a streaming generator.

    ``stream`` is an async iterator of text pieces; implementations serve one generation at a
    time and queue the rest fairly (first come, first served).  ``background`` marks work that
    nobody waits for (a summary job): the in-process backends evaluate its prompt in steps of
    :data:`BACKGROUND_CHUNK` tokens and stop between them once the consumer stops listening, so
    that a reply starting meanwhile waits for one small step, not for the whole prompt (a
    remote server schedules its own work).
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

    def upcoming(self, slot: str | None) -> None:
        """A reply for ``slot`` is about to be asked for: its prompt is being built.  The
        in-process batched model may hold an idle step briefly for it, so that prompts sent
        together are evaluated together (:mod:`ai_model.arrivals`); others ignore it."""
        ...

    def stream(
        self,
        tokens: Sequence[int],
        sampling: SamplingSettings,
        stop: Sequence[str] = (),
        slot: str | None = None,
        background: bool = False,
        grammar: Grammar | None = None,
    ) -> AsyncIterator[str]: ...
