"""Bounds on what one input may cost, and the text hygiene applied at the adapter boundary.

Every limit a user can run into is a named constant here (or a setting), so that refusals can
say what was too big and tests can aim just past each bound.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# -- incoming text ------------------------------------------------------------------------------
MAX_AUTHOR_NAME_CHARS = 128  # display names are stored (and echoed) at most this long
MAX_ECHO_CHARS = 60  # user input quoted back in a refusal is shortened to this

# -- character cards ----------------------------------------------------------------------------
MAX_CARD_BYTES = 16 * 1024 * 1024  # a card file (a PNG may carry an illustration)
MAX_CARD_JSON_BYTES = 2 * 1024 * 1024  # the card JSON itself, after any decompression
MAX_ZIP_MEMBERS = 256  # a CHARX may hold assets, but not thousands of entries
MAX_NAME_CHARS = 100  # a character's or a world book's name
MAX_FIELD_CHARS = 32_000  # any one text field of a card (description, scenario, ...)
MAX_GREETINGS = 64  # alternate + group-only greetings
MAX_LORE_ENTRIES = 1_000
MAX_LORE_CONTENT_CHARS = 16_000
MAX_LORE_KEYS = 64  # keys (and secondary keys) per lorebook entry
MAX_LORE_KEY_CHARS = 256
# A lorebook regex key gets this long per message before it counts as not matching; a key that
# ever runs out of time is switched off, so a catastrophic pattern costs one message this much.
LORE_REGEX_TIMEOUT_S = 0.02
# The pinned part of a character (system prompt, story, post-history instructions) may use at
# most this share of the window: the rest is for the conversation itself.
MAX_PINNED_SHARE = 0.5

_INVALID = re.compile("[\ud800-\udfff\x00]")


def clean_text(text: str) -> str:
    """``text`` with code points that cannot be stored or encoded replaced by U+FFFD.

    Those are lone surrogates (not encodable as UTF-8) and NUL (refused in PostgreSQL text and
    by many C APIs).  Everything else is kept as the platform gave it.
    """
    return _INVALID.sub("\ufffd", text)


def clean_json(value: Any) -> Any:
    """A parsed JSON value with every string (keys included) passed through :func:`clean_text`.

    JSON escapes such as ``"\\ud800"`` decode to lone surrogates, so a card can carry them too.
    """
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    if isinstance(value, Mapping):
        return {clean_text(str(k)): clean_json(v) for k, v in value.items()}
    return value


def shorten(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` on one line and at most ``limit`` characters (with an ellipsis when cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def fit(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters: the last guard before a platform call."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
