"""What users and admins ask of a conversation besides an answer: mode, character and cast,
world book, reset, greetings.

Each action that changes a conversation takes the conversation's turn like a message does: it
acts after the answers queued before it, and what arrived after it happens under its effect.
Who may ask for what is the command layer's business (:mod:`chat.commands`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from chat.conversations import Conversations
from chat.messages import OutgoingReply
from chat.prompt.history import HistoryCache
from chat.prompt.memory import MemoryKeeper
from chat.queues import Arrival, Queues
from chat.roleplay.characters import Character, CharacterLibrary, apply_macros
from chat.roleplay.lorebook import Lorebook
from chat.settings import Mode
from storage.records import ASSISTANT, Conversation, StoredMessage
from storage.store import Store

MAX_CAST = 8  # characters in one scene; further names are ignored


class Actions:
    """Conversation settings that take the conversation's turn."""

    def __init__(
        self,
        store: Store,
        conversations: Conversations,
        queues: Queues,
        history: HistoryCache,
        memory: MemoryKeeper,
        characters: CharacterLibrary,
        world_books: Mapping[str, Lorebook],
    ) -> None:
        self.store = store
        self.conversations = conversations
        self.queues = queues
        self.history = history
        self.memory = memory
        self.characters = characters
        self.world_books = world_books

    async def set_mode(
        self, platform: str, key: str, mode: Mode, arrival: Arrival | None = None
    ) -> Conversation:
        async with self.queues.turn(key, arrival):
            conv = await self.conversations.get(platform, key)
            return await self.conversations.set_mode(conv, mode)

    async def set_character(
        self, platform: str, key: str, name: str, arrival: Arrival | None = None
    ) -> Character | None:
        """Give the conversation the named character; None (and no change) if it is unknown."""
        cast = await self.set_cast(platform, key, [name], arrival)
        return cast[0] if cast else None

    async def set_cast(
        self, platform: str, key: str, names: list[str], arrival: Arrival | None = None
    ) -> list[Character] | None:
        """Put one or several characters in the channel's scene; None if a name is unknown."""
        names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))[:MAX_CAST]
        found = [self.characters.find(n) for n in names]
        if not found or any(c is None for c in found):
            if arrival is not None:
                arrival.settle()
            return None
        cast = [c for c in found if c is not None]
        async with self.queues.turn(key, arrival):
            conv = await self.conversations.get(platform, key)
            conv = await self.conversations.set_character(conv, cast[0].name)
            await self.conversations.update_settings(
                conv, cast=[c.name for c in cast] if len(cast) > 1 else None, opened=None
            )
        return cast

    async def attach_world_book(
        self, platform: str, key: str, name: str | None, arrival: Arrival | None = None
    ) -> bool:
        """Give a channel a world book (None detaches it); False if no such book exists."""
        if name is not None and name.lower() not in self.world_books:
            if arrival is not None:
                arrival.settle()
            return False
        async with self.queues.turn(key, arrival):
            conv = await self.conversations.get(platform, key)
            await self.conversations.update_settings(conv, world_book=name)
        return True

    async def character_of(self, platform: str, key: str) -> Character:
        return self.conversations.cast_of(await self.conversations.get(platform, key))[0]

    async def reset(self, platform: str, key: str, arrival: Arrival | None = None) -> None:
        """Start afresh: earlier messages stay stored but no longer reach the model; the
        players, their personas and the summaries start afresh too.

        The boundary is where the command arrived: a message that arrived after it belongs to
        the new conversation even when it is stored while earlier answers are still being
        written, and those answers (to messages before it) do not.
        """
        async with arrival or self.queues.arrive(key):
            conv = await self.conversations.get(platform, key)
            boundary = await self.store.messages.last_id(conv.id)
            ticket = self.queues.ticket(key)
        try:
            await ticket.wait()
            await self.store.conversations.reset(conv.id, boundary)
            self.history.forget(key)
            self.memory.forget(key)
            conv = await self.conversations.get(platform, key)
            conv = self.conversations.keep(
                replace(conv, reset_after_id=boundary, window_start_id=0)
            )
            await self.conversations.update_settings(
                conv, opened=None, summary_id=None, players=None, personas=None
            )
        finally:
            ticket.release()

    # -- greetings and versions ---------------------------------------------------------------

    async def open_scene(
        self, platform: str, key: str, is_dm: bool, user: str = "you"
    ) -> OutgoingReply | None:
        """Post the character's greeting if this roleplay conversation has not started yet."""
        conv = await self.conversations.get(platform, key)
        if self.conversations.mode_of(conv, is_dm) != "roleplay" or conv.settings.get("opened"):
            return None
        return await self.open(conv, is_dm, user)

    async def open(self, conv: Conversation, is_dm: bool, user: str) -> OutgoingReply | None:
        """The scene's greeting, stored with its alternatives (offered as swipes)."""
        char = self.conversations.cast_of(conv)[0]
        greetings = [apply_macros(g, char.display_name, user) for g in char.greetings(not is_dm)]
        conv = await self.conversations.update_settings(conv, opened=True)
        if not greetings:
            return None
        first = await self.history.save(
            conv, StoredMessage(0, ASSISTANT, greetings[0], author_name=char.name)
        )
        for alternative in greetings[1:]:
            await self.history.save(
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
        conv = await self.conversations.get(platform, key)
        if self.conversations.mode_of(conv, is_dm) == "roleplay":
            char = self.conversations.cast_of(conv)[0]
            text = char.greeting or f"*{char.display_name} looks up and smiles.*"
            return OutgoingReply(
                key, apply_macros(text, char.display_name, "you"), final=True, speaker=char.name
            )
        text = (
            "Hello! I am the office assistant. Ask me anything: drafts, summaries, plans. "
            "Send /help for the commands."
        )
        return OutgoingReply(key, text, final=True)

    async def who_am_i(self, platform: str, key: str, is_dm: bool) -> str:
        """One sentence: this conversation's mode and who answers in it."""
        conv = await self.conversations.get(platform, key)
        if self.conversations.mode_of(conv, is_dm) == "roleplay":
            names = ", ".join(c.display_name for c in self.conversations.cast_of(conv))
            return f"I play {names} (roleplay mode)."
        return "I am the office assistant here (work mode)."
