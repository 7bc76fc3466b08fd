"""A model file's tokenizer and chat template alone (no weights): for commands that only count.

Importing a character card checks how many tokens its pinned part takes; the command line does
that without loading gigabytes of weights onto a GPU.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from ai_model.base import ModelError
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.sampling import Grammar
from ai_model.templates import ChatTemplate


class VocabModel:
    """Implements the tokenizing half of :class:`ai_model.base.ChatModel`; never generates."""

    def __init__(self, llm: Any, name: str, template: ChatTemplate, n_ctx: int) -> None:
        self._llm = llm
        self.name = name
        self.template = template
        self.n_ctx = n_ctx
        self.bos: tuple[int, ...] = tuple(llm.tokenize(b"", add_bos=True, special=True))

    @classmethod
    def load(cls, settings: ModelSettings, path: Path, name: str) -> VocabModel:
        """Read the vocabulary of ``path`` (blocking: call it off the event loop)."""
        from llama_cpp import Llama

        from ai_model.local import llama_template

        try:
            llm = Llama(model_path=str(path), vocab_only=True, n_ctx=256, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"could not read the vocabulary of {path}: {exc}") from exc
        try:
            template = llama_template(settings, llm, path)
        except ModelError:
            llm.close()
            raise
        return cls(llm, name, template, settings.n_ctx)

    @property
    def n_vocab(self) -> int:
        return int(self._llm.n_vocab())

    def control_ids(self) -> frozenset[int]:
        """Every control token of the vocabulary (end-of-turn ones included)."""
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        return frozenset(
            i for i in range(self.n_vocab) if llama_cpp.llama_vocab_is_control(vocab, i)
        )

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return list(self._llm.tokenize(text, add_bos=add_bos, special=special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return bytes(self._llm.detokenize(list(tokens))).decode("utf-8", errors="replace")

    def generated(self, slot: str | None) -> Sequence[int]:
        return ()

    def upcoming(self, slot: str | None) -> None:
        """Nothing is generated here."""

    async def stream(
        self,
        tokens: Sequence[int],
        sampling: SamplingSettings,
        stop: Sequence[str] = (),
        slot: str | None = None,
        background: bool = False,
        grammar: Grammar | None = None,
    ) -> AsyncIterator[str]:
        raise ModelError(f"{self.name} is loaded for its vocabulary only and cannot generate")
        yield ""  # pragma: no cover - makes this an async generator

    def close(self) -> None:
        close = getattr(self._llm, "close", None)
        if close is not None:
            close()
