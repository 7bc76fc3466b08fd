"""Personas (/persona): who each player plays in one conversation, and the conversation's
players in the order they first spoke.

A persona is a player's own: only they set theirs; admins may clear anyone's or switch
personas off for a conversation; /reset clears them all.  Their text is the player's, and the
prompt gives it a user's weight (:mod:`chat.prompt.assembly`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chat.prompt.window import clean_name
from storage.records import USER, Conversation, StoredMessage

MAX_PERSONA_CHARS = 500
MAX_PERSONA_NAME_CHARS = 40
MAX_PERSONAS = 16  # per conversation
PERSONA_SHARE = 0.08  # of the window: what all of a conversation's personas may take together
MAX_PLAYERS_KEPT = 64  # players remembered per conversation (for names in the prompt's front)


@dataclass(frozen=True, slots=True)
class Persona:
    """Who a player plays in one conversation: a name (optional) and a description."""

    name: str | None
    description: str


def personas_on(conv: Conversation) -> bool:
    return not conv.settings.get("personas_off")


def personas_of(conv: Conversation) -> dict[str, Persona]:
    """The conversation's personas by the player's platform user id (none when switched off)."""
    if not personas_on(conv):
        return {}
    stored = conv.settings.get("personas") or {}
    return {
        str(uid): Persona(p.get("name"), str(p.get("description", "")))
        for uid, p in stored.items()
        if isinstance(p, dict)
    }


def parse_persona(text: str) -> Persona:
    """``Name: description`` (a short name before the colon) or a description alone."""
    text = " ".join(text.split())
    name, colon, rest = text.partition(":")
    if colon and rest.strip() and 0 < len(name.strip()) <= MAX_PERSONA_NAME_CHARS:
        return Persona(clean_name(name), rest.strip())
    return Persona(None, text)


def players_of(conv: Conversation) -> list[tuple[str, str]]:
    """(user id, name) of the conversation's players, in the order they first spoke."""
    stored = conv.settings.get("players") or []
    return [(str(p[0]), str(p[1])) for p in stored if isinstance(p, list) and len(p) == 2]


def with_new_players(
    known: Sequence[tuple[str, str]], history: Sequence[StoredMessage]
) -> list[tuple[str, str]] | None:
    """``known`` with the players of ``history`` not in it yet, or None when nothing is new."""
    seen = {uid for uid, _ in known}
    added = list(known)
    for message in history:
        uid = message.author_id or clean_name(message.author_name)
        if message.role == USER and uid not in seen:
            seen.add(uid)
            added.append((uid, clean_name(message.author_name)))
    if len(added) == len(known):
        return None
    return added[:MAX_PLAYERS_KEPT]


def player_names(players: Sequence[tuple[str, str]], personas: Mapping[str, Persona]) -> list[str]:
    """The players' names as the prompt shows them: a persona's name replaces the player's."""
    return [personas[uid].name or name if uid in personas else name for uid, name in players]


def shown_personas(
    players: Sequence[tuple[str, str]], personas: Mapping[str, Persona]
) -> list[tuple[str, str]]:
    """(name, description) of every persona, in the order of :func:`players_of`, then the
    personas of players who have not spoken yet."""
    order = {uid: i for i, (uid, _) in enumerate(players)}
    names = dict(players)
    ranked = sorted(personas.items(), key=lambda item: order.get(item[0], len(order)))
    return [(p.name or clean_name(names.get(uid, "A player")), p.description) for uid, p in ranked]


def stored_personas(conv: Conversation) -> dict[str, Any]:
    return dict(conv.settings.get("personas") or {})
