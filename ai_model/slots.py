"""Evaluated conversation states: one llama.cpp context per slot, kept LRU, copied to disk.

A loaded model keeps ``cache_slots`` llama.cpp contexts on the same weights, each with its own KV
cache.  A conversation keeps its context while it is among the most recently used ones, so a
message in channel B after one in channel A does not re-evaluate B's history, and switching costs
nothing (the contexts are swapped, not copied).  With a ``state_dir``, the states are written to
disk at shutdown and restored on first use after a restart, if they still match the model file,
its settings and the prompt; a stale or corrupt file is ignored.

Everything here runs on the model's single worker thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"LBSTATE1"
MIN_USEFUL_PREFIX = 32  # restoring a state that shares less with the prompt is not worth it


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Slot:
    ctx: Any  # llama_cpp._internals.LlamaContext
    input_ids: Any  # numpy array of n_ctx token ids
    n_tokens: int = 0
    requires_eval: bool = True
    key: str | None = None
    used: float = 0.0


def prune_states(folder: Path, max_bytes: int) -> list[Path]:
    """Delete the least recently written state files until ``folder`` fits ``max_bytes``."""
    try:
        files = sorted(
            ((p.stat().st_mtime_ns, p.stat().st_size, p) for p in folder.glob("*.state")),
            reverse=True,
        )
    except OSError as exc:
        log.warning("could not list saved states in %s: %s", folder, exc)
        return []
    removed = []
    total = 0
    for _mtime, size, path in files:  # newest first: keep while they fit
        total += size
        if total > max_bytes:
            try:
                path.unlink()
                removed.append(path)
            except OSError as exc:
                log.warning("could not remove the saved state %s: %s", path, exc)
    if removed:
        log.info("saved states: removed %d old file(s) to stay under the disk budget", len(removed))
    return removed


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
    ) -> None:
        self.llm = llm
        self.n_slots = max(1, n_slots)
        self.state_dir = state_dir
        self.fingerprint = fingerprint
        self.max_disk_bytes = max_disk_bytes
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
            if self.state_dir is not None and self._restore(slot, key, prompt):
                event = "disk"
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

    def _free_slot(self) -> _Slot:
        unused = [s for s in self.slots if s.key is None and s is not self.active]
        if unused:
            return unused[0]
        victim = min(self.slots, key=lambda s: s.used)
        log.info("state cache: evicting %s (least recently used)", victim.key)
        victim.ctx.kv_cache_clear()
        victim.n_tokens, victim.requires_eval, victim.key = 0, True, None
        return victim

    # -- disk ---------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        assert self.state_dir is not None
        # The fingerprint is part of the name: models sharing a folder never collide.
        name = hashlib.sha256(f"{self.fingerprint}|{key}".encode()).hexdigest()[:32]
        return self.state_dir / f"{name}.state"

    def save_all(self) -> int:
        """Write every held conversation's state to ``state_dir``; return how many."""
        if self.state_dir is None:
            return 0
        self._park()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        saved = 0
        for slot in self.slots:
            if slot.key is None or slot.n_tokens == 0:
                continue
            try:
                self._write(slot)
                saved += 1
            except OSError as exc:
                log.warning("could not save the state of %s: %s", slot.key, exc)
        prune_states(self.state_dir, self.max_disk_bytes)
        return saved

    def _write(self, slot: _Slot) -> None:
        import llama_cpp

        ctx = slot.ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0)
        state = bytes(buffer)[:written]
        tokens = np.asarray(slot.input_ids[: slot.n_tokens], dtype="<i4").tobytes()
        header = json.dumps(
            {
                "fingerprint": self.fingerprint,
                "key": slot.key,
                "n_tokens": slot.n_tokens,
                "crc": zlib.crc32(state, zlib.crc32(tokens)),
            }
        ).encode()
        assert slot.key is not None
        path = self._path(slot.key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            out.write(MAGIC + struct.pack("<I", len(header)) + header + tokens + state)
        os.replace(tmp, path)

    def _read(self, key: str) -> tuple[list[int], Any] | None:
        """The saved tokens and state of ``key`` if the file is sound and ours, else None.

        The state (hundreds of MB for a long channel) is read straight into the buffer handed
        to llama.cpp: no intermediate copies on the way to a restored conversation.
        """
        path = self._path(key)
        try:
            with open(path, "rb") as src:
                size = os.fstat(src.fileno()).st_size
                if src.read(len(MAGIC)) != MAGIC:
                    raise ValueError("not a state file")
                (length,) = struct.unpack("<I", src.read(4))
                header = json.loads(src.read(length))
                if header.get("fingerprint") != self.fingerprint or header.get("key") != key:
                    log.info("state file for %s is from another model or settings: ignored", key)
                    return None
                n = int(header["n_tokens"])
                if not 0 < n <= len(self.llm.input_ids):
                    raise ValueError("token count out of range")
                tokens = src.read(4 * n)
                state_size = size - len(MAGIC) - 4 - length - 4 * n
                if len(tokens) != 4 * n or state_size <= 0:
                    raise ValueError("truncated")
                state = (ctypes.c_uint8 * state_size)()
                if src.readinto(state) != state_size:
                    raise ValueError("truncated")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("state file %s unreadable: %s", path, exc)
            return None
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            log.warning("state file %s is corrupt (%s): ignored", path, exc)
            return None
        if zlib.crc32(memoryview(state), zlib.crc32(tokens)) != header["crc"]:
            log.warning("state file %s is corrupt (checksum mismatch): ignored", path)
            return None
        return np.frombuffer(tokens, dtype="<i4").astype(int).tolist(), state

    def _restore(self, slot: _Slot, key: str, prompt: Sequence[int]) -> bool:
        import llama_cpp

        found = self._read(key)
        if found is None:
            return False
        tokens, state = found
        if common_prefix(tokens, prompt) < MIN_USEFUL_PREFIX:
            log.info("state file for %s no longer matches the conversation: ignored", key)
            return False
        slot.ctx.kv_cache_clear()
        if llama_cpp.llama_state_seq_set_data(slot.ctx.ctx, state, len(state), 0) == 0:
            log.warning("llama.cpp refused the saved state of %s: ignored", key)
            slot.ctx.kv_cache_clear()
            return False
        slot.input_ids[: len(tokens)] = tokens
        slot.n_tokens, slot.requires_eval = len(tokens), True
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
