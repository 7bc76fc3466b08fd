"""Lorebooks (``character_book`` and channel world books): entries activated by keywords."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import regex

from chat.limits import (
    LORE_REGEX_TIMEOUT_S,
    MAX_LORE_CONTENT_CHARS,
    MAX_LORE_ENTRIES,
    MAX_LORE_KEY_CHARS,
    MAX_LORE_KEYS,
    shorten,
)

log = logging.getLogger(__name__)

MAX_SCAN_CHARS = 8_000  # of each scanned message, its last characters: keys are about now
# Texts a regex key is tried on at import: the shapes that make backtracking patterns explode.
_PROBES = ("a" * 3000 + "!", "ab" * 1500 + "!", " " * 3000 + "!", "0" * 3000 + "x", "\n" * 3000)
_PROBE_TIMEOUT_S = 0.05
# Regex keys that ran out of time once; they count as never matching from then on.
_timed_out: set[tuple[str, int]] = set()


class LoreError(ValueError):
    """A lorebook breaks a limit or holds an unusable key; the message names the entry."""


@functools.lru_cache(maxsize=4096)
def _compiled(key: str, flags: int) -> regex.Pattern[str]:
    return regex.compile(key, flags)


def regex_search(key: str, text: str, ignore_case: bool) -> bool:
    """Whether regex ``key`` matches ``text``, giving up (as no match) after the time limit."""
    flags = regex.IGNORECASE if ignore_case else 0
    if (key, flags) in _timed_out:
        return False
    try:
        pattern = _compiled(key, flags)
    except (regex.error, RecursionError, OverflowError):
        log.warning("lorebook: invalid regex key %r ignored", shorten(key))
        _timed_out.add((key, flags))
        return False
    try:
        return pattern.search(text, timeout=LORE_REGEX_TIMEOUT_S) is not None
    except TimeoutError:
        log.warning("lorebook: regex key %r took too long and is switched off", shorten(key))
        _timed_out.add((key, flags))
        return False


DEFAULT_SCAN_DEPTH = 2
_DECORATOR = re.compile(r"^@@\S+.*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class LoreEntry:
    keys: tuple[str, ...]
    content: str
    insertion_order: int = 100
    enabled: bool = True
    case_sensitive: bool = False
    constant: bool = False
    selective: bool = False
    secondary_keys: tuple[str, ...] = ()
    priority: int = 10
    position: str = "before_char"
    use_regex: bool = False
    name: str = ""

    def _matches(self, key: str, text: str, lowered: str) -> bool:
        if self.use_regex:
            return regex_search(key, text, not self.case_sensitive)
        if self.case_sensitive:
            return key in text
        return key.lower() in lowered

    def active(self, text: str, lowered: str | None = None) -> bool:
        """Whether the entry applies to ``text`` (``lowered``: its lower case, if at hand)."""
        if not self.enabled:
            return False
        if self.constant:
            return True
        low = text.lower() if lowered is None else lowered
        if not any(k and self._matches(k, text, low) for k in self.keys):
            return False
        if self.selective and self.secondary_keys:
            return any(k and self._matches(k, text, low) for k in self.secondary_keys)
        return True

    @property
    def text(self) -> str:
        """The content without V3 ``@@decorator`` lines."""
        return _DECORATOR.sub("", self.content).strip()


def _keys(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(k.strip() for k in value.split(",") if k.strip())
    if isinstance(value, list):
        return tuple(str(k) for k in value if str(k).strip())
    return ()


@dataclass(frozen=True, slots=True)
class Lorebook:
    entries: tuple[LoreEntry, ...]
    scan_depth: int = DEFAULT_SCAN_DEPTH
    token_budget: int | None = None
    name: str = ""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Lorebook:
        entries = []
        raw_entries = data.get("entries", [])
        if isinstance(raw_entries, Mapping):  # some exporters key entries by id
            raw_entries = list(raw_entries.values())
        for i, raw in enumerate(raw_entries if isinstance(raw_entries, list) else []):
            if not isinstance(raw, Mapping) or not isinstance(raw.get("content"), str):
                continue
            ext = raw.get("extensions") if isinstance(raw.get("extensions"), Mapping) else {}
            entries.append(
                LoreEntry(
                    keys=_keys(raw.get("keys", raw.get("key"))),
                    content=raw["content"],
                    insertion_order=int(raw.get("insertion_order", i) or 0),
                    enabled=bool(raw.get("enabled", True)),
                    case_sensitive=bool(raw.get("case_sensitive") or False),
                    constant=bool(raw.get("constant") or False),
                    selective=bool(raw.get("selective") or False),
                    secondary_keys=_keys(raw.get("secondary_keys")),
                    priority=int(raw.get("priority", 10) or 0),
                    position=str(raw.get("position") or "before_char"),
                    use_regex=bool(raw.get("use_regex") or (ext or {}).get("use_regex")),
                    name=str(raw.get("name") or raw.get("comment") or ""),
                )
            )
        scan = data.get("scan_depth")
        budget = data.get("token_budget")
        return cls(
            entries=tuple(entries),
            scan_depth=int(scan) if isinstance(scan, int) and scan > 0 else DEFAULT_SCAN_DEPTH,
            token_budget=int(budget) if isinstance(budget, int) and budget > 0 else None,
            name=str(data.get("name") or ""),
        )


def check_book(data: Mapping[str, Any], where: str = "lorebook") -> None:
    """Refuse a lorebook (raise :class:`LoreError`) that breaks a limit or has a bad regex key.

    Regex keys must compile and must not explode on the usual catastrophic-backtracking shapes;
    at run time every regex key still runs under a time limit.
    """
    raw_entries = data.get("entries", [])
    if isinstance(raw_entries, Mapping):
        raw_entries = list(raw_entries.values())
    if not isinstance(raw_entries, list):
        return
    if len(raw_entries) > MAX_LORE_ENTRIES:
        raise LoreError(f"{where} has {len(raw_entries)} entries (at most {MAX_LORE_ENTRIES})")
    book = Lorebook.from_json(data)
    for i, entry in enumerate(book.entries):
        label = f"{where} entry {shorten(entry.name, 40) or i + 1}"
        if len(entry.content) > MAX_LORE_CONTENT_CHARS:
            raise LoreError(
                f"{label}: the content has {len(entry.content)} characters "
                f"(at most {MAX_LORE_CONTENT_CHARS})"
            )
        for keys in (entry.keys, entry.secondary_keys):
            if len(keys) > MAX_LORE_KEYS:
                raise LoreError(f"{label} has {len(keys)} keys (at most {MAX_LORE_KEYS})")
            for key in keys:
                if len(key) > MAX_LORE_KEY_CHARS:
                    raise LoreError(
                        f"{label}: a key is longer than {MAX_LORE_KEY_CHARS} characters"
                    )
                if entry.use_regex:
                    _check_regex(key, label, not entry.case_sensitive)


def _check_regex(key: str, label: str, ignore_case: bool) -> None:
    try:
        pattern = _compiled(key, regex.IGNORECASE if ignore_case else 0)
    except (regex.error, RecursionError, OverflowError) as exc:
        raise LoreError(f"{label}: the regex key {shorten(key)!r} is invalid ({exc})") from exc
    for probe in _PROBES:
        try:
            pattern.search(probe, timeout=_PROBE_TIMEOUT_S)
        except TimeoutError:
            raise LoreError(
                f"{label}: the regex key {shorten(key)!r} is too slow "
                "(catastrophic backtracking); simplify it"
            ) from None


def match_entries(books: Sequence[Lorebook], recent: Sequence[str]) -> list[LoreEntry]:
    """The entries whose keys appear in each book's last ``scan_depth`` messages.

    Pure Python that may run user-supplied regexes (each under a time limit): call it off the
    event loop.
    """
    chosen: list[LoreEntry] = []
    for book in books:
        scanned = "\n".join(m[-MAX_SCAN_CHARS:] for m in recent[-book.scan_depth :])
        lowered = scanned.lower()
        chosen.extend(e for e in book.entries if e.active(scanned, lowered))
    return chosen


@dataclass(frozen=True, slots=True)
class Activation:
    before: tuple[str, ...]
    after: tuple[str, ...]
    dropped: tuple[str, ...]


def activate(
    books: Sequence[Lorebook],
    chosen: Sequence[LoreEntry],
    count_tokens: Callable[[str], int],
    default_budget: int,
) -> Activation:
    """The ``chosen`` entries (from :func:`match_entries`) that fit the token budget.

    Kept entries are ordered by insertion order; when they exceed the budget the lowest
    ``priority`` entries are dropped first.
    """
    budget = default_budget
    for book in books:
        if book.token_budget:
            budget = min(budget, book.token_budget)
    costs = {id(e): count_tokens(e.text) for e in chosen}
    dropped: list[str] = []
    # Highest priority first, earlier insertion first among equals: keep while it fits.
    by_priority = sorted(chosen, key=lambda e: (-e.priority, e.insertion_order))
    kept: list[LoreEntry] = []
    used = 0
    for entry in by_priority:
        if used + costs[id(entry)] <= budget:
            kept.append(entry)
            used += costs[id(entry)]
        else:
            dropped.append(entry.name or (entry.keys[0] if entry.keys else "?"))
    kept.sort(key=lambda e: e.insertion_order)
    return Activation(
        before=tuple(e.text for e in kept if e.position != "after_char"),
        after=tuple(e.text for e in kept if e.position == "after_char"),
        dropped=tuple(dropped),
    )
