"""Assembling one prompt: the pinned part, example dialogue, the history window, the cue.

Work mode: system prompt + history.  Roleplay: the pinned story (system prompt, lorebook,
description, personality, scenario, persona), example dialogue while it fits, history,
post-history instructions.  The result is token ids, ready for the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ai_model.base import ChatModel
from chat.roleplay.characters import Character
from chat.limits import MAX_PINNED_SHARE
from chat.roleplay.lorebook import Lorebook, LoreEntry, activate
from chat.prompt.memory import fit_memory, memory_text
from chat.prompt.window import TurnEncoder, Window, clean_name, fit_window
from chat.roleplay.scene import example_text, post_history_text, stop_strings, story_text
from storage.records import USER, StoredMessage

RECENT_SPEAKERS = 60  # messages scanned for the names that get stop strings
LORE_SCAN = 10  # messages handed to the lorebook (each book applies its own scan depth)


@dataclass(frozen=True, slots=True)
class Prompt:
    tokens: list[int]
    stops: list[str]
    window: Window
    budget: int = 0  # tokens the history may take
    summary_room: int = 0  # tokens a summary may take beside the pinned facts


@dataclass(frozen=True, slots=True)
class Memory:
    """What the prompt pins after the system part: a summary, facts, within ``budget``
    tokens; a trim cuts at least up to ``cut_after`` (where a prepared summary ends)."""

    summary: str = ""
    facts: Sequence[str] = ()
    budget: int = 0
    cut_after: int | None = None
    # The author's note (/note): a system line this many messages from the end.
    note: str = ""
    note_depth: int = 4


@dataclass(frozen=True, slots=True)
class Scene:
    """What roleplay adds to a prompt: who speaks, who else is there, the extra lore."""

    character: Character
    cast: Sequence[Character]
    world_book: Lorebook | None = None
    persona: str = ""
    lore: Sequence[LoreEntry] = ()  # entries whose keys matched (``lorebook.match_entries``)
    personas: Mapping[str, str] = field(default_factory=dict)  # player name -> /persona

    @property
    def books(self) -> list[Lorebook]:
        return [b for b in (self.character.book, self.world_book) if b is not None]


def humans(history: Sequence[StoredMessage]) -> int:
    """How many different people wrote the user turns of ``history``."""
    return len({m.author_id or clean_name(m.author_name) for m in history if m.role == USER})


def pinned_limit(n_ctx: int) -> int:
    """Tokens the pinned part (with post-history text, cue and reply reserve) may take."""
    return int(n_ctx * MAX_PINNED_SHARE)


def assemble(
    model: ChatModel,
    encoder: TurnEncoder,
    history: Sequence[StoredMessage],
    *,
    system_prompt: str,
    scene: Scene | None,
    window_start: int,
    reserve: int,
    memory: Memory = Memory(),
) -> Prompt:
    """The prompt for the reply after ``history``, within ``model.n_ctx - reserve`` tokens."""
    recent = history[-RECENT_SPEAKERS:]
    players = list(dict.fromkeys(clean_name(m.author_name) for m in recent if m.role == USER))
    examples: list[int] = []
    post: list[int] = []
    if scene is None:
        pinned_text = system_prompt
        stops = [f"\n{name}:" for name in players[-20:]]
    else:
        char = scene.character
        user = players[-1] if players else "User"
        if after := post_history_text(char, user):
            post = encoder.system(after)
        pinned_text = story_text(
            char, user=user, persona=scene.persona, cast=scene.cast, personas=scene.personas
        )
        if scene.lore:
            # Lore may fill what the card leaves of the pinned share, so that activated entries
            # never squeeze the conversation below half of the window.
            fixed = len(encoder.system(pinned_text)) + len(post) + len(encoder.cue()) + reserve
            lore = activate(
                scene.books,
                scene.lore,
                lambda text: len(model.tokenize(text.encode("utf-8"), False, False)),
                min(model.n_ctx // 4, pinned_limit(model.n_ctx) - fixed),
            )
            pinned_text = story_text(
                char,
                user=user,
                persona=scene.persona,
                lore=lore,
                cast=scene.cast,
                personas=scene.personas,
            )
        if example := example_text(char, user):
            examples = encoder.system(example)
        names = [c.display_name for c in scene.cast]
        stops = stop_strings(players, names, char.display_name)
    pinned = [*model.bos, *encoder.system(pinned_text)]

    def count(text: str) -> int:
        return len(model.tokenize(text.encode("utf-8"), False, False))

    block = fit_memory(memory.summary, memory.facts, memory.budget, count)
    if block:
        pinned.extend(encoder.system(block))
    summary_room = memory.budget - (count(memory_text("", memory.facts)) if memory.facts else 0)
    cue = encoder.cue()
    note = encoder.system(f"[Author's note: {memory.note}]") if memory.note else []
    budget = model.n_ctx - reserve - len(pinned) - len(post) - len(cue) - len(note)
    # Names go in front of turns only where they tell speakers apart: replies when several
    # characters share the assistant role, user turns when more than one human talks.
    named_replies = scene is not None and len(scene.cast) > 1
    named_users = humans(history) > 1
    turns = [
        encoder.turn(m, named=named_users if m.role == USER else named_replies) for m in history
    ]
    window = fit_window(turns, budget=budget, start=window_start, cut_after=memory.cut_after)
    used = sum(len(t.tokens) for t in window.turns)
    # Example dialogue is the first thing to go: only while nothing was ever trimmed.
    if window.trimmed or window.start > 0 or used + len(examples) > budget:
        examples = []
    tokens = [*pinned, *examples]
    depth = max(0, len(window.turns) - memory.note_depth)
    for i, turn in enumerate(window.turns):
        if i == depth:
            tokens.extend(note)
        tokens.extend(turn.tokens)
    if depth >= len(window.turns):  # no turns at all
        tokens.extend(note)
    tokens.extend(post)
    tokens.extend(cue)
    return Prompt(tokens, stops, window, budget, summary_room)
