"""Evaluated conversation states kept off the context: a bounded RAM tier, then files on disk.

A state is what ``llama_state_seq_get_data`` returns for one sequence, together with the token
ids it evaluated.  The batched scheduler parks a conversation here when its sequence is needed
by another one, and every holder writes what it keeps to ``state_dir`` at shutdown, so that a
restart restores conversations instead of recomputing them.  A file is only trusted when it was
written for the same model file and load settings (the fingerprint), names the same
conversation and passes its checksum; anything else is ignored with one log line.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import mmap
import os
import struct
import zlib
from collections import OrderedDict
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


@dataclass(frozen=True, slots=True)
class SavedState:
    """One conversation's evaluated tokens and llama.cpp's sequence state for them."""

    tokens: tuple[int, ...]
    data: Any  # a ctypes uint8 array, handed to llama_state_seq_set_data as it is

    @property
    def nbytes(self) -> int:
        return len(self.data)


def state_buffer(size: int) -> Any:
    """A writable ctypes byte array of ``size`` bytes for a state, its memory mapped at once.

    A state runs to hundreds of MB.  A plain ctypes array zero-fills it, faulting its pages in
    one at a time (about 0.1 s for 138 MB on 2 cores); an anonymous mapping populated in one
    call takes half of that, and its pages come zeroed from the kernel.  Freed (unmapped) with
    the array.
    """
    populate = getattr(mmap, "MAP_POPULATE", 0)  # Linux; elsewhere the pages fault in on use
    anonymous = getattr(mmap, "MAP_ANONYMOUS", None)
    if anonymous is None or size <= 0:  # Windows has no flags argument
        return (ctypes.c_uint8 * size)()
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | anonymous | populate)
    return (ctypes.c_uint8 * size).from_buffer(area)  # the array keeps ``area`` alive


def read_sequence(ctx: Any, seq_id: int, tokens: Sequence[int]) -> SavedState:
    """Copy sequence ``seq_id`` of the llama.cpp context ``ctx`` out of it."""
    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buffer = state_buffer(size)
    written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, seq_id)
    if written != size:
        buffer = (ctypes.c_uint8 * written).from_buffer_copy(buffer, 0)
    return SavedState(tuple(tokens), buffer)


def write_sequence(ctx: Any, seq_id: int, state: SavedState) -> bool:
    """Load ``state`` into sequence ``seq_id`` (emptied first); False if llama.cpp refused it."""
    import llama_cpp

    return bool(llama_cpp.llama_state_seq_set_data(ctx, state.data, state.nbytes, seq_id))


class StateFiles:
    """Saved states in one folder, named by a hash of the model fingerprint and the key."""

    def __init__(self, folder: Path, fingerprint: str, max_bytes: int) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path:
        # The fingerprint is part of the name: models sharing a folder never collide.
        name = hashlib.sha256(f"{self.fingerprint}|{key}".encode()).hexdigest()[:32]
        return self.folder / f"{name}.state"

    def write(self, key: str, state: SavedState) -> bool:
        """Write ``state`` atomically; False (logged) if the disk refused."""
        tokens = np.asarray(state.tokens, dtype="<i4").tobytes()
        header = json.dumps(
            {
                "fingerprint": self.fingerprint,
                "key": key,
                "n_tokens": len(state.tokens),
                "crc": zlib.crc32(memoryview(state.data), zlib.crc32(tokens)),
            }
        ).encode()
        path = self.path(key)
        tmp = path.with_suffix(".tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                out.write(MAGIC + struct.pack("<I", len(header)) + header + tokens)
                out.write(memoryview(state.data))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not save the state of %s: %s", key, exc)
            return False
        return True

    def read(self, key: str, max_tokens: int) -> SavedState | None:
        """The saved state of ``key`` if the file is sound and ours, else None.

        The state (hundreds of MB for a long channel) is read straight into the buffer handed
        to llama.cpp: no intermediate copies on the way to a restored conversation.
        """
        path = self.path(key)
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
                if not 0 < n <= max_tokens:
                    raise ValueError("token count out of range")
                tokens = src.read(4 * n)
                state_size = size - len(MAGIC) - 4 - length - 4 * n
                if len(tokens) != 4 * n or state_size <= 0:
                    raise ValueError("truncated")
                data = state_buffer(state_size)
                if src.readinto(data) != state_size:
                    raise ValueError("truncated")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("state file %s unreadable: %s", path, exc)
            return None
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            log.warning("state file %s is corrupt (%s): ignored", path, exc)
            return None
        if zlib.crc32(memoryview(data), zlib.crc32(tokens)) != header["crc"]:
            log.warning("state file %s is corrupt (checksum mismatch): ignored", path)
            return None
        ids = tuple(np.frombuffer(tokens, dtype="<i4").astype(int).tolist())
        return SavedState(ids, data)

    def prune(self) -> list[Path]:
        """Delete the least recently written files until the folder fits its budget."""
        return prune_states(self.folder, self.max_bytes)


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


class Parking:
    """Parked states: the most recent in RAM up to ``ram_bytes``, older ones spilled to disk.

    Used from the scheduler thread only.
    """

    def __init__(self, ram_bytes: int, files: StateFiles | None, max_tokens: int) -> None:
        self.ram_bytes = ram_bytes
        self.files = files
        self.max_tokens = max_tokens
        self._ram: OrderedDict[str, SavedState] = OrderedDict()
        self._used = 0

    @property
    def ram_used(self) -> int:
        return self._used

    def put(self, key: str, state: SavedState) -> None:
        self.discard(key)
        self._ram[key] = state
        self._used += state.nbytes
        while self._used > self.ram_bytes and self._ram:
            old_key, old = self._ram.popitem(last=False)
            self._used -= old.nbytes
            if self.files is not None and self.files.write(old_key, old):
                log.info("parked state of %s moved to disk (RAM tier full)", old_key)

    def take(self, key: str) -> tuple[SavedState, str] | None:
        """Remove and return the parked state of ``key`` and its tier ("ram" or "disk")."""
        state = self._ram.pop(key, None)
        if state is not None:
            self._used -= state.nbytes
            return state, "ram"
        if self.files is None:
            return None
        found = self.files.read(key, self.max_tokens)
        return (found, "disk") if found is not None else None

    def discard(self, key: str) -> None:
        old = self._ram.pop(key, None)
        if old is not None:
            self._used -= old.nbytes

    def flush(self) -> int:
        """Write every RAM-parked state to disk (at shutdown); return how many."""
        written = 0
        if self.files is not None:
            for key, state in self._ram.items():
                written += self.files.write(key, state)
        self._ram.clear()
        self._used = 0
        return written
