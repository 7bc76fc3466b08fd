"""Conversation commands: mode, character and cast, reset, greetings and swipes, the library.

Each command that changes a conversation takes the conversation's turn like a message does: it
acts after the answers queued before it, and messages sent after it are answered under its
effect.  Changing the shared library (cards, world books) is for bot owners; the adapters check.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from chat.roleplay.characters import Character, apply_macros
from chat.conversations import ConversationState
from chat.roleplay.library import Imported
from chat.roleplay.lorebook import Lorebook
from chat.prompt.memory import MAX_FACT_CHARS, MAX_FACTS, MAX_NOTE_CHARS
from chat.messages import OutgoingReply, ReplyKind
from chat.prompt.window import clean_name
from chat.settings import Mode
from storage.records import ASSISTANT, Conversation, StoredMessage

MAX_CAST = 8  # characters in one scene; further names are ignored
MAX_PERSONA_CHARS = 500
MAX_PERSONA_NAME_CHARS = 40
MAX_PERSONAS = 64  # per conversation


@dataclass(frozen=True, slots=True)
class Persona:
    """Who a player plays in one conversation (/persona): a name (optional) and a description."""

    name: str | None
    description: str


def personas_of(conv: Conversation) -> dict[str, Persona]:
    """The conversation's personas by the player's platform user id."""
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


class ConversationCommands(ConversationState):
    """What users and admins ask of a conversation besides an answer."""

    async def load_library(self) -> None:
        await self.library.load()

    async def import_card(self, card: dict[str, object], *, replace: bool = False) -> Imported:
        """Check and store a parsed card (any version); :class:`CardError` says why not."""
        model = await self.models.get("character")
        reserve = self.settings.models["character"].sampling.max_tokens
        return await self.library.import_card(
            card, replace=replace, model=model, encoder=self._encoder(model), reserve=reserve
        )

    async def import_world_book(self, name: str, book: dict[str, object]) -> Lorebook:
        return await self.library.import_world_book(name, book)

    async def attach_world_book(self, platform: str, key: str, name: str | None) -> bool:
        """Give a channel a world book (None detaches it); False if no such book exists."""
        if name is not None and name.lower() not in self.world_books:
            return False
        async with self._turn(key):
            await self._update_settings(platform, key, world_book=name)
        return True

    async def set_mode(self, platform: str, key: str, mode: Mode) -> Conversation:
        async with self._turn(key):
            conv = await self.conversation(platform, key)
            await self.store.set_mode(conv.id, mode)
            conv = self._conversations[key] = replace(conv, mode=mode)
        return conv

    async def set_character(self, platform: str, key: str, name: str) -> Character | None:
        """Give the conversation the named character; None (and no change) if it is unknown."""
        async with self._turn(key):
            return await self._set_character(platform, key, name)

    async def _set_character(self, platform: str, key: str, name: str) -> Character | None:
        char = self.characters.find(name)
        if char is None:
            return None
        conv = await self.conversation(platform, key)
        await self.store.set_character(conv.id, char.name)
        self._conversations[key] = replace(conv, character=char.name)
        await self._update_settings(platform, key, cast=None, opened=None)
        return char

    async def set_cast(self, platform: str, key: str, names: list[str]) -> list[Character] | None:
        """Put several characters in the channel's scene; None if a name is unknown."""
        names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))[:MAX_CAST]
        found = [self.characters.find(n) for n in names]
        if not found or any(c is None for c in found):
            return None
        cast = [c for c in found if c is not None]
        async with self._turn(key):
            await self._set_character(platform, key, cast[0].name)
            await self._update_settings(platform, key, cast=[c.name for c in cast])
        return cast

    async def character_of(self, platform: str, key: str) -> Character:
        return self.cast_of(await self.conversation(platform, key))[0]

    async def reset(self, platform: str, key: str) -> None:
        """Start afresh: earlier messages stay stored but no longer reach the model.

        The boundary is where the command arrived: a message sent after it belongs to the new
        conversation even when it is stored while earlier answers are still being written, and
        those answers (to messages before it) do not.
        """
        channel = self._channel(key)
        async with channel.intake:
            conv = await self.conversation(platform, key)
            boundary = await self.store.last_message_id(conv.id)
            ticket = self._ticket(key)
        try:
            await ticket.wait()
            await self.store.reset(conv.id, boundary)
            self.history.forget(key)
            self.memory.forget(key)
            conv = self._conv(key)
            self._conversations[key] = replace(conv, reset_after_id=boundary, window_start_id=0)
            await self._update_settings(platform, key, opened=None, summary_id=None)
        finally:
            ticket.release()

    # -- memory ---------------------------------------------------------------------------------

    async def remember(self, platform: str, key: str, fact: str) -> str:
        """Pin a fact to the conversation's memory; the answer says what happened."""
        fact = " ".join(fact.split())
        if not fact:
            return "Tell me what to remember: /remember <fact>."
        if len(fact) > MAX_FACT_CHARS:
            return f"That is too long to pin; keep a fact under {MAX_FACT_CHARS} characters."
        async with self._turn(key):
            conv = await self.conversation(platform, key)
            facts = [str(f) for f in conv.settings.get("facts") or []]
            if fact in facts:
                return f"I already remember that (fact {facts.index(fact) + 1})."
            if len(facts) >= MAX_FACTS:
                return f"I already keep {MAX_FACTS} facts here; /forget one first."
            await self._update_settings(platform, key, facts=[*facts, fact])
        return f"I will remember that (fact {len(facts) + 1}). /memory shows everything I keep."

    async def forget_fact(self, platform: str, key: str, number: str) -> str:
        """Unpin fact ``number`` (1-based, as /memory lists them)."""
        async with self._turn(key):
            conv = await self.conversation(platform, key)
            facts = [str(f) for f in conv.settings.get("facts") or []]
            if not number.strip().isdigit() or not 1 <= int(number) <= len(facts):
                if not facts:
                    return "I keep no pinned facts here."
                return f"Give the number of a fact, from 1 to {len(facts)} (/memory lists them)."
            gone = facts.pop(int(number) - 1)
            await self._update_settings(platform, key, facts=facts or None)
        return f"Forgotten: {gone}"

    async def set_note(self, platform: str, key: str, note: str) -> str:
        """Set the author's note (empty: clear it); it sits ``note_depth`` messages from the
        end of every prompt until changed."""
        note = " ".join(note.split())
        if len(note) > MAX_NOTE_CHARS:
            return f"That note is too long; keep it under {MAX_NOTE_CHARS} characters."
        async with self._turn(key):
            await self._update_settings(platform, key, note=note or None)
        if not note:
            return "Author's note cleared."
        depth = self.settings.note_depth
        return f"Author's note set; it steers every reply from {depth} messages before the end."

    async def set_persona(self, platform: str, key: str, user_id: str, text: str) -> str:
        """Set (empty: clear) who ``user_id`` plays in this conversation."""
        persona = parse_persona(text)
        if len(persona.description) > MAX_PERSONA_CHARS:
            return f"That persona is too long; keep it under {MAX_PERSONA_CHARS} characters."
        async with self._turn(key):
            conv = await self.conversation(platform, key)
            stored = dict(conv.settings.get("personas") or {})
            if not persona.description:
                stored.pop(user_id, None)
            elif user_id not in stored and len(stored) >= MAX_PERSONAS:
                return "This conversation has too many personas already."
            else:
                stored[user_id] = {"name": persona.name, "description": persona.description}
            await self._update_settings(platform, key, personas=stored or None)
        if not persona.description:
            return "Your persona here is cleared."
        who = f" as {persona.name}" if persona.name else ""
        return f"Persona set: you play{who} in this conversation."

    async def memory_report(self, platform: str, key: str) -> str:
        """What /memory shows: the summary of what the window moved past, and the facts."""
        conv = await self.conversation(platform, key)
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

    async def who_am_i(self, platform: str, key: str, is_dm: bool) -> str:
        """One sentence: this conversation's mode and who answers in it."""
        conv = await self.conversation(platform, key)
        if self.mode_of(conv, is_dm) == "roleplay":
            names = ", ".join(c.display_name for c in self.cast_of(conv))
            return f"I play {names} (roleplay mode)."
        return "I am the office assistant here (work mode)."

    async def help_text(self, platform: str, key: str, is_dm: bool) -> str:
        who = await self.who_am_i(platform, key, is_dm)
        return (
            f"{who}\n"
            "Commands:\n"
            "  /mode roleplay|work  switch this conversation's mode\n"
            "  /character [name]    show or choose the character\n"
            "  /regenerate          write my last reply again (earlier versions are kept)\n"
            "  /swipe [back]        show the next (or previous) version of my last reply\n"
            "  /reset               start a fresh conversation (history stays stored)\n"
            "  /memory              what I remember beyond my window\n"
            "  /remember <fact>     pin a fact I must keep in mind\n"
            "  /forget <n>          unpin fact n\n"
            "  /note [text]         set (or clear) the author's note that steers replies\n"
            "  /persona [Name: who] who you play here (empty: clear)\n"
            "  /continue            make my last reply longer\n"
            "  /summarize [count]   sum up the last messages (work mode)\n"
            "  /help                this text"
        )

    async def remember_platform_id(self, stored_id: int, platform_message_id: str) -> None:
        """Record which platform message shows a stored reply (so it can be edited later)."""
        await self.store.update_message(stored_id, platform_message_id=platform_message_id)

    async def last_reply_message_id(self, platform: str, key: str) -> str | None:
        """The platform message showing the newest reply in context, if known."""
        conv = await self.conversation(platform, key)
        last = await self.store.last_reply(conv.id, after_id=conv.reset_after_id)
        return last.platform_message_id if last is not None else None

    async def open_scene(
        self, platform: str, key: str, is_dm: bool, user: str = "you"
    ) -> OutgoingReply | None:
        """Post the character's greeting if this roleplay conversation has not started yet."""
        conv = await self.conversation(platform, key)
        if self.mode_of(conv, is_dm) != "roleplay" or conv.settings.get("opened"):
            return None
        return await self._open(conv, is_dm, user)

    async def _open(self, conv: Conversation, is_dm: bool, user: str) -> OutgoingReply | None:
        char = self.cast_of(conv)[0]
        greetings = [apply_macros(g, char.display_name, user) for g in char.greetings(not is_dm)]
        await self._update_settings(conv.platform, conv.key, opened=True)
        if not greetings:
            return None
        first = await self._store(
            conv, StoredMessage(0, ASSISTANT, greetings[0], author_name=char.name)
        )
        for alternative in greetings[1:]:  # offered as swipes
            await self._store(
                conv,
                StoredMessage(
                    0,
                    ASSISTANT,
                    alternative,
                    author_name=char.name,
                    in_context=False,
                    swipe_of=first.id,
                ),
            )
        return OutgoingReply(
            conv.key,
            greetings[0],
            final=True,
            speaker=char.name,
            swipe=(1, len(greetings)) if len(greetings) > 1 else None,
        )

    async def greeting(self, platform: str, key: str, is_dm: bool) -> OutgoingReply:
        """What /start says: the character's greeting in roleplay, an introduction otherwise."""
        opened = await self.open_scene(platform, key, is_dm)
        if opened is not None:
            return opened
        conv = await self.conversation(platform, key)
        if self.mode_of(conv, is_dm) == "roleplay":
            char = self.cast_of(conv)[0]
            text = char.greeting or f"*{char.display_name} looks up and smiles.*"
            return OutgoingReply(
                key, apply_macros(text, char.display_name, "you"), final=True, speaker=char.name
            )
        text = (
            "Hello! I am the office assistant. Ask me anything: drafts, summaries, plans. "
            "Send /help for the commands."
        )
        return OutgoingReply(key, text, final=True)

    async def swipe(self, platform: str, key: str, step: int = 1) -> OutgoingReply:
        """Bring back another stored version of the last reply (or greeting)."""
        async with self._turn(key):
            return await self._swipe(platform, key, step)

    async def _swipe(self, platform: str, key: str, step: int) -> OutgoingReply:
        conv = await self.conversation(platform, key)
        last = await self.store.last_reply(conv.id, after_id=conv.reset_after_id)
        if last is None:
            return OutgoingReply(
                key, "There is no reply of mine yet.", final=True, kind=ReplyKind.NOTICE
            )
        versions = await self.store.swipes(conv.id, last.swipe_group)
        if len(versions) < 2:
            return OutgoingReply(
                key,
                "There is only one version; /regenerate writes another.",
                final=True,
                kind=ReplyKind.NOTICE,
            )
        index = next(i for i, v in enumerate(versions) if v.id == last.id)
        chosen = versions[(index + step) % len(versions)]
        await self.store.choose_swipe(conv.id, last.swipe_group, chosen.id)
        self.history.forget(key)
        return OutgoingReply(
            key,
            chosen.text,
            final=True,
            speaker=chosen.author_name,
            swipe=(versions.index(chosen) + 1, len(versions)),
            stored_id=chosen.id,
        )
