"""``/summarize [count]`` in work channels: what was said, map-reduced over the window.

The messages (the last ``count``, or by default everything since the bot last spoke; at most
:data:`MAX_MESSAGES`) are cut into chunks that each fit the window with room for an answer.
Each chunk is summarized on its own (map), then the partial summaries are merged, in rounds
while they do not fit together (reduce); the last merge streams like a reply.  Nothing of it is
stored: the summary describes the conversation, it does not take part in it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from ai_model.base import ChatModel, ModelError
from ai_model.config import SamplingSettings
from chat.answers import ModelProvider
from chat.conversations import Conversations
from chat.messages import OutgoingReply, notice
from chat.prompt.memory import (
    MemoryKeeper,
    chunk_lines,
    generate,
    instructed_prompt,
    transcript_line,
)
from chat.queues import Arrival, Queues
from storage.records import Conversation, StoredMessage
from storage.store import STORAGE_ERRORS, Store

log = logging.getLogger(__name__)

MAX_MESSAGES = 500
PART_TOKENS = 200  # the length of one partial summary
MAX_ROUNDS = 4
FINAL_TOKENS = 400
MAP = (
    "Summarize this part of a team chat in a few short bullet points: decisions, who owns "
    "what, open questions, names, numbers and dates. Write only the bullet points."
)
REDUCE = (
    "Merge these notes on a team chat into one clear summary in bullet points: decisions, "
    "who owns what, open questions, names, numbers and dates. Write only the summary."
)


class Summaries:
    """The /summarize command of the engine."""

    def __init__(
        self,
        store: Store,
        models: ModelProvider,
        conversations: Conversations,
        queues: Queues,
        memory: MemoryKeeper,
    ) -> None:
        self.store = store
        self.models = models
        self.conversations = conversations
        self.queues = queues
        self.memory = memory

    async def summarize(
        self,
        platform: str,
        key: str,
        is_dm: bool,
        user_id: str | None,
        count: str = "",
        arrival: Arrival | None = None,
    ) -> AsyncIterator[OutgoingReply]:
        """Stream a summary of recent messages (work mode); notices say why not otherwise."""
        conv = await self.conversations.get(platform, key)
        refusal = None
        count = count.strip()
        if self.conversations.mode_of(conv, is_dm) != "work":
            refusal = "/summarize is for work conversations (see /mode)."
        elif count and (not count.isdigit() or not 1 <= int(count) <= MAX_MESSAGES):
            refusal = f"Give a number of messages from 1 to {MAX_MESSAGES}."
        if refusal is not None:
            if arrival is not None:
                arrival.settle()
            yield notice(key, refusal)
            return
        work = self._summary(conv, count)
        async for reply in self.queues.in_turn(platform, key, user_id, work, arrival):
            yield reply

    async def _summary(self, conv: Conversation, count: str) -> AsyncGenerator[OutgoingReply, None]:
        key = conv.key
        try:
            messages = await self._to_summarize(conv.id, conv.reset_after_id, count)
        except STORAGE_ERRORS as exc:
            log.error("could not read the messages of %s to summarize: %s", key, exc)
            yield notice(key, "I could not read the messages; try again in a moment.")
            return
        if not messages:
            yield notice(key, "There is nothing new to summarize since my last reply.")
            return
        async for reply in self._map_reduce(key, [transcript_line(m) for m in messages]):
            yield reply

    async def _to_summarize(
        self, conversation_id: int, reset: int, count: str
    ) -> list[StoredMessage]:
        if count:
            return await self.store.messages.recent(conversation_id, reset, int(count))
        last = await self.store.messages.last_reply(conversation_id, after_id=reset)
        since = max(reset, last.id if last is not None else 0)
        return await self.store.messages.recent(conversation_id, since, MAX_MESSAGES)

    async def _map_reduce(self, key: str, lines: list[str]) -> AsyncIterator[OutgoingReply]:
        text = ""
        merged = False
        try:
            model = await self.models.get("office")
            room = max(64, model.n_ctx - FINAL_TOKENS - 300)
            # Tokenizing huge or hostile messages takes a while: never on the event loop.
            parts = await asyncio.to_thread(chunk_lines, model, lines, room)
            async with self.memory.replying(key, "office"):
                for _ in range(MAX_ROUNDS):  # map, then reduce in rounds, to one part
                    if len(parts) == 1:
                        break
                    notes = [await self._generate(model, MAP, "\n".join(p), room) for p in parts]
                    noted = [n for n in notes if n] or ["(none)"]
                    parts = await asyncio.to_thread(chunk_lines, model, noted, room)
                    merged = True
                parts = parts[-1:]  # a tiny window may not merge all: the newest notes win
                instructions = REDUCE if merged else MAP
                content = "\n".join(parts[0])
                tokens = await asyncio.to_thread(instructed_prompt, model, instructions, content)
                # The answer gets what the window leaves, at most FINAL_TOKENS.
                room = min(FINAL_TOKENS, model.n_ctx - len(tokens) - 1)
                if room < 16:
                    raise ModelError("the summary prompt leaves no room for the answer")
                sampling = SamplingSettings(max_tokens=room, temperature=0.3, seed=5)
                async for piece in model.stream(tokens, sampling):
                    text += piece
                    yield OutgoingReply(key, text, delta=piece)
        except (ModelError, RuntimeError) as exc:
            log.error("summarizing %s failed: %s", key, exc)
            yield notice(key, "Sorry, I could not write the summary; try again later.")
            return
        yield OutgoingReply(key, text.strip() or "(nothing to summarize)", final=True)

    async def _generate(self, model: ChatModel, instructions: str, content: str, room: int) -> str:
        # Notes shorter than a quarter of the room: each round merges at least four parts.
        return await generate(model, instructions, content, max(16, min(PART_TOKENS, room // 4)), 5)
