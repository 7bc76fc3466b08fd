"""What the answer pipeline says when it cannot answer, and its small helpers."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from ai_model.base import ModelError

APOLOGY = (
    "Sorry, something went wrong while I was writing the reply. Your message is saved; "
    "please try again in a moment."
)
NO_REPLY = "(no reply — try rephrasing)"
NOT_STORED = (
    "Sorry, I could not save your message because of a storage problem on my side. "
    "Please send it again in a moment."
)
SLOW_STORAGE = (
    "Saving messages is slow on my side right now. Yours is not lost: I will answer as soon "
    "as I can."
)
SLOW_STORAGE_S = 2.0  # storing a message for longer than this gets the sender a notice
RESTARTING = (
    "I am restarting right now and could not take your message. Please send it again in a minute."
)


def trace_wanted(exc: BaseException) -> bool:
    """Whether a failure deserves a traceback in the log: not for the expected kinds."""
    return not isinstance(exc, ModelError | SQLAlchemyError | OSError)


class Once:
    """Calls ``callback`` (if any) the first time it is called."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[], None] | None) -> None:
        self._callback = callback

    def __call__(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()
