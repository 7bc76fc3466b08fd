"""Replies announced before their prompts arrive, so that prompts sent together start together.

The engine announces a reply (:meth:`ai_model.base.ChatModel.upcoming`) as it begins to build
its prompt, which takes it 5-20 ms (storing, history, tokenizing).  Four messages that arrive at
once reach the scheduler 10-40 ms apart: without a word of warning the first prompt is
evaluated alone and the other three wait for that step to end, then go in one step together.
An idle scheduler instead holds its first step for the prompts announced to follow, for at
most ``wait_s`` after each announcement, and evaluates them in one decode, as vLLM's scheduler
delay does.  It never holds a step while a reply is generating: a prompt arriving then joins
the next step, one token's time later.  It is off unless ``batch_wait_ms`` is set: on a CPU
the prompts' compute adds up the same either way, and holding only delays the first one.
"""

from __future__ import annotations


class Upcoming:
    """The announced replies not yet submitted, each with the time it stops being waited for.

    Not thread-safe on its own: the scheduler calls it under its lock.
    """

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self._due: dict[str, float] = {}  # conversation -> waited for until (monotonic)

    def announce(self, key: str | None, now: float) -> None:
        """A reply for conversation ``key`` will be submitted shortly."""
        if key is not None and self.wait_s > 0:
            self._due[key] = now + self.wait_s

    def arrived(self, key: str | None) -> None:
        """A request of ``key`` was submitted: it is no longer waited for."""
        if key is not None:
            self._due.pop(key, None)

    def until(self, now: float) -> float | None:
        """Until when a step may wait (the latest time an announced prompt is due by), or None
        when none is left to wait for.  Announcements past their time are forgotten: a prompt
        that failed to build (too long, a storage error) is never sent."""
        for key in [k for k, due in self._due.items() if due <= now]:
            del self._due[key]
        return max(self._due.values()) if self._due else None
