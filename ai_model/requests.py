"""What the batched scheduler is asked for and what it records: a request, and what each
admission and each step did (kept for tests and the bench)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ai_model.config import SamplingSettings
from ai_model.sampling import Grammar


@dataclass(eq=False)
class Request:
    """One generation: the prompt, how to sample, and where its text goes (thread-safe)."""

    key: str | None
    prompt: tuple[int, ...]
    sampling: SamplingSettings
    stops: tuple[str, ...]
    max_tokens: int
    emit: Callable[[object], None]
    prefill_chunk: int | None = None  # prompt tokens per step, if fewer than the model's
    cancel: threading.Event = field(default_factory=threading.Event)
    allowed_controls: frozenset[int] = frozenset()  # control tokens a reply may hold
    grammar: Grammar | None = None  # what the reply must follow (see ai_model.sampling)


@dataclass(frozen=True, slots=True)
class Admission:
    """What admitting one request did: where its state came from, and the prompt tokens that
    llama.cpp already held (``reused``) or had to evaluate (``computed``)."""

    key: str | None
    seq: int
    event: str  # "resident", "ram", "disk", "shared" (a shared beginning) or "cold"
    reused: int
    computed: int


@dataclass(frozen=True, slots=True)
class Step:
    """One ``llama_decode``: the sequences given a generated token, and prompt tokens per
    sequence evaluated alongside."""

    decoded: tuple[int, ...]
    prefill: tuple[tuple[int, int], ...]
    seconds: float  # in llama_decode
    sampling: float = 0.0  # in the samplers
    total: float = 0.0  # the whole step: packing, decode, sampling, stops, hand-off
