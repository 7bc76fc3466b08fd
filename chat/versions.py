"""Other versions of the last reply: /regenerate writes one, /swipe brings back another.

Both pick their target in the conversation's turn, after the answers queued before them, and
write into the platform messages that show it (platforms that edit in place do).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

from chat.answers import Answers
from chat.conversations import Conversations
from chat.delivery import STILL_SENDING, Delivery
from chat.messages import OutgoingReply, notice
from chat.prompt.history import HistoryCache
from chat.queues import Arrival, Queues
from chat.roleplay.characters import CharacterLibrary
from storage.store import Store


class Versions:
    """/regenerate and /swipe."""

    def __init__(
        self,
        store: Store,
        conversations: Conversations,
        queues: Queues,
        history: HistoryCache,
        characters: CharacterLibrary,
        answers: Answers,
        delivery: Delivery,
    ) -> None:
        self.store = store
        self.conversations = conversations
        self.queues = queues
        self.history = history
        self.characters = characters
        self.answers = answers
        self.delivery = delivery

    def regenerate(
        self,
        platform: str,
        key: str,
        is_dm: bool,
        user_id: str | None = None,
        arrival: Arrival | None = None,
    ) -> AsyncIterator[OutgoingReply]:
        """Write the last reply again, in its own platform messages; earlier versions stay
        stored for /swipe.  The old version stays the one in context until the new one is
        stored, in the same write that switches them.  ``user_id`` (who asked) is held to the
        fair-share limits."""
        work = self._regenerate_last(platform, key, is_dm)
        return self.queues.in_turn(platform, key, user_id, work, arrival)

    async def _regenerate_last(
        self, platform: str, key: str, is_dm: bool
    ) -> AsyncGenerator[OutgoingReply, None]:
        conv = await self.conversations.get(platform, key)
        last = await self.store.messages.last_reply(conv.id, after_id=conv.reset_after_id)
        if last is None:
            yield notice(key, "There is no reply of mine to regenerate yet.")
            return
        if last.reply_to_id is None:  # a greeting: its versions come from the card
            yield await self.swipe_in_turn(platform, key, 1)
            return
        if not await self.delivery.shown(last):
            yield notice(key, STILL_SENDING)
            return
        char = self.characters.find(last.author_name) if last.author_name else None
        mode = self.conversations.mode_of(conv, is_dm)
        async for reply in self.answers.answer(
            key, platform, mode, last.reply_to_id, char, None, version_of=last
        ):
            yield reply

    async def swipe(
        self, platform: str, key: str, step: int = 1, arrival: Arrival | None = None
    ) -> OutgoingReply:
        """Bring back another stored version of the last reply (or greeting), in the messages
        that show it; the target is chosen in the conversation's turn."""
        async with self.queues.turn(key, arrival):
            return await self.swipe_in_turn(platform, key, step)

    async def swipe_in_turn(self, platform: str, key: str, step: int) -> OutgoingReply:
        """:meth:`swipe`, for a caller that holds the conversation's turn."""
        conv = await self.conversations.get(platform, key)
        last = await self.store.messages.last_reply(conv.id, after_id=conv.reset_after_id)
        if last is None:
            return notice(key, "There is no reply of mine yet.")
        versions = await self.store.messages.versions(conv.id, last.swipe_group)
        if len(versions) < 2:
            return notice(key, "There is only one version; /regenerate writes another.")
        if not await self.delivery.shown(last):
            return notice(key, STILL_SENDING)
        index = next(i for i, v in enumerate(versions) if v.id == last.id)
        chosen = versions[(index + step) % len(versions)]
        showing = tuple(await self.store.replies.pieces_of(last.id))
        await self.store.messages.choose_version(conv.id, last.swipe_group, chosen.id)
        self.history.forget(key)
        return OutgoingReply(
            key,
            chosen.text,
            final=True,
            speaker=chosen.author_name,
            swipe=(versions.index(chosen) + 1, len(versions)),
            stored_id=chosen.id,
            replaces=showing,
        )
