"""Fair shares between users: per-user rate limits, and maps that cannot grow without bound.

A flood of new users or conversations must not grow memory forever, and no user may take more
than a fair part of the model's time.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

MAX_TRACKED_USERS = 10_000
RATE_WINDOW_S = 60.0


class LruDict(Generic[K, V]):
    """A dict that forgets its least recently used entries past ``capacity``.

    ``keep`` says which entries must not be forgotten yet (say, a conversation with a reply in
    flight); those are skipped, so the map may briefly hold more than ``capacity``.
    """

    def __init__(self, capacity: int, keep: Callable[[V], bool] = lambda _v: False) -> None:
        self.capacity = capacity
        self.keep = keep
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def __setitem__(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self.capacity:
            self._shrink()

    def pop(self, key: K) -> V | None:
        return self._data.pop(key, None)

    def _shrink(self) -> None:
        excess = len(self._data) - self.capacity
        for key in [k for k, v in self._data.items() if not self.keep(v)][:excess]:
            del self._data[key]

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)


class Verdict(enum.Enum):
    """What to do with a user's message under the rate limit."""

    ALLOW = "allow"
    NOTICE = "notice"  # over the limit: tell the user once
    DROP = "drop"  # still over the limit, already told: ignore quietly


@dataclass(slots=True)
class _UserWindow:
    times: deque[float] = field(default_factory=deque)
    told: bool = False


class RateLimiter:
    """At most ``per_minute`` messages per user in any sliding minute (0: unlimited)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._users: LruDict[str, _UserWindow] = LruDict(MAX_TRACKED_USERS)

    def check(self, user: str) -> Verdict:
        if self.per_minute <= 0:
            return Verdict.ALLOW
        now = self.clock()
        window = self._users.get(user)
        if window is None:
            window = _UserWindow()
            self._users[user] = window
        while window.times and now - window.times[0] >= RATE_WINDOW_S:
            window.times.popleft()
        if len(window.times) < self.per_minute:
            window.times.append(now)
            window.told = False
            return Verdict.ALLOW
        if window.told:
            return Verdict.DROP
        window.told = True
        return Verdict.NOTICE

    def __len__(self) -> int:
        return len(self._users)
