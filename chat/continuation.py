"""``/continue``: the last reply grows in place, without a new turn.

The prompt is the one that reply answered, followed by the reply's own tokens (as generated,
when they are remembered), so llama.cpp reuses everything evaluated and only decodes on.  The
stored reply's text grows, and adapters edit the platform messages that show it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import replace

from ai_model.base import ModelError
from chat.roleplay.characters import Character
from chat.conversations import APOLOGY, trace_wanted
from chat.messages import OutgoingReply
from chat.prompt.window import PromptTooLong
from chat.prompt.building import PromptBuilding
from chat.settings import ROLE_FOR_MODE
from storage.records import Conversation, StoredMessage
from storage.store import STORAGE_ERRORS

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


class Continuation(PromptBuilding):
    """The /continue command of the core."""

    async def continue_reply(
        self, platform: str, key: str, is_dm: bool, user_id: str | None = None
    ) -> AsyncIterator[OutgoingReply]:
        """Extend the last reply in place (/continue): no new turn; the model goes on from the
        reply's last token, reusing what is evaluated, and the stored reply grows.  Snapshots
        carry the whole text, so adapters edit the reply's platform messages (see
        :meth:`last_reply_pieces`) and add one when it outgrows the limit."""
        work = self._continue_last(platform, key, is_dm)
        async for reply in self._in_turn(platform, key, user_id, work):
            yield reply

    async def _continue_last(
        self, platform: str, key: str, is_dm: bool
    ) -> AsyncGenerator[OutgoingReply, None]:
        conv = await self.conversation(platform, key)
        last = await self.store.last_reply(conv.id, after_id=conv.reset_after_id)
        if last is None or last.reply_to_id is None:
            yield self._notice(key, "There is no reply of mine to continue yet.")
            return
        async for reply in self._continue(conv, last, is_dm):
            yield reply

    async def _continue(
        self, conv: Conversation, last: StoredMessage, is_dm: bool
    ) -> AsyncIterator[OutgoingReply]:
        key = conv.key
        char = self.characters.find(last.author_name) if last.author_name else None
        mode = self.mode_of(conv, is_dm)
        sampling = self._sampling(mode, char)
        base = OutgoingReply(key, last.text, speaker=last.author_name, stored_id=last.id)
        more = ""
        try:
            model = await self.models.get(ROLE_FOR_MODE[mode])
            encoder = self._encoder(model)
            named = char is not None and len(self.cast_of(conv)) > 1
            content = await asyncio.to_thread(encoder.content, last, named)
            reserve = sampling.max_tokens + len(content)
            tokens, stops, conv = await self.build_prompt(
                conv, model, last.reply_to_id or last.id, char, reserve, replacing=last.swipe_group
            )
            others = [s.strip("\n:") for s in stops]
            async with self._generating(key, ROLE_FOR_MODE[mode]):
                async for piece in model.stream([*tokens, *content], sampling, stops, slot=key):
                    more += piece
                    shown = last.text + _cut(more, char, others)
                    yield replace(base, text=shown, delta=piece)
        except PromptTooLong:
            yield self._notice(key, "My last reply is too long to continue in my window.")
            return
        except (ModelError, RuntimeError, *STORAGE_ERRORS) as exc:
            log.error("continuing the reply failed in %s: %s", key, exc, exc_info=trace_wanted(exc))
            if more:  # the reply shows what it showed before, then the apology
                yield replace(base, final=True)
            yield self._notice(key, APOLOGY)
            return
        more = _cut(more, char, others).rstrip()
        if not more.strip():
            yield self._notice(key, "I have nothing to add to my last reply.")
            return
        text = last.text + more
        generated = model.generated(key)
        try:
            tokens_of_reply = len(content) + len(generated or model.tokenize(more.encode(), False))
            await self.store.update_message(last.id, text=text, token_count=tokens_of_reply)
        except STORAGE_ERRORS as exc:
            log.error("could not store the continued reply in %s: %s", key, exc)
            yield replace(base, final=True)
            yield self._notice(key, APOLOGY)
            return
        grown = replace(last, text=text, token_count=tokens_of_reply)
        self.history.replaced(key, grown)
        if generated and not named and model.detokenize(generated).rstrip() == more:
            self._encoder(model).remember_reply(grown, [*content, *generated])
        yield replace(base, text=text, final=True)

    async def last_reply_pieces(self, platform: str, key: str) -> list[str]:
        """The platform messages showing the newest reply in context (/continue edits them)."""
        conv = await self.conversation(platform, key)
        last = await self.store.last_reply(conv.id, after_id=conv.reset_after_id)
        return await self.store.pieces_of(last.id) if last is not None else []
