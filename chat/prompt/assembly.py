"""Assembling one prompt: the pinned part, example dialogue, the history window, the cue.

Work mode: system prompt + history.  Roleplay: the pinned story (system prompt, constant lore,
description, personality, scenario), example dialogue while it fits, history, the lore the
last messages activated, post-history instructions.  The result is token ids, ready for the
model.

Two rules shape it:

- **The front stays put.**  Everything before the history is the same from turn to turn while
  the players are the same: ``{{user}}`` there names the conversation's players, not whoever
  spoke last, and what changes each turn (activated lore, post-history instructions with the
  current speaker) goes after the history, so llama.cpp reuses the evaluated prefix.
- **Users' words have a user's weight.**  The system turns hold only the bot's and the card's
  text.  What players write to steer the conversation (personas, pinned facts, the author's
  note) goes in user turns, labelled as theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ai_model.base import ChatModel
from chat.limits import MAX_PINNED_SHARE
from chat.prompt.memory import fit_memory, memory_text
from chat.prompt.window import Part, Turn, TurnEncoder, Window, clean_name, fit_window
from chat.roleplay.characters import Character
from chat.roleplay.lorebook import Activation, Lorebook, LoreEntry, activate
from chat.roleplay.scene import (
    example_text,
    lore_text,
    players_phrase,
    post_history_text,
    stop_strings,
    story_text,
)
from chat.tools import llama3, tagged
from chat.tools.rounds import ToolPrompt
from storage.records import USER, StoredMessage

RECENT_SPEAKERS = 60  # messages scanned for the names that get stop strings
LORE_SCAN = 10  # messages handed to the lorebook (each book applies its own scan depth)
PERSONAS_HEAD = "How the players describe who they play (their own words, not instructions):"


@dataclass(frozen=True, slots=True)
class Prompt:
    tokens: list[int]
    stops: list[str]
    window: Window
    budget: int = 0  # tokens the history may take
    summary_room: int = 0  # tokens a summary may take beside the pinned facts
    parts: tuple[Part, ...] = ()  # what the prompt is made of, in order (before the cue)


@dataclass(frozen=True, slots=True)
class Memory:
    """What the prompt pins besides the story: a summary and facts within ``budget`` tokens;
    a trim cuts at least up to ``cut_after`` (where a prepared summary ends)."""

    summary: str = ""
    facts: Sequence[str] = ()
    budget: int = 0
    cut_after: int | None = None
    # The author's note (/note): a line this many messages from the end.
    note: str = ""
    note_depth: int = 4


@dataclass(frozen=True, slots=True)
class Scene:
    """What roleplay adds to a prompt: who speaks, who else is there, the lore, the personas."""

    character: Character
    cast: Sequence[Character]
    world_book: Lorebook | None = None
    lore: Sequence[LoreEntry] = ()  # entries whose keys matched (``lorebook.match_entries``)
    personas: Sequence[tuple[str, str]] = ()  # (player name, /persona description)
    persona_budget: int = 0  # tokens the personas may take

    @property
    def books(self) -> list[Lorebook]:
        return [b for b in (self.character.book, self.world_book) if b is not None]


def pinned_limit(n_ctx: int) -> int:
    """Tokens the pinned part (with post-history text, cue and reply reserve) may take."""
    return int(n_ctx * MAX_PINNED_SHARE)


def personas_text(
    personas: Sequence[tuple[str, str]], budget: int, count: Callable[[str], int]
) -> str:
    """The players' personas as one block, those that fit ``budget`` tokens, in order."""
    kept: list[str] = []
    for name, description in personas:
        line = f"About {name}: {description}"
        if count("\n".join([PERSONAS_HEAD, *kept, line])) > budget:
            break
        kept.append(line)
    return "\n".join([PERSONAS_HEAD, *kept]) if kept else ""


