"""What the bench sections share: logging, synthetic text, the settings of a bench run."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

from ai_model.base import ChatModel
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.sampling import Grammar
from chat.core import ConversationCore
from chat.messages import IncomingMessage
from chat.settings import Settings

WORDS = [
    "budget",
    "report",
    "meeting",
    "lantern",
    "dragon",
    "quarterly",
    "river",
    "invoice",
    "castle",
    "spreadsheet",
    "tavern",
    "deadline",
    "sword",
    "client",
    "harbor",
    "agenda",
    "potion",
    "schedule",
    "merchant",
    "forecast",
    "travel",
    "weather",
]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def bench_settings(database: Path, model: ModelSettings) -> Settings:
    """Settings for a bench: ``model`` in both roles, a database file of its own."""
    # One synthetic user sends everything: the fair-share limits, which would ration
    # them, are off, so that the figures measure the pipeline itself.
    return replace(
        Settings(),
        database_url=f"sqlite+aiosqlite:///{database}",
        models={"character": model, "office": model},
        rate_limit=0,
        max_queued=1_000_000,
        max_pending_per_user=1_000_000,
    )


async def first_token_s(core: ConversationCore, key: str, text: str) -> float:
    """Seconds from sending a message (a DM on the bench platform) to the reply's first text."""
    msg = IncomingMessage("bench", key, "u1", "Ann", text, is_dm=True)
    start = time.perf_counter()
    first: float | None = None
    async for reply in core.answers.respond(msg):
        if first is None and reply.text and not reply.final:
            first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


class InstantModel:
    """A model that answers "OK." at once, with a real model's tokenizer and template: what
    the core costs, with generation taken out."""

    def __init__(self, vocab: ChatModel) -> None:
        self._vocab = vocab
        self.name = f"instant ({vocab.name})"
        self.template = vocab.template
        self.n_ctx = vocab.n_ctx
        self.bos = vocab.bos

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._vocab.tokenize(text, add_bos, special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._vocab.detokenize(tokens)

    def generated(self, slot: str | None) -> Sequence[int]:
        return ()

    def upcoming(self, slot: str | None) -> None:
        """Instant replies: nothing to gather."""

    async def stream(
        self,
        tokens: Sequence[int],
        sampling: SamplingSettings,
        stop: Sequence[str] = (),
        slot: str | None = None,
        background: bool = False,
        grammar: Grammar | None = None,
    ) -> AsyncIterator[str]:
        yield "OK."


class FixedModels:
    """A model provider that serves given models per role."""

    def __init__(self, models: dict[str, ChatModel]) -> None:
        self.models = models

    async def get(self, role: str) -> ChatModel:
        return self.models[role]
