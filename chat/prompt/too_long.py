"""What a message gets when its prompt cannot fit the model's window."""

from __future__ import annotations

import logging

from ai_model.base import ChatModel
from chat.prompt.assembly import pinned_limit
from chat.prompt.history import HistoryCache
from chat.prompt.window import PromptTooLong
from storage.records import NOTICE, Conversation
from storage.store import Store

log = logging.getLogger(__name__)


async def too_long(
    store: Store,
    history: HistoryCache,
    conv: Conversation,
    model: ChatModel,
    user_id: int,
    exc: PromptTooLong,
) -> str:
    """The notice for message ``user_id``, stored as the conversation's answer to it.

    A message that would fit any sound set-up stays in the conversation (the character, its
    lore or persona take the room); one that could never fit is kept, out of the model's view.
    """
    history_room = model.n_ctx - pinned_limit(model.n_ctx)
    if exc.needed <= history_room:
        text = (
            f"I cannot answer right now: this conversation's character set-up leaves room "
            f"for only {max(exc.available, 0)} tokens and your message takes about "
            f"{exc.needed}. Your message is saved; an admin can choose another character."
        )
        log.warning("%s: the pinned prompt leaves no room for the history", conv.key)
    else:
        text = (
            f"Your message is too long for me to read: it takes about {exc.needed} tokens "
            f"and I have room for {history_room}. It is saved; please send a shorter "
            "version or split it into parts."
        )
        await store.messages.update(user_id, in_context=False, token_count=exc.needed)
        history.forget(conv.key)
    await store.messages.add(conv.id, NOTICE, text, reply_to_id=user_id, in_context=False)
    return text
