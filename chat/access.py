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

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

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
