"""Characters the bot can play, built from SillyTavern/TavernAI cards (V1, V2, V3).

A :class:`Character` keeps the fields the prompt needs, plus the card it came from (``card``),
unknown fields included, so that storing and exporting a card gives back what was imported.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chat.limits import MAX_FIELD_CHARS, MAX_GREETINGS, MAX_NAME_CHARS
from chat.roleplay.lorebook import Lorebook, LoreError, check_book

SAMPLING_OVERRIDES = ("temperature", "top_p", "min_p", "repeat_penalty", "repeat_last_n")
EXTENSION_KEY = "localbot"  # where our own per-character settings live inside a card


class CardError(ValueError):
    """A character card could not be read; the message says why, for the user."""


@dataclass(frozen=True, slots=True)
class Character:
    """A roleplay persona; ``card`` is the original card JSON (V2/V3 shape)."""

    name: str
    description: str = ""
    greeting: str = ""
    personality: str = ""
    scenario: str = ""
    mes_example: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: tuple[str, ...] = ()
    group_only_greetings: tuple[str, ...] = ()
    nickname: str = ""
    creator_notes: str = ""  # for people only: never put in a prompt
    talkativeness: float = 0.5
    book: Lorebook | None = None
    sampling: Mapping[str, float] = field(default_factory=dict)
    card: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def display_name(self) -> str:
        """What ``{{char}}`` becomes: the V3 nickname when there is one."""
        return self.nickname or self.name

    def greetings(self, group: bool) -> tuple[str, ...]:
        """The opening message and its alternatives (swipes), group-only ones in groups."""
        found = (self.greeting, *self.alternate_greetings)
        if group:
            found += self.group_only_greetings
        return tuple(g for g in found if g.strip())


_CHAR = re.compile(r"\{\{char\}\}|<BOT>", re.IGNORECASE)
_USER = re.compile(r"\{\{user\}\}|<USER>", re.IGNORECASE)


def apply_macros(text: str, char: str, user: str) -> str:
    """Replace ``{{char}}``/``<BOT>`` and ``{{user}}``/``<USER>`` (any case)."""
    text = _CHAR.sub(lambda _m: char, text)
    return _USER.sub(lambda _m: user, text)


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return value if isinstance(value, str) else ""


def _texts(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def character_from_card(card: Mapping[str, Any]) -> Character:
    """Build a :class:`Character` from a parsed card of any version."""
    if not isinstance(card, Mapping):
        raise CardError("a character card must be a JSON object")
    spec = card.get("spec")
    if spec in ("chara_card_v2", "chara_card_v3"):
        data = card.get("data")
        if not isinstance(data, Mapping):
            raise CardError(f"{spec} card has no 'data' object")
    elif spec is None:
        data = card  # V1: the fields sit at the top level
    else:
        raise CardError(f"unsupported card spec {spec!r}")
    name = _text(data, "name").strip()
    if not name:
        raise CardError("the card has no character name")
    extensions = data.get("extensions") if isinstance(data.get("extensions"), Mapping) else {}
    ours = extensions.get(EXTENSION_KEY, {}) if isinstance(extensions, Mapping) else {}
    sampling = {
        key: float(value)
        for key, value in (ours.get("sampling", {}) if isinstance(ours, Mapping) else {}).items()
        if key in SAMPLING_OVERRIDES and isinstance(value, int | float)
    }
    talk = extensions.get("talkativeness", 0.5) if isinstance(extensions, Mapping) else 0.5
    try:
        talkativeness = min(1.0, max(0.0, float(talk)))
    except (TypeError, ValueError):
        talkativeness = 0.5
    book_data = data.get("character_book")
    return Character(
        name=name,
        description=_text(data, "description"),
        greeting=_text(data, "first_mes"),
        personality=_text(data, "personality"),
        scenario=_text(data, "scenario"),
        mes_example=_text(data, "mes_example"),
        system_prompt=_text(data, "system_prompt"),
        post_history_instructions=_text(data, "post_history_instructions"),
        alternate_greetings=_texts(data, "alternate_greetings"),
        group_only_greetings=_texts(data, "group_only_greetings"),
        nickname=_text(data, "nickname"),
        creator_notes=_text(data, "creator_notes"),
        talkativeness=talkativeness,
        book=Lorebook.from_json(book_data) if isinstance(book_data, Mapping) else None,
        sampling=sampling,
        card=dict(card),
    )


TEXT_FIELDS = (
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "system_prompt",
    "post_history_instructions",
    "creator_notes",
    "nickname",
)


def card_data(card: Mapping[str, Any]) -> Mapping[str, Any]:
    """The fields of a card of any version (V1 keeps them at the top level)."""
    data = card.get("data")
    return data if isinstance(data, Mapping) else card


def check_card(card: Mapping[str, Any]) -> None:
    """Refuse (raise :class:`CardError`, naming the field) a card that breaks a size limit."""
    data = card_data(card)
    name = _text(data, "name").strip()
    if len(name) > MAX_NAME_CHARS:
        raise CardError(f"the name has {len(name)} characters (at most {MAX_NAME_CHARS})")
    for key in TEXT_FIELDS:
        if len(_text(data, key)) > MAX_FIELD_CHARS:
            raise CardError(
                f"the field {key} has {len(_text(data, key))} characters "
                f"(at most {MAX_FIELD_CHARS})"
            )
    greetings = [*_texts(data, "alternate_greetings"), *_texts(data, "group_only_greetings")]
    if len(greetings) > MAX_GREETINGS:
        raise CardError(f"the card has {len(greetings)} greetings (at most {MAX_GREETINGS})")
    if any(len(g) > MAX_FIELD_CHARS for g in greetings):
        raise CardError(f"a greeting has more than {MAX_FIELD_CHARS} characters")
    book = data.get("character_book")
    if isinstance(book, Mapping):
        try:
            check_book(book, "character_book")
        except LoreError as exc:
            raise CardError(str(exc)) from exc


def card_from_fields(
    name: str, description: str = "", greeting: str = "", **more: Any
) -> dict[str, Any]:
    """A V2 card for a character defined in the settings file."""
    data: dict[str, Any] = {
        "name": name,
        "description": description,
        "personality": "",
        "scenario": "",
        "first_mes": greeting,
        "mes_example": "",
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": [],
        "tags": [],
        "creator": "",
        "character_version": "",
        "extensions": {},
    }
    data.update(more)
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


@functools.cache
def shipped_characters() -> tuple[Character, ...]:
    """The characters that ship with the bot (``bot/shipped_cards/*.json``)."""
    folder = importlib.resources.files("chat.roleplay") / "shipped_cards"
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            found.append(character_from_card(json.loads(entry.read_text(encoding="utf-8"))))
    return tuple(found)


class CharacterLibrary:
    """The characters known to the bot, by case-insensitive name."""

    def __init__(self, characters: Iterable[Character] = (), default: str | None = None) -> None:
        self._by_name: dict[str, Character] = {}
        for char in characters:
            self.add(char)
        self.default = default or next(iter(self._by_name.values())).name

    def add(self, char: Character) -> None:
        self._by_name[char.name.lower()] = char

    def find(self, name: str | None) -> Character | None:
        return self._by_name.get((name or "").strip().lower())

    def get(self, name: str | None) -> Character:
        """The named character, or the default one when the name is unknown or empty."""
        found = self.find(name) or self.find(self.default)
        assert found is not None, "the default character must exist"
        return found

    def names(self) -> list[str]:
        return [c.name for c in self._by_name.values()]

    def all(self) -> list[Character]:
        return list(self._by_name.values())
