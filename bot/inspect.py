"""``python -m bot prompt``: the exact prompt the bot would send, part by part.

The input is a stored conversation (``--conversation discord:123``, read from the database and
never written) or a transcript file (JSON: ``{"mode", "character", "messages": [{"role",
"name", "text"}]}``).  The prompt is built by the engine itself, on a scratch database, with any
model file's vocabulary (``--model``; a vocabulary-only GGUF is enough) and format
(``--chat-template``).  Each part is printed with its token count and the format's markup
marked ``⟦…⟧``; ``--json`` prints ``{"ids": [...], "parts": [...], "text": ...}``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ai_model.base import ChatModel
from ai_model.registry import ModelRegistry
from ai_model.templates import Piece, adapt, encode, render
from bot.secrets import shown_url
from chat.core import ConversationCore
from chat.prompt.window import Part, TurnEncoder
from chat.settings import ROLE_FOR_MODE, Mode, Settings, parse_mode
from storage import Store, open_database
from storage.records import ASSISTANT, USER, Conversation, StoredMessage

KEY = "inspect:prompt"
MAX_TRANSCRIPT_MESSAGES = 2000


@dataclass(frozen=True)
class Inspected:
    """A built prompt, described: its ids and each part as the format takes it."""

    header: str
    bos: int
    ids: list[int]
    entries: list[dict[str, Any]]


class InspectError(Exception):
    """The input cannot be read; the message says why."""


def read_transcript(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InspectError(f"cannot read the transcript {path}: {exc}") from exc
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or not messages:
        raise InspectError(f'{path}: expected {{"messages": [{{"role", "name", "text"}}, ...]}}')
    if len(messages) > MAX_TRANSCRIPT_MESSAGES:
        raise InspectError(f"{path}: at most {MAX_TRANSCRIPT_MESSAGES} messages")
    if not all(isinstance(data.get(k) or "", str) for k in ("mode", "character")):
        raise InspectError(f"{path}: mode and character are strings")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in (USER, ASSISTANT):
            raise InspectError(f"{path}: message {i + 1} needs a role of user or assistant")
        if not isinstance(message.get("text"), str):
            raise InspectError(f"{path}: message {i + 1} has no text")
    return dict(data)


async def _copy_stored(
    settings: Settings, key: str
) -> tuple[dict[str, Any], list[StoredMessage], dict[str, Any]]:
    """The stored conversation ``key``: its row, its messages since the reset, its cards."""
    store = Store(await open_database(settings.database_url))
    try:
        conv = await store.conversations.find(key)
        if conv is None:
            raise InspectError(f"no conversation {key} in {shown_url(settings.database_url)}")
        history = await store.messages.history(conv.id, after_id=conv.reset_after_id)
        summaries = await store.summaries.of(conv.id, after_id=conv.reset_after_id)
        row = {
            "mode": conv.mode,
            "character": conv.character,
            "settings": dict(conv.settings),
            "summary": next(
                (s for s in summaries if s.id == conv.settings.get("summary_id")), None
            ),
        }
        return row, history, await store.library.cards()
    finally:
        await store.close()


async def build(
    settings: Settings,
    *,
    conversation: str | None,
    transcript: Path | None,
    mode: str | None,
    character: str | None,
) -> Inspected:
    """The prompt's ids and parts, built by the engine on a scratch database."""
    row: dict[str, Any] = {"mode": None, "character": None, "settings": {}, "summary": None}
    cards: dict[str, Any] = {}
    messages: list[StoredMessage] = []
    if conversation is not None:
        row, messages, cards = await _copy_stored(settings, conversation)
    elif transcript is not None:
        data = read_transcript(transcript)
        row["mode"] = data.get("mode")
        row["character"] = data.get("character")
        for m in data["messages"]:
            name = str(m.get("name") or ("Assistant" if m["role"] == ASSISTANT else "User"))
            messages.append(
                StoredMessage(0, m["role"], m["text"], author_id=name, author_name=name)
            )
    chosen: Mode = parse_mode(mode or row["mode"] or "") or "work"
    role = ROLE_FOR_MODE[chosen]
    with tempfile.TemporaryDirectory(prefix="localbot-prompt-") as folder:
        scratch = replace(settings, database_url=f"sqlite+aiosqlite:///{folder}/prompt.db")
        registry = ModelRegistry(scratch.models, vocab_only=True)
        store = Store(await open_database(scratch.database_url))
        try:
            core = ConversationCore(scratch, store, registry)
            for card in cards.values():
                try:
                    core.library.characters.add(_character(card))
                except ValueError:
                    continue
            model = await registry.get(role)
            conv = await _fill(core, row, messages, chosen, character)
            last_user = max((m.id for m in await store.messages.history(conv.id)), default=0)
            char = core.conversations.cast_of(conv)[0] if chosen == "roleplay" else None
            reserve = scratch.models[role].sampling.max_tokens
            built = await core.prompts.build(conv, model, last_user, char, reserve)
            await core.memory.close()
            # Described here: the model's tokenizer is closed with the registry below.
            return Inspected(
                f"model {model.name}, format {model.template.name}, window {model.n_ctx} tokens",
                len(model.bos),
                list(built.tokens),
                described(model, built.parts),
            )
        finally:
            await store.close()
            registry.close()


