"""Lorebooks (``character_book`` and channel world books): entries activated by keywords."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

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

    def _matches(self, key: str, text: str) -> bool:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        if self.use_regex:
            try:
                return re.search(key, text, flags) is not None
            except re.error:
                log.warning("lorebook entry %r has an invalid regex key %r", self.name, key)
                return False
        if self.case_sensitive:
            return key in text
        return key.lower() in text.lower()

    def active(self, text: str) -> bool:
        if not self.enabled:
            return False
        if self.constant:
            return True
        if not any(k and self._matches(k, text) for k in self.keys):
            return False
        if self.selective and self.secondary_keys:
            return any(k and self._matches(k, text) for k in self.secondary_keys)
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


@dataclass(frozen=True, slots=True)
class Activation:
    before: tuple[str, ...]
    after: tuple[str, ...]
    dropped: tuple[str, ...]


def activate(
    books: Sequence[Lorebook],
    recent: Sequence[str],
    count_tokens: Callable[[str], int],
    default_budget: int,
) -> Activation:
    """Entries whose keys appear in the last ``scan_depth`` messages, within the token budget.

    Kept entries are ordered by insertion order; when they exceed the budget the lowest
    ``priority`` entries are dropped first.
    """
    chosen: list[LoreEntry] = []
    budget = default_budget
    for book in books:
        scanned = "\n".join(recent[-book.scan_depth :])
        chosen.extend(e for e in book.entries if e.active(scanned))
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
