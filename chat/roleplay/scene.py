"""Roleplay scene rules: the story part of the prompt, turn order, stop strings, output cleaning."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

from chat.roleplay.characters import Character, apply_macros
from chat.roleplay.lorebook import Activation

ROLEPLAY_PROMPT = (
    "This is a roleplay chat. You are {{char}}. Stay in character and reply only as {{char}}: "
    "never write lines, thoughts or actions for the players. Each player's message starts "
    "with their name."
)
MAX_NAMED_PLAYERS = 4  # past this many, "{{user}}" in the pinned part is "the players"
_START = re.compile(r"^\s*<START>\s*$", re.IGNORECASE | re.MULTILINE)


def players_phrase(names: Sequence[str]) -> str:
    """What ``{{user}}`` stands for in the parts of a prompt that must not change from turn to
    turn: the player, or the players of a group scene by name (a crowd: "the players")."""
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        return "User"
    if len(names) == 1:
        return names[0]
    if len(names) > MAX_NAMED_PLAYERS:
        return "the players"
    return ", ".join(names[:-1]) + " and " + names[-1]


def story_text(
    char: Character,
    *,
    user: str,
    lore: Activation | None = None,
    global_prompt: str = ROLEPLAY_PROMPT,
    cast: Sequence[Character] = (),
) -> str:
    """The pinned part: system prompt, constant lore, description, personality, scenario and
    the rest of the cast; only text from the bot and the card (``user``: see
    :func:`players_phrase`)."""
    system = global_prompt
    if char.system_prompt.strip():
        system = char.system_prompt.replace("{{original}}", global_prompt)
    parts = [system]
    if lore:
        parts.extend(lore.before)
    if char.description.strip():
        parts.append(char.description)
    if char.personality.strip():
        parts.append(f"{{{{char}}}}'s personality: {char.personality}")
    if char.scenario.strip():
        parts.append(f"Scenario: {char.scenario}")
    for other in cast:
        if other.name != char.name:
            summary = other.description.strip().split("\n", 1)[0][:300]
            parts.append(f"Also in the scene: {other.display_name}. {summary}")
    if lore:
        parts.extend(lore.after)
    return apply_macros("\n\n".join(p.strip() for p in parts if p.strip()), char.display_name, user)


def lore_text(lore: Activation, char: Character, user: str) -> str:
    """Lore the last messages activated: it changes from turn to turn, so it goes after the
    history, where it never invalidates the evaluated prompt before it ("" when none)."""
    entries = [*lore.before, *lore.after]
    if not entries:
        return ""
    body = "\n".join(e.strip() for e in entries if e.strip())
    return apply_macros(f"[World info for this moment]\n{body}", char.display_name, user)


def example_text(char: Character, user: str) -> str:
    """``mes_example`` as one block of example dialogue ("" when the card has none)."""
    blocks = [b.strip() for b in _START.split(char.mes_example) if b.strip()]
    if not blocks:
        return ""
    body = "\n\n".join(blocks)
    return apply_macros(
        f"Examples of how {{{{char}}}} speaks (not part of the story):\n\n{body}",
        char.display_name,
        user,
    )


def post_history_text(char: Character, user: str, global_text: str = "") -> str:
    text = global_text
    if char.post_history_instructions.strip():
        text = char.post_history_instructions.replace("{{original}}", global_text)
    return apply_macros(text.strip(), char.display_name, user)


def stop_strings(players: Iterable[str], characters: Iterable[str], speaker: str) -> list[str]:
    """Newline + name + colon for every player and every other character, never a bare name."""
    names = dict.fromkeys([*players, *(c for c in characters if c != speaker)])
    return [f"\n{name}:" for name in names if name]


def strip_name_tag(text: str, names: Iterable[str]) -> str:
    """Remove one leading ``Name:`` tag (bold or italic allowed) of any of ``names``: models
    imitate the names in front of turns, and a reply must not open with one."""
    names = [n for n in names if n]
    if not names:
        return text
    tag = re.compile(
        r"^\s*[*_]*(?:" + "|".join(re.escape(n) for n in names) + r")[*_]*\s*:[*_]*\s*",
        re.IGNORECASE,
    )
    return tag.sub("", text, count=1)


def clean_reply(text: str, speaker: str, others: Iterable[str]) -> str:
    """Strip a leading ``Name:`` of the speaker or any participant, and cut at any other
    speaker's tag further on (the model started writing their lines)."""
    others = list(others)
    text = strip_name_tag(text, [speaker, *others])
    names = [n for n in others if n and n.lower() != speaker.lower()]
    if names:
        tag = re.compile(
            r"(?:^|\n)[ \t]*[*_]*(?:" + "|".join(re.escape(n) for n in names) + r")[*_]*[ \t]*:",
            re.IGNORECASE,
        )
        match = tag.search(text)
        if match:
            text = text[: match.start()]
    return text.strip()


def choose_speakers(
    cast: Sequence[Character],
    last_text: str,
    last_speaker: str | None,
    rng: random.Random,
) -> list[Character]:
    """Who answers, in order: characters named in the message first (in order of mention);
    otherwise each rolls against its talkativeness; at least one answers; nobody answers
    itself twice in a row."""
    if not cast:
        return []
    eligible = [c for c in cast if c.name != last_speaker] or list(cast)
    if len(cast) == 1:
        return [cast[0]]
    lowered = last_text.lower()
    named = [
        (lowered.find(c.display_name.lower()), c)
        for c in eligible
        if re.search(rf"(?<!\w){re.escape(c.display_name.lower())}(?!\w)", lowered)
    ]
    if named:
        return [c for _, c in sorted(named, key=lambda pair: pair[0])]
    chosen = [c for c in eligible if rng.random() < c.talkativeness]
    return chosen or [rng.choice(eligible)]
