"""The shared library of characters and world books, and the rules for changing it.

Everything here affects every conversation on every platform, so the adapters let only bot
owners (and the command line) reach it.  Shipped and configured characters can never be
replaced; an imported one only on purpose.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ai_model.base import ChatModel
from chat.limits import MAX_NAME_CHARS, shorten
from chat.prompt.assembly import pinned_limit
from chat.prompt.window import TurnEncoder
from chat.roleplay.characters import (
    CardError,
    Character,
    CharacterLibrary,
    character_from_card,
    check_card,
)
from chat.roleplay.lorebook import Lorebook, LoreError, check_book
from chat.roleplay.scene import post_history_text, story_text
from storage.store import Store

log = logging.getLogger(__name__)

_PINNED_FIELDS = ("system_prompt", "description", "personality", "scenario")


@dataclass(frozen=True, slots=True)
class Imported:
    character: Character
    replaced: bool


def check_pinned(char: Character, model: ChatModel, encoder: TurnEncoder, reserve: int) -> None:
    """Refuse a character whose pinned part would leave less than half the window for history.

    The pinned part is what every prompt repeats: the story, the post-history instructions, the
    reply cue and the room kept for the reply.  The refusal names the largest field.
    """
    user = "User"
    cost = len(model.bos) + len(encoder.system(story_text(char, user=user, cast=[char])))
    if post := post_history_text(char, user):
        cost += len(encoder.system(post))
    cost += len(encoder.cue()) + reserve
    limit = pinned_limit(model.n_ctx)
    if cost <= limit:
        return
    sizes = {
        name: len(model.tokenize(str(getattr(char, name)).encode("utf-8"), False, False))
        for name in (*_PINNED_FIELDS, "post_history_instructions")
    }
    biggest = max(sizes, key=lambda name: sizes[name])
    raise CardError(
        f"the card's pinned text needs {cost} tokens with the room kept for the reply, but at "
        f"most {limit} (half of the {model.n_ctx}-token window) may be pinned; the largest "
        f"field is {biggest} ({sizes[biggest]} tokens): shorten it"
    )


class Library:
    """Characters (shipped, configured, imported) and world books, backed by the store."""

    def __init__(
        self,
        store: Store,
        characters: CharacterLibrary,
        fixed: set[str],
        *,
        model: Callable[[], Awaitable[ChatModel]],
        encoder: Callable[[ChatModel], TurnEncoder],
        reserve: int,
    ) -> None:
        self.store = store
        self.characters = characters
        self.world_books: dict[str, Lorebook] = {}
        self._fixed = {name.lower() for name in fixed}  # shipped and configured: never replaced
        self._model = model  # the character model: a card's size is counted in its tokens
        self._encoder = encoder
        self._reserve = reserve  # the character model's reply budget

    async def load(self) -> None:
        """Add the cards and world books imported earlier (stored in the database)."""
        for name, card in (await self.store.library.cards()).items():
            if name.lower() in self._fixed:
                # Written by a version that let imports replace shipped characters: ignored.
                log.warning("stored card %r shadows a shipped character and is ignored", name)
                continue
            try:
                self.characters.add(character_from_card(card))
            except CardError as exc:
                log.warning("stored character %r is unreadable and was skipped: %s", name, exc)
        for name, data in (await self.store.library.world_books()).items():
            self.world_books[name.lower()] = Lorebook.from_json(data)

    async def import_card(self, card: Mapping[str, Any], *, replace: bool = False) -> Imported:
        """Check and store a parsed card; raise :class:`CardError` saying why it is refused."""
        check_card(card)
        char = character_from_card(card)
        if char.name.lower() in self._fixed:
            raise CardError(
                f"{shorten(char.name)} is a character that ships with the bot and cannot be "
                "replaced; give the card another name"
            )
        existing = self.characters.find(char.name)
        if existing is not None and not replace:
            raise CardError(
                f"a character called {shorten(existing.name)} already exists; import again "
                "with replace to replace it"
            )
        model = await self._model()
        check_pinned(char, model, self._encoder(model), self._reserve)
        await self.store.library.save_card(char.name, card)
        self.characters.add(char)
        return Imported(char, replaced=existing is not None)

    async def import_world_book(self, name: str, book: Mapping[str, Any]) -> Lorebook:
        name = name.strip()
        if not name or len(name) > MAX_NAME_CHARS:
            raise CardError(f"a world book needs a name of 1 to {MAX_NAME_CHARS} characters")
        try:
            check_book(book, f"world book {shorten(name)}")
        except LoreError as exc:
            raise CardError(str(exc)) from exc
        lore = Lorebook.from_json(book)
        await self.store.library.save_world_book(name, book)
        self.world_books[name.lower()] = lore
        return lore
