"""Steering a conversation: pinned facts, the author's note, personas, and what /memory shows.

All of it is text users write; the prompt gives it a user's weight (see
:mod:`chat.prompt.assembly`).  Each change takes the conversation's turn.
"""

from __future__ import annotations

import asyncio

from chat.answers import ModelProvider
from chat.conversations import Conversations
from chat.personas import (
    MAX_PERSONA_CHARS,
    MAX_PERSONAS,
    PERSONA_SHARE,
    parse_persona,
    personas_on,
    stored_personas,
)
from chat.prompt.assembly import personas_text
from chat.prompt.memory import MAX_FACT_CHARS, MAX_FACTS, MAX_NOTE_CHARS, MemoryKeeper
from chat.prompt.window import clean_name
from chat.queues import Arrival, Queues
from chat.settings import Settings


class Steering:
    """Facts, the note and personas of each conversation."""

    def __init__(
        self,
        settings: Settings,
        conversations: Conversations,
        queues: Queues,
        memory: MemoryKeeper,
        models: ModelProvider,
    ) -> None:
        self.settings = settings
        self.conversations = conversations
        self.queues = queues
        self.memory = memory
        self.models = models

    async def remember(
        self, platform: str, key: str, fact: str, arrival: Arrival | None = None
    ) -> str:
        """Pin a fact to the conversation's memory; the answer says what happened."""
        fact = " ".join(fact.split())
        if not fact:
            return "Tell me what to remember: /remember <fact>."
        if len(fact) > MAX_FACT_CHARS:
            return f"That is too long to pin; keep a fact under {MAX_FACT_CHARS} characters."
        async with self.queues.turn(key, arrival):
            conv = await self.conversations.get(platform, key)
            facts = [str(f) for f in conv.settings.get("facts") or []]
            if fact in facts:
                return f"I already remember that (fact {facts.index(fact) + 1})."
            if len(facts) >= MAX_FACTS:
                return f"I already keep {MAX_FACTS} facts here; /forget one first."
            await self.conversations.update_settings(conv, facts=[*facts, fact])
        return f"I will remember that (fact {len(facts) + 1}). /memory shows everything I keep."

    async def forget_fact(
        self, platform: str, key: str, number: str, arrival: Arrival | None = None
    ) -> str:
        """Unpin fact ``number`` (1-based, as /memory lists them)."""
        async with self.queues.turn(key, arrival):
            conv = await self.conversations.get(platform, key)
            facts = [str(f) for f in conv.settings.get("facts") or []]
            if not number.strip().isdigit() or not 1 <= int(number) <= len(facts):
                if not facts:
                    return "I keep no pinned facts here."
                return f"Give the number of a fact, from 1 to {len(facts)} (/memory lists them)."
            gone = facts.pop(int(number) - 1)
            await self.conversations.update_settings(conv, facts=facts or None)
        return f"Forgotten: {gone}"

    async def set_note(
        self, platform: str, key: str, note: str, arrival: Arrival | None = None
    ) -> str:
        """Set the author's note (empty: clear it); it sits ``note_depth`` messages from the
        end of every prompt until changed."""
        note = " ".join(note.split())
        if len(note) > MAX_NOTE_CHARS:
            return f"That note is too long; keep it under {MAX_NOTE_CHARS} characters."
        async with self.queues.turn(key, arrival):
            conv = await self.conversations.get(platform, key)
            await self.conversations.update_settings(conv, note=note or None)
        if not note:
            return "Author's note cleared."
        depth = self.settings.note_depth
        return f"Author's note set; it steers every reply from {depth} messages before the end."

    # -- personas -----------------------------------------------------------------------------

    async def set_persona(
        self, platform: str, key: str, user_id: str, text: str, arrival: Arrival | None = None
    ) -> str:
        """Set (empty: clear) who ``user_id`` plays in this conversation; a player's persona
        is theirs alone."""
        persona = parse_persona(text)
        if len(persona.description) > MAX_PERSONA_CHARS:
            return f"That persona is too long; keep it under {MAX_PERSONA_CHARS} characters."
        model = await self.models.get("character")
        budget = int(model.n_ctx * PERSONA_SHARE)

        def count(words: str) -> int:
            return len(model.tokenize(words.encode("utf-8"), False, False))

        async with self.queues.turn(key, arrival):
            conv = await self.conversations.get(platform, key)
            if not personas_on(conv) and persona.description:
                return "Personas are switched off in this conversation (an admin can turn them on)."
            stored = stored_personas(conv)
            if not persona.description:
                stored.pop(user_id, None)
            else:
                if user_id not in stored and len(stored) >= MAX_PERSONAS:
                    return f"This conversation has {MAX_PERSONAS} personas already: too many."
                stored[user_id] = {"name": persona.name, "description": persona.description}
                pairs = [
                    (str(p.get("name") or "A player"), str(p.get("description", "")))
                    for p in stored.values()
                ]
                every = personas_text(pairs, 10**9, count)
                if await asyncio.to_thread(count, every) > budget:
                    return (
                        "There is no room for another persona here: the personas of a "
                        f"conversation may take {budget} tokens together. Shorten yours."
                    )
            await self.conversations.update_settings(conv, personas=stored or None)
        if not persona.description:
            return "Your persona here is cleared."
        who = f" as {persona.name}" if persona.name else ""
        return f"Persona set: you play{who} in this conversation."

    async def clear_persona(
        self, platform: str, key: str, name: str, *, admin: bool, arrival: Arrival | None = None
    ) -> str:
        """Clear the persona called ``name`` (or of the player called so): for admins."""
        if not admin:
            if arrival is not None:
                arrival.settle()
            return "Only admins can clear another player's persona."
        wanted = clean_name(name).lower()
        async with self.queues.turn(key, arrival):
            conv = await self.conversations.get(platform, key)
            stored = stored_personas(conv)
            players = {uid: n for uid, n in conv.settings.get("players") or []}
            gone = [
                uid
                for uid, p in stored.items()
                if str(p.get("name") or "").lower() == wanted
                or str(players.get(uid, "")).lower() == wanted
            ]
            if not gone:
                return "No persona here goes by that name."
            for uid in gone:
                stored.pop(uid)
            await self.conversations.update_settings(conv, personas=stored or None)
        return "Persona cleared."

    async def switch_personas(
        self, platform: str, key: str, *, on: bool, arrival: Arrival | None = None
    ) -> str:
        async with self.queues.turn(key, arrival):
            conv = await self.conversations.get(platform, key)
            await self.conversations.update_settings(conv, personas_off=None if on else True)
        return "Personas are on here." if on else "Personas are off here; none reach the prompt."

    # -- what is kept ---------------------------------------------------------------------------

    async def report(self, platform: str, key: str) -> str:
        """What /memory shows: the summary of what the window moved past, and the facts."""
        conv = await self.conversations.get(platform, key)
        facts = [str(f) for f in conv.settings.get("facts") or []]
        found = await self.memory.summaries(key, conv.id, conv.reset_after_id)
        parts = []
        if found:
            parts.append(f"Summary of earlier messages:\n{found[0].text}")
        elif self.settings.memory_budget > 0:
            parts.append("No summary yet: I write one once the conversation outgrows my window.")
        else:
            parts.append("Summaries are turned off here.")
        if note := conv.settings.get("note"):
            parts.append(f"Author's note: {note}")
        if facts:
            parts.append("Pinned facts:\n" + "\n".join(f"{i}. {f}" for i, f in enumerate(facts, 1)))
        else:
            parts.append("No pinned facts; /remember <fact> pins one.")
        return "\n\n".join(parts)
