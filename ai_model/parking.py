"""Evaluated conversation states kept off the context: a bounded RAM tier, then files on disk.

A state is what ``llama_state_seq_get_data`` returns for one sequence, together with the token
ids it evaluated.  The batched scheduler parks a conversation here when its sequence is needed
by another one, and every holder writes what it keeps to ``state_dir`` at shutdown, so that a
restart restores conversations instead of recomputing them.  A file is only trusted when it was
written for the same model file and load settings (the fingerprint), names the same
conversation and passes its checksum; anything else is ignored with one log line.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

log = logging.getLogger(__name__)

MAGIC = b"LBSTATE2"  # LBSTATE1 files (CRC-32) are ignored: they would be restored, not trusted
OLD_MAGIC = b"LBSTATE1"
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
    """One conversation's evaluated tokens and llama.cpp's sequence state for them.

    A state read from disk is checked while it is loaded: ``verified`` then resolves to
    whether its checksum matched, and whoever loads it waits for that before trusting it.
    """

    tokens: tuple[int, ...]
    data: Any  # a ctypes uint8 array, handed to llama_state_seq_set_data as it is
    verified: Future[bool] | None = None

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def sound(self) -> bool:
        """Whether the state passed its check (True for one that never left memory)."""
        if self.verified is None:
            return True
        try:
            return self.verified.result()
        except Exception:  # a checker that failed vouches for nothing
            log.exception("could not check a saved state")
            return False


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
    """Load ``state`` into sequence ``seq_id`` (emptied first); False if llama.cpp refused it
    or its checksum, computed meanwhile, did not match (the caller then clears the sequence)."""
    import llama_cpp

    loaded = bool(llama_cpp.llama_state_seq_set_data(ctx, state.data, state.nbytes, seq_id))
    if not state.sound():
        log.warning("a saved state is corrupt (checksum mismatch): not used")
        return False
    return loaded


def _mapped(src: Any, size: int, offset: int) -> Any:
    """The bytes of open file ``src`` from ``offset`` to ``size`` as a ctypes array, mapped
    rather than read: llama.cpp copies the state straight from the page cache into the KV
    cells, with no buffer to allocate and fill first.  A private mapping: nothing written
    through it reaches the file.  None where the system has no such mapping (Windows)."""
    private = getattr(mmap, "MAP_PRIVATE", None)
    if private is None or size <= offset:
        return None
    flags = private | getattr(mmap, "MAP_POPULATE", 0)
    area = mmap.mmap(src.fileno(), size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return (ctypes.c_uint8 * (size - offset)).from_buffer(area, offset)  # keeps ``area`` alive


def checksum(tokens: bytes, data: Any) -> int:
    """XXH3 of a state's tokens and bytes: a fifth of CRC-32's time over a 138 MB state, which
    a restart's first token would otherwise wait for."""
    digest = xxhash.xxh3_64(tokens)
    digest.update(memoryview(data))
    return int(digest.intdigest())


def _checksum_matches(tokens: bytes, data: Any, expected: int) -> bool:
    return checksum(tokens, data) == expected