def _character(card: Any) -> Any:
    from chat.roleplay.characters import character_from_card

    return character_from_card(card)


async def _fill(
    core: ConversationCore,
    row: dict[str, Any],
    messages: list[StoredMessage],
    mode: Mode,
    character: str | None,
) -> Conversation:
    store = core.store
    conv = await core.conversations.get("inspect", KEY)
    conv = await core.conversations.set_mode(conv, mode)
    name = character or row["character"]
    if name:
        if core.characters.find(name) is None:
            raise InspectError(f"no character called {name}")
        conv = await core.conversations.set_character(conv, core.characters.get(name).name)
    settings = dict(row["settings"])
    settings.pop("summary_id", None)
    ids: dict[int, int] = {}
    for m in messages:
        new = await store.messages.add(
            conv.id,
            m.role,
            m.text,
            author_id=m.author_id,
            author_name=m.author_name,
            reply_to_id=ids.get(m.reply_to_id) if m.reply_to_id else None,
        )
        ids[m.id] = new
    summary = row["summary"]
    if summary is not None and summary.first_id in ids and summary.last_id in ids:
        stored = await store.summaries.add(
            conv.id, ids[summary.first_id], ids[summary.last_id], summary.text, summary.token_count
        )
        settings["summary_id"] = stored.id
    if settings:
        await store.conversations.set_settings(conv.id, settings)
    core.conversations.keep(replace(conv, settings=settings))
    return await core.conversations.get("inspect", KEY)


def described(model: ChatModel, parts: tuple[Part, ...]) -> list[dict[str, Any]]:
    """The prompt's turns as the format takes them: label, role, token count, text with the
    markup marked ``⟦…⟧``."""
    template = model.template
    texts = [
        (p.role, TurnEncoder.text_of(p.message, p.named) if p.message else p.text) for p in parts
    ]
    out: list[dict[str, Any]] = []
    if template.head:
        out.append(_entry("head", "", list(template.start()), model))
    for turn in adapt(template, texts) if template.adapts else _plain(texts):
        labels = [parts[i].label for i in turn.sources] or ["filler"]
        names = [
            parts[i].message.author_name or ""  # type: ignore[union-attr]
            for i in turn.sources
            if parts[i].message is not None
        ]
        label = "+".join(dict.fromkeys(labels))
        if names and any(names):
            label += f" ({', '.join(dict.fromkeys(n for n in names if n))})"
        out.append(_entry(label, turn.role, list(template.turn(turn.role, turn.text)), model))
    out.append(_entry("cue", "assistant", list(template.generation_prompt()), model))
    return out


def _plain(texts: list[tuple[str, str]]) -> list[Any]:
    from ai_model.templates import Adapted

    return [Adapted(role, text, (i,)) for i, (role, text) in enumerate(texts)]


def _entry(label: str, role: str, pieces: list[Piece], model: ChatModel) -> dict[str, Any]:
    marked = "".join(f"⟦{p.text}⟧" if p.control and p.text else p.text for p in pieces)
    return {
        "label": label,
        "role": role,
        "tokens": len(encode(pieces, model)),
        "text": marked,
        "plain": render(pieces),
    }


def show(inspected: Inspected, as_json: bool) -> str:
    """The prompt as text for a terminal, or as JSON."""
    entries = [dict(e) for e in inspected.entries]
    ids = inspected.ids
    if as_json:
        text = "".join(e.pop("plain") for e in entries)
        return json.dumps({"ids": ids, "parts": entries, "text": text}, ensure_ascii=False)
    lines = [inspected.header]
    if inspected.bos:
        lines.append(f"── BOS · {inspected.bos} token(s)")
    for e in entries:
        lines.append(f"── {e['label']} · {e['role'] or 'markup'} · {e['tokens']} tokens")
        lines.append(e["text"])
    lines.append(f"total: {len(ids)} tokens")
    return "\n".join(lines)


def overridden(settings: Settings, model: str | None, chat_template: str | None) -> Settings:
    """``settings`` with every role reading ``model`` in ``chat_template`` where given."""
    changes: dict[str, Any] = {}
    if model:
        # A local file: a remote role's server is not asked; its tokenizer is this file's.
        changes.update(path=model, backend="local", url="")
    if chat_template:
        changes["chat_template"] = chat_template
    if not changes:
        return settings
    models = {role: replace(m, **changes) for role, m in settings.models.items()}
    return replace(settings, models=models)


async def main(settings: Settings, args: Any) -> int:
    try:
        inspected = await build(
            overridden(settings, args.model, args.chat_template),
            conversation=args.conversation,
            transcript=Path(args.transcript) if args.transcript else None,
            mode=args.mode,
            character=args.character,
        )
    except InspectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(show(inspected, args.json))
    return 0
