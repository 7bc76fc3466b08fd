"""Conversation rows, cached: their mode, cast, window start and settings.

A conversation with work pending (a message waiting, an answer streaming, an event arriving)
is never dropped from the cache: what its queue is doing must see the row it started with.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

from chat.fairness import LruDict
from chat.roleplay.characters import Character, CharacterLibrary
from chat.settings import Mode, Settings, parse_mode
from storage.records import Conversation
from storage.store import Store

MAX_CONVERSATIONS_CACHED = 4096  # conversation rows kept in memory (busy ones are kept anyway)


class Conversations:
    """The conversations the bot knows, by key, backed by the store."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        characters: CharacterLibrary,
        *,
        busy: Callable[[str], bool] = lambda _key: False,
        capacity: int | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.characters = characters
        self._rows: LruDict[str, Conversation] = LruDict(
            capacity or MAX_CONVERSATIONS_CACHED, lambda conv: busy(conv.key)
        )

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def capacity(self) -> int:
        return self._rows.capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._rows.capacity = value

    async def get(self, platform: str, key: str) -> Conversation:
        """The conversation of ``key``, created on first use."""
        conv = self._rows.get(key)
        if conv is None:
            conv = await self.store.conversations.get_or_create(platform, key)
            self._rows[key] = conv
        return conv

    async def known(self, key: str) -> Conversation | None:
        """The conversation of ``key`` if it exists: edits elsewhere never create one."""
        conv = self._rows.get(key)
        if conv is None:
            conv = await self.store.conversations.find(key)
            if conv is not None:
                self._rows[key] = conv
        return conv

    def keep(self, conv: Conversation) -> Conversation:
        """Remember ``conv`` as the current row of its key."""
        self._rows[conv.key] = conv
        return conv

    async def update_settings(self, conv: Conversation, **changes: object) -> Conversation:
        """Merge ``changes`` into the conversation's settings (None removes a setting)."""
        current = await self.get(conv.platform, conv.key)
        merged = {k: v for k, v in {**current.settings, **changes}.items() if v is not None}
        await self.store.conversations.set_settings(current.id, merged)
        return self.keep(replace(current, settings=merged))

    async def set_mode(self, conv: Conversation, mode: Mode) -> Conversation:
        await self.store.conversations.set_mode(conv.id, mode)
        return self.keep(replace(await self.get(conv.platform, conv.key), mode=mode))

    async def set_character(self, conv: Conversation, name: str) -> Conversation:
        await self.store.conversations.set_character(conv.id, name)
        return self.keep(replace(await self.get(conv.platform, conv.key), character=name))

    async def set_window_start(self, conv: Conversation, start: int) -> Conversation:
        await self.store.conversations.set_window_start(conv.id, start)
        return self.keep(replace(await self.get(conv.platform, conv.key), window_start_id=start))

    def mode_of(self, conv: Conversation, is_dm: bool) -> Mode:
        stored = parse_mode(conv.mode or "")
        if stored is not None:
            return stored
        platform = self.settings.platform(conv.platform)
        return platform.dm_mode if is_dm else platform.default_mode

    def cast_of(self, conv: Conversation) -> list[Character]:
        """The characters of the channel's scene: the chosen one, or several for a group."""
        names = conv.settings.get("cast") or [conv.character]
        return [self.characters.get(name) for name in names]

    def names_cast(self, conv: Conversation, text: str) -> bool:
        """Whether ``text`` names a character of the channel's scene (as a whole word)."""
        return any(
            re.search(rf"(?<!\w){re.escape(c.display_name)}(?!\w)", text, re.IGNORECASE)
            for c in self.cast_of(conv)
        )