class StateFiles:
    """Saved states of one model in a folder, kept within ``max_bytes`` at all times.

    Each file is named by the model's fingerprint and the key's hash: models (roles) sharing a
    folder never read, nor prune, each other's.  A file is removed once it has been read (its
    state then lives in a sequence again, and is written anew when it leaves it), and the least
    recently written go first whenever a write passes the budget.  Writes may come from a
    spill thread while the scheduler reads: the index is guarded by a lock.
    """

    def __init__(self, folder: Path, fingerprint: str, max_bytes: int) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.prefix = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
        self._lock = threading.Lock()
        self._index: OrderedDict[Path, int] | None = None  # this model's files, oldest first
        self._checker: ThreadPoolExecutor | None = None  # checksums of states being restored

    def path(self, key: str) -> Path:
        name = hashlib.sha256(f"{self.fingerprint}|{key}".encode()).hexdigest()[:32]
        return self.folder / f"{self.prefix}-{name}.state"

    @property
    def used(self) -> int:
        """Bytes this model's files take on disk."""
        with self._lock:
            return sum(self._own().values())

    def _own(self) -> OrderedDict[Path, int]:
        if self._index is None:  # once, from what an earlier run left
            found = []
            try:
                for path in self.folder.glob(f"{self.prefix}-*.state"):
                    stat = path.stat()
                    found.append((stat.st_mtime_ns, path, stat.st_size))
            except OSError as exc:
                log.warning("could not list saved states in %s: %s", self.folder, exc)
            self._index = OrderedDict((path, size) for _t, path, size in sorted(found))
        return self._index

    def write(self, key: str, state: SavedState) -> bool:
        """Write ``state`` atomically within the budget; False (logged) if it cannot be."""
        tokens = np.asarray(state.tokens, dtype="<i4").tobytes()
        header = json.dumps(
            {
                "fingerprint": self.fingerprint,
                "key": key,
                "n_tokens": len(state.tokens),
                "xxh3": checksum(tokens, state.data),
            }
        ).encode()
        size = len(MAGIC) + 4 + len(header) + len(tokens) + state.nbytes
        if size > self.max_bytes:
            log.info("the state of %s (%d MB) is over the disk budget: not saved", key, size >> 20)
            self.remove(key)
            return False
        path = self.path(key)
        with self._lock:  # room first, so that the folder never holds more than its budget
            own = self._own()
            own.pop(path, None)
            self._fit(own, self.max_bytes - size)
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                out.write(MAGIC + struct.pack("<I", len(header)) + header + tokens)
                out.write(memoryview(state.data))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not save the state of %s: %s", key, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        with self._lock:
            own = self._own()
            own[path] = size
            own.move_to_end(path)
            self._fit(own, self.max_bytes)
        return True

    def _fit(self, own: OrderedDict[Path, int], room: int) -> None:
        removed = 0
        while own and sum(own.values()) > room:
            path, _size = own.popitem(last=False)
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove the saved state %s: %s", path, exc)
        if removed:
            log.info("saved states: removed %d old file(s) to stay under the disk budget", removed)

    def remove(self, key: str) -> None:
        """Forget the saved state of ``key``, if any."""
        path = self.path(key)
        with self._lock:
            self._own().pop(path, None)
        with contextlib.suppress(OSError):
            path.unlink()

    def read(self, key: str, max_tokens: int) -> SavedState | None:
        """The saved state of ``key`` if the file is sound and ours, else None; the file is
        removed either way (a sound state is in a sequence again; an unsound one is useless).

        The state (hundreds of MB for a long channel) is mapped, not copied, and its checksum
        is computed on another thread while llama.cpp loads it (:attr:`SavedState.verified`):
        a restart's first token waits for neither a copy nor a separate pass over the file.
        """
        path = self.path(key)
        try:
            with open(path, "rb") as src:
                size = os.fstat(src.fileno()).st_size
                magic = src.read(len(MAGIC))
                if magic == OLD_MAGIC:
                    log.info("state file for %s is of an older format: ignored", key)
                    self.remove(key)
                    return None
                if magic != MAGIC:
                    raise ValueError("not a state file")
                (length,) = struct.unpack("<I", src.read(4))
                header = json.loads(src.read(length))
                if header.get("fingerprint") != self.fingerprint or header.get("key") != key:
                    log.info("state file for %s is from another model or settings: ignored", key)
                    return None
                n = int(header["n_tokens"])
                expected = int(header["xxh3"])
                if not 0 < n <= max_tokens:
                    raise ValueError("token count out of range")
                tokens = src.read(4 * n)
                offset = len(MAGIC) + 4 + length + 4 * n
                state_size = size - offset
                if len(tokens) != 4 * n or state_size <= 0:
                    raise ValueError("truncated")
                data = _mapped(src, size, offset)
                if data is None:
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
            self.remove(key)
            return None
        self.remove(key)  # a mapping outlives the file's name
        if self._checker is None:
            self._checker = ThreadPoolExecutor(1, thread_name_prefix="state-check")
        verified = self._checker.submit(_checksum_matches, tokens, data, expected)
        ids = tuple(np.frombuffer(tokens, dtype="<i4").astype(int).tolist())
        return SavedState(ids, data, verified)

    def prune(self) -> None:
        """Bring this model's files within the budget (after ``max_bytes`` was lowered)."""
        with self._lock:
            self._fit(self._own(), self.max_bytes)


class Parking:
    """Parked states: the most recent in RAM up to ``ram_bytes``, older ones spilled to disk.

    Called from the scheduler thread only; spills are written by a thread of their own, so a
    step never waits for the disk.  A state being written is still served from memory.
    """

    def __init__(self, ram_bytes: int, files: StateFiles | None, max_tokens: int) -> None:
        self.ram_bytes = ram_bytes
        self.files = files
        self.max_tokens = max_tokens
        self._ram: OrderedDict[str, SavedState] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._spilling: dict[str, SavedState] = {}  # handed to the writer, not yet on disk
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="state-spill") if files else None

    @property
    def ram_used(self) -> int:
        return self._used

    @property
    def count(self) -> int:
        """States parked in RAM, or being written to disk."""
        return len(self._ram) + len(self._spilling)

    def put(self, key: str, state: SavedState) -> None:
        self.discard(key)
        self._ram[key] = state
        self._used += state.nbytes
        while self._used > self.ram_bytes and self._ram:
            old_key, old = self._ram.popitem(last=False)
            self._used -= old.nbytes
            if self._writer is not None:
                with self._lock:
                    self._spilling[old_key] = old
                self._writer.submit(self._spill, old_key, old)

    def _spill(self, key: str, state: SavedState) -> None:
        assert self.files is not None
        written = self.files.write(key, state)
        with self._lock:
            if self._spilling.get(key) is state:
                del self._spilling[key]
                if written:
                    log.info("parked state of %s moved to disk (RAM tier full)", key)
                return
            newer = key in self._spilling
        if not newer:  # taken or replaced while it was written: the file is stale
            self.files.remove(key)

    def take(self, key: str) -> tuple[SavedState, str] | None:
        """Remove and return the parked state of ``key`` and its tier ("ram" or "disk")."""
        state = self._ram.pop(key, None)
        if state is not None:
            self._used -= state.nbytes
            return state, "ram"
        with self._lock:
            state = self._spilling.pop(key, None)
        if state is not None:
            return state, "ram"
        if self.files is None:
            return None
        found = self.files.read(key, self.max_tokens)
        return (found, "disk") if found is not None else None

    def discard(self, key: str) -> None:
        old = self._ram.pop(key, None)
        if old is not None:
            self._used -= old.nbytes
        with self._lock:
            self._spilling.pop(key, None)

    def flush(self) -> int:
        """Finish the spills, then write every RAM-parked state to disk (at shutdown); return
        how many were written now."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        written = 0
        if self.files is not None:
            for key, state in self._ram.items():
                written += self.files.write(key, state)
        self._ram.clear()
        self._used = 0
        return written
