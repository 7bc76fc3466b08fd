"""What the bench sections share: logging, synthetic text, the settings of a bench run."""

from __future__ import annotations

import random
import sys
from dataclasses import replace
from pathlib import Path

from ai_model.config import ModelSettings
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
