"""What users see of a reply (without the model's reasoning, or a name it wrote in front),
and what its tokens are."""

from __future__ import annotations

from collections.abc import Sequence

from ai_model.base import ChatModel
from chat.roleplay.characters import Character
from chat.roleplay.scene import clean_reply, strip_name_tag


def shown(
    text: str,
    char: Character | None,
    others: Sequence[str],
    reasoning: tuple[str, str] | None = None,
) -> str:
    """A reply as users see it: without the model's reasoning block (its format drops it from
    earlier replies, and it is not for the chat), without a leading ``Name:`` of anyone in the
    conversation (the model imitates the names in front of turns), and in roleplay cut where
    it starts writing another speaker's lines."""
    if reasoning is not None:
        text = without_reasoning(text, reasoning)
    if char is not None:
        return clean_reply(text, char.display_name, others)
    return strip_name_tag(text, [*others, "Assistant"])


def without_reasoning(text: str, markers: tuple[str, str]) -> str:
    """``text`` without its leading reasoning block (``<think>…</think>``; the format's cue
    may have opened it already); nothing while the block is still being written."""
    opening, closing = markers
    head = text.lstrip()
    if closing in head:
        return head.split(closing, 1)[1].lstrip()
    if head.startswith(opening) or (head and opening.startswith(head)):
        return ""
    return text


def tokens_of_reply(model: ChatModel, slot: str, reply: str) -> tuple[int, Sequence[int]]:
    """The reply's token count, and the generated tokens when they spell exactly the reply
    (blocking: a remote model may ask its server)."""
    generated = model.generated(slot)
    if generated and model.detokenize(generated).strip() == reply:
        return len(generated), generated  # what the prompt will hold: no second tokenizing
    return len(model.tokenize(reply.encode("utf-8"), add_bos=False, special=False)), ()