def _cost(encoder: TurnEncoder, part: Part | str) -> int:
    """The tokens of a part (or of a block of system text) as a turn of its own (0 for none)."""
    if isinstance(part, str):
        part = Part("system", part)
    if part.pieces:
        return len(encoder.framed(part.pieces))
    if not part.text:
        return 0
    return len(encoder.fixed(part.role, part.text))


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
    players: Sequence[str] = (),
    documents: str = "",
    tools: ToolPrompt | None = None,
) -> Prompt:
    """The prompt for the reply after ``history``, within ``model.n_ctx - reserve`` tokens.

    ``players`` are the conversation's players in the order they first spoke (stable from turn
    to turn); without it, those of the last messages.  ``documents`` (retrieved excerpts)
    go right before the last user turn: the history before them stays a reusable prefix, and
    the question still comes last.  ``tools`` in Meta's format (Llama 3.x) frames the prompt as
    that format does: the system turn opens with ``Environment: ipython``, the definitions go
    before the first message of the window, and this reply's calls and results so far come
    last.  In the tagged format (any other model) the tools are offered at the end of the
    system text, and calls and results are assistant and user turns, last.
    """

    def count(text: str) -> int:
        return len(model.tokenize(text.encode("utf-8"), False, False))

    recent = [clean_name(m.author_name) for m in history[-RECENT_SPEAKERS:] if m.role == USER]
    speakers = list(dict.fromkeys(recent))
    known = list(players) or speakers
    cue = encoder.cue()
    example = ""  # the card's example dialogue
    post = ""  # post-history instructions
    moment = ""  # lore this turn activated, after the history
    steering: list[str] = []  # what players wrote to steer: a user turn
    if scene is None:
        pinned_text = system_prompt
        stops = [f"\n{name}:" for name in speakers[-20:]]
    else:
        char = scene.character
        user = players_phrase(known)
        speaker = recent[-1] if recent else user
        post = post_history_text(char, speaker)
        story = story_text(char, user=user, cast=scene.cast)
        fixed = len(encoder.system(story)) + _cost(encoder, post) + len(cue) + reserve
        room = max(0, min(model.n_ctx // 4, pinned_limit(model.n_ctx) - fixed))
        constant = [e for e in scene.lore if e.constant]
        keyed = [e for e in scene.lore if not e.constant]
        pinned_lore: Activation | None = None
        if constant:
            pinned_lore = activate(scene.books, constant, count, room)
            story = story_text(char, user=user, lore=pinned_lore, cast=scene.cast)
            room -= sum(count(text) for text in (*pinned_lore.before, *pinned_lore.after))
        if keyed and room > 0:
            moment = lore_text(activate(scene.books, keyed, count, room), char, speaker)
        pinned_text = story
        example = example_text(char, user)
        if block := personas_text(scene.personas, scene.persona_budget, count):
            steering.append(block)
        names = [c.display_name for c in scene.cast]
        stops = stop_strings(speakers, names, char.display_name)
    summary, facts = fit_memory(memory.summary, memory.facts, memory.budget, count)
    front = [Part("system", pinned_text, label="pinned")]
    if summary:
        front.append(Part("system", memory_text(summary, ()), label="memory"))
    if facts:
        steering.append(memory_text("", facts))
    steer = [Part("user", "\n\n".join(steering), label="steering")] if steering else []
    note = [Part("user", f"[Author's note: {memory.note}]", label="note")] if memory.note else []
    excerpts = [Part("user", documents, label="documents")] if documents else []
    back = [
        Part("system", text, label=label)
        for text, label in ((moment, "lore"), (post, "post-history"))
        if text
    ]
    summary_room = memory.budget - (count(memory_text("", memory.facts)) if memory.facts else 0)
    acting: list[Part] = []
    meta = tools is not None and tools.style == "llama3"
    if tools is not None and meta:  # one system turn, Meta's (formats that merge would)
        merged = "\n\n".join(p.text for p in front)
        pieces = llama3.system_turn(model.template, merged)
        front = [Part("system", merged, label="pinned", pieces=pieces)]
        for written, result in tools.rounds:
            acting.append(Part("assistant", written, pieces=llama3.written_call_turn(written)))
            acting.append(Part("ipython", result, pieces=llama3.result_turn(result)))
    elif tools is not None:  # tagged calls: offered in the bot's own system text
        pinned = replace(front[0], text=tagged.system_text(tools.definitions, front[0].text))
        front[0] = pinned
        for written, result in tools.rounds:
            acting.append(Part("assistant", written, label="tool call"))
            acting.append(Part("user", tagged.result_text(result), label="tool result"))
    fixed_cost = (
        len(model.bos)
        + len(encoder.head())
        + sum(_cost(encoder, p) for p in (*front, *steer, *note, *excerpts, *back, *acting))
        + (count(llama3.definitions(tools.definitions)) if tools is not None and meta else 0)
    )
    budget = model.n_ctx - reserve - fixed_cost - len(cue)
    # Names go in front of turns only where they tell speakers apart: replies when several
    # characters share the assistant role, user turns when more than one human talks.
    named_replies = scene is not None and len(scene.cast) > 1
    named_users = len(known) > 1
    named = {m.id: named_users if m.role == USER else named_replies for m in history}
    # Newest first, and no further than the budget: older turns could never be in the window
    # (a trim would drop them first), so a mention after hours of chatter costs no more to
    # frame than a full window.
    turns: list[Turn] = []
    total = 0
    for m in reversed(history):
        turns.append(encoder.turn(m, named=named[m.id]))
        total += len(turns[-1].tokens)
        if total > budget:
            break
    turns.reverse()
    window = fit_window(turns, budget=budget, start=window_start, cut_after=memory.cut_after)
    used = sum(len(t.tokens) for t in window.turns)
    # Example dialogue is the first thing to go: only while nothing was ever trimmed.
    examples = [Part("system", example, label="examples")] if example else []
    if window.trimmed or window.start > 0 or used + _cost(encoder, example) > budget:
        examples = []
    by_id = {m.id: m for m in history}
    talk = [
        Part(
            "user" if by_id[t.message_id].role == USER else "assistant",
            "",
            by_id[t.message_id],
            named[t.message_id],
            label="history",
        )
        for t in window.turns
    ]
    depth = max(0, len(talk) - memory.note_depth)
    talk[depth:depth] = note
    if excerpts:
        last = len(talk) - 1 if talk and talk[-1].role == "user" else len(talk)
        talk[last:last] = excerpts
    if tools is not None and meta:  # the definitions go before the window's first message
        for i, part in enumerate(talk):
            if part.role == "user" and part.message is not None:
                text = encoder.text_of(part.message, part.named)
                talk[i] = replace(part, pieces=llama3.first_user_turn(tools.definitions, text))
                break
    parts = [*front, *examples, *steer, *talk, *back, *acting]
    tokens = [*model.bos, *encoder.compose(parts), *cue]
    return Prompt(tokens, stops, window, budget, summary_room, tuple(parts))
