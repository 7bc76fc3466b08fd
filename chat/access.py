"""Who may use the bot: allow- and block-lists of users, Discord roles, channels and guilds.

Without lists, everyone may (the default).  Owners always may.  A block entry beats any allow
entry.  Allow-lists of one kind narrow that kind only: with ``allow_users`` or
``allow_roles``, a user must be listed or hold a listed role; with ``allow_channels``, a
group conversation must be listed; with ``allow_guilds``, a Discord channel must belong to a
listed guild.  DMs pass the channel and guild lists, and are refused with ``allow_dms =
false``.  A refused message is neither stored nor answered; in a DM its sender gets one short
notice an hour.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from chat.fairness import LruDict

log = logging.getLogger(__name__)

REFUSED = "Sorry, I am not available to you here. The bot's operator decides who may use it."
NOTICE_EVERY_S = 3600.0
MAX_NOTICED = 10_000  # users remembered for the once-an-hour notice


@dataclass(frozen=True, slots=True)
class AccessSettings:
    """``[access]``: users as ``"discord:<id>"`` / ``"telegram:<id>"``, channels as
    conversation keys (``"discord:<channel id>"``, ``"telegram:<chat id>"``), roles and guilds
    as Discord ids."""

    allow_users: frozenset[str] = frozenset()
    block_users: frozenset[str] = frozenset()
    allow_roles: frozenset[str] = frozenset()
    block_roles: frozenset[str] = frozenset()
    allow_channels: frozenset[str] = frozenset()
    block_channels: frozenset[str] = frozenset()
    allow_guilds: frozenset[str] = frozenset()
    block_guilds: frozenset[str] = frozenset()
    allow_dms: bool = True


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asks, and where."""

    platform: str
    user_id: str
    key: str  # the conversation
    is_dm: bool
    roles: tuple[str, ...] = ()
    guild_id: str | None = None


class Access:
    """Applies :class:`AccessSettings`; ``is_owner`` says who always passes."""

    def __init__(
        self,
        settings: AccessSettings,
        is_owner: Callable[[str, str], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.is_owner = is_owner
        self.clock = clock
        self._noticed: LruDict[str, float] = LruDict(MAX_NOTICED)
        self.refused = 0

    def permits(self, who: Requester) -> bool:
        a = self.settings
        if who.platform == "console" or self.is_owner(who.platform, who.user_id):
            return True
        user = f"{who.platform}:{who.user_id}"
        roles = set(who.roles)
        if (
            user in a.block_users
            or roles & a.block_roles
            or who.key in a.block_channels
            or (who.guild_id is not None and who.guild_id in a.block_guilds)
        ):
            return self._refuse(who, "blocked")
        if who.is_dm and not a.allow_dms:
            return self._refuse(who, "DMs are off")
        if (a.allow_users or a.allow_roles) and not (
            user in a.allow_users or roles & a.allow_roles
        ):
            return self._refuse(who, "not an allowed user or role")
        if not who.is_dm:
            if a.allow_channels and who.key not in a.allow_channels:
                return self._refuse(who, "not an allowed channel")
            if a.allow_guilds and who.guild_id not in a.allow_guilds:
                return self._refuse(who, "not an allowed guild")
        return True

    def _refuse(self, who: Requester, why: str) -> bool:
        self.refused += 1
        log.debug("access: refused %s:%s in %s (%s)", who.platform, who.user_id, who.key, why)
        return False

    def notice(self, who: Requester) -> str | None:
        """The refusal to send ``who``: in a DM, once an hour; in a group, never."""
        if not who.is_dm:
            return None
        user = f"{who.platform}:{who.user_id}"
        now = self.clock()
        last = self._noticed.get(user)
        if last is not None and now - last < NOTICE_EVERY_S:
            return None
        self._noticed[user] = now
        return REFUSED


def parse_access(table: Mapping[str, Any]) -> AccessSettings:
    """``[access]`` from its TOML table, each entry checked; ValueError says what is wrong."""
    known = sorted(f.name for f in fields(AccessSettings))
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown setting in [access]: {key}{hint}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "allow_dms":
            if not isinstance(value, bool):
                raise ValueError(f"[access] allow_dms = {value!r}: input should be a valid boolean")
            values[key] = value
            continue
        if not isinstance(value, list):
            raise ValueError(f"[access] {key} must be a list, not {value!r}")
        values[key] = frozenset(_entry(key, entry) for entry in value)
    return AccessSettings(**values)


def _entry(key: str, entry: object) -> str:
    text = str(entry).strip()
    if key.endswith(("_users", "_channels")):
        platform, _, rest = text.partition(":")
        if platform not in ("discord", "telegram") or not rest.strip().lstrip("-").isdigit():
            what = "user" if key.endswith("_users") else "channel or chat"
            raise ValueError(
                f"[access] {key}: {entry!r} is not 'discord:<{what} id>' or 'telegram:<{what} id>'"
            )
        return f"{platform}:{rest.strip()}"
    if isinstance(entry, bool) or not text.isdigit():  # Discord role and guild ids
        raise ValueError(f"[access] {key}: {entry!r} is not a Discord id")
    return text
