"""``/continue``: the last reply grows in place, without a new turn.

The prompt is the one that reply answered, followed by the reply's own tokens (as generated,
when they are remembered), so llama.cpp reuses everything evaluated and only decodes on.  The
stored reply's text grows, and adapters edit the platform messages that show it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace

from ai_model.base import ModelError
from chat.answers import ModelProvider
from chat.conversations import Conversations
from chat.delivery import STILL_SENDING
from chat.messages import OutgoingReply, notice
from chat.prompt.building import PromptBuilder
from chat.prompt.history import HistoryCache
from chat.prompt.memory import MemoryKeeper
from chat.prompt.window import PromptTooLong
from chat.queues import Arrival, Queues
from chat.roleplay.characters import Character, CharacterLibrary
from chat.settings import ROLE_FOR_MODE
from chat.turn_texts import APOLOGY, trace_wanted
from storage.records import Conversation, StoredMessage
from storage.store import STORAGE_ERRORS, Store

log = logging.getLogger(__name__)


def _cut(more: str, char: Character | None, others: Sequence[str]) -> str:
    """A continuation as users see it: in roleplay, cut where another speaker's lines start."""
    if char is None:
        return more
    names = [n for n in others if n and n.lower() != char.display_name.lower()]
    if not names:
        return more
    tag = re.compile(
        r"\n[ \t]*[*_]*(?:" + "|".join(re.escape(n) for n in names) + r")[*_]*[ \t]*:",
        re.IGNORECASE,
    )
    match = tag.search(more)
    return more[: match.start()] if match else more


class Continuation:
    """The /continue command of the engine."""

    def __init__(
        self,
        store: Store,
        models: ModelProvider,
        conversations: Conversations,
        queues: Queues,
        prompts: PromptBuilder,
        history: HistoryCache,
        memory: MemoryKeeper,
        characters: CharacterLibrary,
        shown: Callable[[StoredMessage], Awaitable[bool]],
    ) -> None:
        self.shown = shown  # waits until a stored reply reached the platform
        self.store = store
        self.models = models
        self.conversations = conversations
        self.queues = queues
        self.prompts = prompts
        self.history = history
        self.memory = memory
        self.characters = characters

    def continue_reply(
        self,
        platform: str,
        key: str,
        is_dm: bool,
        user_id: str | None = None,
        arrival: Arrival | None = None,
    ) -> AsyncIterator[OutgoingReply]:
        """Extend the last reply in place (/continue): no new turn; the model goes on from the
        reply's last token, reusing what is evaluated, and the stored reply grows.  The reply
        is chosen in the conversation's turn; snapshots carry the whole text and the platform
        messages that show it (``replaces``), so adapters edit those and add one when it
        outgrows the limit."""
        work = self._continue_last(platform, key, is_dm)
        return self.queues.in_turn(platform, key, user_id, work, arrival)

    async def _continue_last(
        self, platform: str, key: str, is_dm: bool
    ) -> AsyncGenerator[OutgoingReply, None]:
        conv = await self.conversations.get(platform, key)
        last = await self.store.messages.last_reply(conv.id, after_id=conv.reset_after_id)
        if last is None or last.reply_to_id is None:
            yield notice(key, "There is no reply of mine to continue yet.")
            return
        if not await self.shown(last):
            yield notice(key, STILL_SENDING)
            return
        async for reply in self._continue(conv, last, is_dm):
            yield reply

    async def _continue(
        self, conv: Conversation, last: StoredMessage, is_dm: bool
    ) -> AsyncIterator[OutgoingReply]:
        key = conv.key
        char = self.characters.find(last.author_name) if last.author_name else None
        mode = self.conversations.mode_of(conv, is_dm)
        sampling = self.prompts.sampling(mode, char)
        showing = tuple(await self.store.replies.pieces_of(last.id))
        base = OutgoingReply(
            key,
            last.text,
            speaker=last.author_name,
            stored_id=last.id,
            replaces=showing,
            grows=True,
        )
        role = ROLE_FOR_MODE[mode]
        more = ""
        try:
            model = await self.models.get(role)
            encoder = self.prompts.encoder(model)
            named = char is not None and len(self.conversations.cast_of(conv)) > 1
            content = await asyncio.to_thread(encoder.content, last, named)
            reserve = sampling.max_tokens + len(content)
            built = await self.prompts.build(
                conv, model, last.reply_to_id or last.id, char, reserve, replacing=last.swipe_group
            )
            others = [s.strip("\n:") for s in built.stops]
            async with self.memory.replying(key, role):
                tokens = [*built.tokens, *content]
                async for piece in model.stream(tokens, sampling, built.stops, slot=key):
                    more += piece
                    yield replace(base, text=last.text + _cut(more, char, others), delta=piece)
        except PromptTooLong:
            yield notice(key, "My last reply is too long to continue in my window.")
            return
        except (ModelError, RuntimeError, *STORAGE_ERRORS) as exc:
            log.error("continuing the reply failed in %s: %s", key, exc, exc_info=trace_wanted(exc))
            if more:  # the reply shows what it showed before, then the apology
                yield replace(base, final=True)
            yield notice(key, APOLOGY)
            return
        more = _cut(more, char, others).rstrip()
        if not more.strip():
            yield notice(key, "I have nothing to add to my last reply.")
            return
        text = last.text + more
        generated = model.generated(key)
        try:
            tokens_of_reply = len(content) + len(generated or model.tokenize(more.encode(), False))
            await self.store.messages.update(last.id, text=text, token_count=tokens_of_reply)
        except STORAGE_ERRORS as exc:
            log.error("could not store the continued reply in %s: %s", key, exc)
            yield replace(base, final=True)
            yield notice(key, APOLOGY)
            return
        grown = replace(last, text=text, token_count=tokens_of_reply)
        self.history.replaced(key, grown)
        if generated and not named and model.detokenize(generated).rstrip() == more:
            encoder.remember_reply(grown, [*content, *generated])
        yield replace(base, text=text, final=True)
