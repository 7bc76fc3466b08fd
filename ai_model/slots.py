"""Evaluated conversation states: one llama.cpp context per slot, kept LRU, copied to disk.

A loaded model keeps ``cache_slots`` llama.cpp contexts on the same weights, each with its own KV
cache.  A conversation keeps its context while it is among the most recently used ones, so a
message in channel B after one in channel A does not re-evaluate B's history, and switching costs
nothing (the contexts are swapped, not copied).  A new conversation takes the least recently
used context and keeps the whole turns its prompt shares with what that context held (in
practice, the system part or character card everyone gets), so it evaluates only the rest; a
shared part never reaches into a message's text (see :mod:`ai_model.prefixes`).  With a
``state_dir``, the states are written to disk at shutdown and restored on first use after a
restart, if they still match the model file, its settings and the prompt; a stale or corrupt
file is ignored.

Everything here runs on the model's single worker thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ai_model.parking import (
    MIN_USEFUL_PREFIX,
    StateFiles,
    common_prefix,
    read_sequence,
    write_sequence,
)
from ai_model.prefixes import whole_turns

__all__ = ["SlotPool", "common_prefix"]
log = logging.getLogger(__name__)


@dataclass
class _Slot:
    ctx: Any  # llama_cpp._internals.LlamaContext
    input_ids: Any  # numpy array of n_ctx token ids
    n_tokens: int = 0
    requires_eval: bool = True
    key: str | None = None
    used: float = 0.0


class SlotPool:
    """The contexts of one loaded model and which conversation each one holds."""

    def __init__(
        self,
        llm: Any,
        n_slots: int,
        state_dir: Path | None,
        fingerprint: str,
        *,
        max_disk_bytes: int = 4096 * 2**20,
        is_control: Callable[[int], bool] = lambda _token: False,
    ) -> None:
        self.llm = llm
        self.is_control = is_control  # which tokens are chat markup (see _keep_shared_beginning)
        self.n_slots = max(1, n_slots)
        self.state_dir = state_dir
        self.files = StateFiles(state_dir, fingerprint, max_disk_bytes) if state_dir else None
        first = _Slot(llm._ctx, llm.input_ids, llm.n_tokens, True)
        self._base_ctx = llm._ctx
        # All contexts are made at load time: allocating a KV cache takes a noticeable moment,
        # which should not land on the first message of a new channel.
        self.slots = [first, *(self._new_slot() for _ in range(self.n_slots - 1))]
        self.active = first
        self.last_event = "cold"  # what the latest activation did (for logs and benchmarks)

    def held_keys(self) -> list[str | None]:
        """The conversations held, most recently used first."""
        return [s.key for s in sorted(self.slots, key=lambda s: -s.used)]

    # -- switching ----------------------------------------------------------------------------

    def activate(self, key: str | None, prompt: Sequence[int]) -> str:
        """Make the context of ``key`` the model's current one; return what happened."""
        if key is None or self.active.key == key:
            self.active.used = time.monotonic()
            if key is not None:
                self.active.key = key
            self.last_event = "active"
            return self.last_event
        self._park()
        slot = next((s for s in self.slots if s.key == key), None)
        event = "switch"
        if slot is None:
            slot = self._free_slot()
            slot.key = key
            event = "cold"
            if self.files is not None and self._restore(slot, key, prompt):
                event = "disk"
            else:
                self._keep_shared_beginning(slot, prompt)
        slot.used = time.monotonic()
        self._enter(slot)
        self.last_event = event
        return event

    def _park(self) -> None:
        slot, llm = self.active, self.llm
        slot.input_ids, slot.n_tokens, slot.requires_eval = (
            llm.input_ids,
            llm.n_tokens,
            llm._requires_eval,
        )

    def _enter(self, slot: _Slot) -> None:
        llm = self.llm
        llm._ctx = slot.ctx
        llm.input_ids, llm.n_tokens, llm._requires_eval = (
            slot.input_ids,
            slot.n_tokens,
            slot.requires_eval,
        )
        self.active = slot

    def _new_slot(self) -> _Slot:
        from llama_cpp import _internals

        ctx = _internals.LlamaContext(
            model=self.llm._model, params=self.llm.context_params, verbose=False
        )
        return _Slot(ctx, np.zeros_like(self.llm.input_ids), 0, True)

    def _keep_shared_beginning(self, slot: _Slot, prompt: Sequence[int]) -> None:
        """Keep of what ``slot`` held (another conversation) only the whole turns that
        ``prompt`` begins with too; llama-cpp-python evaluates the rest."""
        held = slot.input_ids[: slot.n_tokens].tolist()
        n = whole_turns(min(common_prefix(held, prompt), len(prompt) - 1), prompt, self.is_control)
        slot.n_tokens = n if n >= MIN_USEFUL_PREFIX else 0

    def _free_slot(self) -> _Slot:
        unused = [s for s in self.slots if s.key is None and s is not self.active]
        if unused:
            return unused[0]
        victim = min(self.slots, key=lambda s: s.used)
        log.info("state cache: evicting %s (least recently used)", victim.key)
        # Its evaluated tokens stay for now: the new conversation's prompt most likely begins
        # with the same system part (or character card); see _keep_shared_beginning.
        victim.requires_eval, victim.key = True, None
        return victim

    # -- disk ---------------------------------------------------------------------------------

    def save_all(self) -> int:
        """Write every held conversation's state to ``state_dir``; return how many."""
        if self.files is None:
            return 0
        self._park()
        saved = 0
        for slot in self.slots:
            if slot.key is None or slot.n_tokens == 0:
                continue
            state = read_sequence(slot.ctx.ctx, 0, slot.input_ids[: slot.n_tokens].tolist())
            saved += self.files.write(slot.key, state)
        self.files.prune()
        return saved

    def _restore(self, slot: _Slot, key: str, prompt: Sequence[int]) -> bool:
        assert self.files is not None
        found = self.files.read(key, len(self.llm.input_ids))
        if found is None:
            return False
        if common_prefix(found.tokens, prompt) < MIN_USEFUL_PREFIX:
            log.info("state file for %s no longer matches the conversation: ignored", key)
            return False
        slot.ctx.kv_cache_clear()
        if not write_sequence(slot.ctx.ctx, 0, found):
            log.warning("could not restore the saved state of %s: ignored", key)
            slot.ctx.kv_cache_clear()
            slot.n_tokens = 0
            return False
        slot.input_ids[: len(found.tokens)] = found.tokens
        slot.n_tokens, slot.requires_eval = len(found.tokens), True
        return True

    def close(self) -> None:
        """Point the model back at its own context and free the extra ones."""
        self._park()
        self.llm._ctx = self._base_ctx
        self.llm.input_ids = self.slots[0].input_ids
        self.llm.n_tokens = self.slots[0].n_tokens
        for slot in self.slots:
            if slot.ctx is not self._base_ctx:
                slot.ctx.close()
        self.slots = self.slots[:1]
