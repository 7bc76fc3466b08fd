"""How a sequence picks its next token: llama.cpp's sampler chain, built as llama-cpp-python
builds its own, and, for a generation held to a grammar, llama.cpp's sample-then-check path.

A :class:`Grammar` is GBNF text and the patterns that switch it on: a lazy grammar lets the
model write freely until a trigger appears (a call marker), then holds it to the grammar.
:class:`GrammarCheck` samples as llama.cpp's own common sampler does: the chain picks a
token; only that token is checked against the grammar; only when it is rejected are candidates
filtered by the grammar and the chain applied again (the likeliest ones first: see the class).
Masking the whole vocabulary with the grammar on every token is what made grammar sampling
cost 85 ms a token against a 10.6 ms forward pass (llama.cpp #7554).
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ai_model.config import SamplingSettings


def schema_gbnf(schema: Mapping[str, Any]) -> str:
    """GBNF for a JSON schema (llama-cpp-python's converter; its root rule is ``root``).  It
    drops the schema features it cannot express: what follows it still needs validating."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return str(json_schema_to_gbnf(json.dumps(schema)))


@dataclass(frozen=True, slots=True)
class Grammar:
    """GBNF text; ``triggers`` (regular expressions) make it lazy: off until one matches the
    output, then on from the start of that match.  Without triggers it holds from the first
    token."""

    gbnf: str
    triggers: tuple[str, ...] = ()
    root: str = "root"


def make_sampler(sampling: SamplingSettings, pick: bool = True) -> Any:
    """A llama.cpp sampler chain built exactly as llama-cpp-python builds its own, so that a
    sequence alone samples what the serial path samples with the same seed.  Without ``pick``
    the chain stops before its last sampler (greedy or the seeded draw): :func:`make_pick`."""
    from llama_cpp import _internals

    internals: Any = _internals  # its classes are untyped
    sampler = internals.LlamaSampler()
    sampler.add_penalties(
        n_vocab=0,  # unused by llama.cpp's penalties sampler
        penalty_last_n=sampling.repeat_last_n,
        penalty_repeat=sampling.repeat_penalty,
        penalty_freq=0.0,
        penalty_present=0.0,
    )
    if sampling.temperature > 0.0:
        sampler.add_top_k(sampling.top_k)
        sampler.add_typical(1.0, 1)
        sampler.add_top_p(sampling.top_p, 1)
        sampler.add_min_p(sampling.min_p, 1)
        sampler.add_temp(sampling.temperature)
    if pick:
        _add_pick(sampler, sampling)
    return sampler


def make_pick(sampling: SamplingSettings) -> Any:
    """The last sampler of :func:`make_sampler`'s chain alone."""
    from llama_cpp import _internals

    internals: Any = _internals
    sampler = internals.LlamaSampler()
    _add_pick(sampler, sampling)
    return sampler


def _add_pick(sampler: Any, sampling: SamplingSettings) -> None:
    import llama_cpp

    if sampling.temperature <= 0.0:
        sampler.add_greedy()
    else:
        sampler.add_dist(sampling.seed if sampling.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


RESAMPLE = 2048  # likeliest tokens a rejected pick is made again among, before all of them


def narrows(sampling: SamplingSettings) -> bool:
    """Whether a sequence without a grammar samples faster through :class:`GrammarCheck`'s
    narrowed chain: a random draw after top-k keeps only tokens among the ``top_k +
    repeat_last_n`` highest logits, and a greedy pick the highest one of the ``1 +
    repeat_last_n``, so the chain run on those picks what it picks from the whole vocabulary
    (the same candidates, in the same order, for the same draw), without penalizing and
    sorting all of it: a greedy pick over SmolLM2's 49,152 tokens took 0.054 ms against 0.013
    (0.271 against 0.073 with a repeat penalty).  Only while the repeat penalty lowers logits
    (at least 1; a character card may set less, which raises the logits of recent tokens,
    wherever they ranked)."""
    if sampling.repeat_penalty < 1.0:
        return False
    return sampling.temperature <= 0 or sampling.top_k > 0


class GrammarCheck:
    """One sequence's grammar, checked against each token the sequence's chain picks.

    The chain is split: ``chain`` (penalties, truncation, temperature) and its last sampler,
    the pick (greedy, or the seeded draw).  The chain runs on the tokens that can survive it:
    the ``top_k + repeat_last_n`` highest logits (the penalty only lowers logits, of at most
    ``repeat_last_n`` tokens), so it keeps what it would keep from the whole vocabulary.  Its
    pick is checked alone; when the grammar turns it down, the :data:`RESAMPLE` likeliest
    tokens are filtered by the grammar and the chain and pick run on those allowed; only when
    none is allowed is the whole vocabulary filtered (llama.cpp filters it at every rejection).
    """

    def __init__(
        self, vocab: Any, n_vocab: int, grammar: Grammar | None, sampling: SamplingSettings
    ):
        import llama_cpp

        self._grammar: Any = None  # none: only the narrowed chain (see narrows)
        if grammar is None:
            pass
        elif grammar.triggers:
            text, root = grammar.gbnf.encode(), grammar.root.encode()
            patterns = (ctypes.c_char_p * len(grammar.triggers))(
                *(t.encode() for t in grammar.triggers)
            )
            self._grammar = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                vocab, text, root, patterns, len(grammar.triggers), None, 0
            )
        else:
            text, root = grammar.gbnf.encode(), grammar.root.encode()
            self._grammar = llama_cpp.llama_sampler_init_grammar(vocab, text, root)
        if grammar is not None and not self._grammar:
            raise ValueError("llama.cpp refused the grammar")
        self._pick = make_pick(sampling)
        if sampling.temperature > 0:
            kept = sampling.top_k if sampling.top_k > 0 else n_vocab
        else:
            kept = 1
        penalized = max(sampling.repeat_last_n, 0) if sampling.repeat_penalty != 1.0 else 0
        self.narrow = min(n_vocab, kept + penalized) if narrows(sampling) else n_vocab
        self.n_vocab = n_vocab
        self._all = (llama_cpp.llama_token_data * n_vocab)()
        self._view: Any = np.ctypeslib.as_array(self._all)  # the same memory, as numpy
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._one: Any = llama_cpp.llama_token_data(0, 1.0, 0.0)
        self.rejected = 0  # picks the grammar turned down (then made again under it)
        self.whole = 0  # of those, the ones that needed the whole vocabulary filtered
        self.checked = 0

    def _candidates(self, ctx: Any, row: int, most: int) -> Any:
        """The ``most`` tokens of highest logit at batch row ``row`` with their logits, as
        llama_sampler_sample takes them (numpy: no Python loop over the vocabulary)."""
        import llama_cpp

        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,)
        )
        n = min(most, self.n_vocab)
        if n < self.n_vocab:
            # In the vocabulary's order, as the whole of it would come: among equal logits a
            # greedy pick takes the first (argmax too, for the highest alone).
            if n == 1:
                ids = np.argmax(logits).reshape(1)
            else:
                ids = np.sort(np.argpartition(logits, self.n_vocab - n)[self.n_vocab - n :])
            self._view["id"][:n] = ids
            self._view["logit"][:n] = logits[ids]
        else:
            self._view["id"] = self._ids
            self._view["logit"] = logits
        self._view["p"][:n] = 0.0
        return llama_cpp.llama_token_data_array(self._all, n, -1, False)

    def _allows(self, token: int) -> bool:
        import llama_cpp

        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        one = llama_cpp.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(one))
        return not math.isinf(self._one.logit)

    def _allowed(self, candidates: Any) -> int:
        """Filter ``candidates`` by the grammar, keeping the allowed ones only, first (the
        samplers after it never see a token it turned down): how many are left."""
        import llama_cpp

        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
        held = self._view[: int(candidates.size)]
        allowed = held[np.isfinite(held["logit"])]  # a copy
        self._view[: len(allowed)] = allowed
        candidates.size, candidates.selected, candidates.sorted = len(allowed), -1, False
        return len(allowed)

    def _pick_from(self, candidates: Any) -> int:
        import llama_cpp

        llama_cpp.llama_sampler_apply(self._pick.sampler, ctypes.byref(candidates))
        return int(candidates.data[candidates.selected].id)

    def sample(self, chain: Any, ctx: Any, row: int) -> int:
        """The next token at batch row ``row``: the chain's pick if the grammar allows it,
        else the chain's pick among what the grammar allows; every sampler accepts it."""
        import llama_cpp

        candidates = self._candidates(ctx, row, self.narrow)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(candidates))
        token = self._pick_from(candidates)
        if self._grammar is None:
            llama_cpp.llama_sampler_accept(chain, token)
            llama_cpp.llama_sampler_accept(self._pick.sampler, token)
            return token
        self.checked += 1
        if not self._allows(token):
            # Made again among what the grammar allows: of the RESAMPLE likeliest tokens (the
            # chain's truncation would often leave none), else of the whole vocabulary.
            self.rejected += 1
            candidates = self._candidates(ctx, row, RESAMPLE)
            if not self._allowed(candidates):
                self.whole += 1
                candidates = self._candidates(ctx, row, self.n_vocab)
                if not self._allowed(candidates):
                    raise RuntimeError("the grammar allows no token here")
            llama_cpp.llama_sampler_apply(chain, ctypes.byref(candidates))
            token = self._pick_from(candidates)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(chain, token)
        llama_cpp.llama_sampler_accept(self._pick.sampler, token)
        return token

    def close(self) -> None:
        import llama_cpp

        if self._grammar:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        if self._pick is not None:
            self._pick.close()
            self._pick = None
