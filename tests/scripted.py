"""A scripted stand-in for a model, for tests and benchmarks where determinism matters.

It implements :class:`ai_model.base.ChatModel`: replies come from a script instead of llama.cpp,
every prompt it is asked to continue is recorded, and tokenization is either borrowed from a real
model (so token counts are the real ones) or done by :class:`ByteTokenizer`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Sequence

from ai_model.config import SamplingSettings
from ai_model.sampling import Grammar
from ai_model.templates import _MARKER as MARKER
from ai_model.templates import CHATML, ChatTemplate, Tokenizer, template_markers


class ByteTokenizer:
    """One token per UTF-8 byte; with ``special=True`` each control string is one id >= 256."""

    def __init__(self, specials: Sequence[str] = ()) -> None:
        self.specials = {text: 256 + i for i, text in enumerate(specials)}
        self._pattern = (
            re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
            if specials
            else None
        )

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        decoded = text.decode("utf-8")
        if not special or self._pattern is None:
            return list(text)
        ids: list[int] = []
        pos = 0
        for match in self._pattern.finditer(decoded):
            ids.extend(decoded[pos : match.start()].encode("utf-8"))
            ids.append(self.specials[match.group()])
            pos = match.end()
        ids.extend(decoded[pos:].encode("utf-8"))
        return ids


Script = Callable[[Sequence[int]], str]


class ScriptedModel:
    """Answers from ``script`` (a list of replies, cycled, or a function of the prompt)."""

    def __init__(
        self,
        script: Sequence[str] | Script = ("OK.",),
        *,
        name: str = "scripted",
        template: ChatTemplate = CHATML,
        tokenizer: Tokenizer | None = None,
        n_ctx: int = 8191,
        bos: Sequence[int] = (),
        delay: float = 0.0,
    ) -> None:
        self.name = name
        self.template = template
        self.n_ctx = n_ctx
        self.bos = tuple(bos)
        self.delay = delay
        self.prompts: list[list[int]] = []
        self.stops: list[list[str]] = []
        self.samplings: list[SamplingSettings] = []
        self.grammars: list[Grammar | None] = []
        self.announced: list[str | None] = []  # slots announced by the engine (upcoming)
        self.gate: asyncio.Event | None = None  # when set by a test, generation waits for it
        markers = [m for m in template_markers(template) if MARKER.fullmatch(m)]
        self._tokenizer = tokenizer or ByteTokenizer(markers)
        self._script = script
        self._turn = asyncio.Lock()

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        ids = self._tokenizer.tokenize(text, add_bos=False, special=special)
        return [*self.bos, *ids] if add_bos else ids

    def detokenize(self, tokens: Sequence[int]) -> str:
        detokenize = getattr(self._tokenizer, "detokenize", None)
        if detokenize is not None:
            return str(detokenize(tokens))
        return bytes(t for t in tokens if t < 256).decode("utf-8", "replace")

    def generated(self, slot: str | None) -> Sequence[int]:
        return ()  # scripted replies are not generated token by token

    def upcoming(self, slot: str | None) -> None:
        self.announced.append(slot)

    def _reply(self, tokens: Sequence[int]) -> str:
        if callable(self._script):
            return self._script(tokens)
        return self._script[(len(self.prompts) - 1) % len(self._script)]

    async def stream(
        self,
        tokens: Sequence[int],
        sampling: SamplingSettings,
        stop: Sequence[str] = (),
        slot: str | None = None,
        background: bool = False,
        grammar: Grammar | None = None,
    ) -> AsyncIterator[str]:
        async with self._turn:
            if len(tokens) + sampling.max_tokens > self.n_ctx:
                raise ValueError(f"prompt of {len(tokens)} tokens overflows the context")
            self.prompts.append(list(tokens))
            self.stops.append(list(stop))
            self.samplings.append(sampling)
            self.grammars.append(grammar)
            if self.gate is not None:
                await self.gate.wait()
            for word in re.findall(r"\S+\s*|\s+", self._reply(tokens)):
                if self.delay:
                    await asyncio.sleep(self.delay)
                yield word
