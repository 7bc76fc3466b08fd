"""Building a conversation's prompt: the history since the window start, the scene, the memory.

Each prompt is assembled off the event loop (:mod:`chat.prompt.assembly`).  When the window has
to move, the summary prepared for that trim (:mod:`chat.prompt.memory`) is pinned in the same
step, so the front of the prompt changes once per trim and not again when the summary arrives.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ai_model.base import ChatModel
from ai_model.config import SamplingSettings
from chat.conversations import Conversations
from chat.documents.library import ASK_PREFIX, NO_EXCERPTS, DocumentLibrary, Excerpts
from chat.personas import (
    PERSONA_SHARE,
    personas_of,
    player_names,
    players_of,
    shown_personas,
    with_new_players,
)
from chat.prompt.assembly import LORE_SCAN, Memory, Prompt, Scene, assemble
from chat.prompt.history import HistoryCache, position
from chat.prompt.memory import MIN_FACT_BUDGET, MemoryKeeper, Plan, next_boundary
from chat.prompt.window import Part, Turn, TurnEncoder, clean_name
from chat.roleplay.characters import Character
from chat.roleplay.lorebook import Lorebook, match_entries
from chat.settings import ROLE_FOR_MODE, Mode, Settings
from chat.tools.rounds import ToolPrompt
from storage.records import USER, Conversation, StoredMessage
from storage.store import STORAGE_ERRORS

log = logging.getLogger(__name__)

# Turns of unaddressed messages being encoded ahead at once; past it, a flood's turns are
# encoded when the bot is next asked, a window's worth at most.
MAX_PREPARING = 64


@dataclass(frozen=True, slots=True)
class Built:
    """A prompt ready for the model, its stop strings, and the conversation as it now is."""

    tokens: list[int]
    stops: list[str]
    conv: Conversation
    parts: tuple[Part, ...] = ()  # what the prompt is made of (for the prompt inspector)
    excerpts: Excerpts = NO_EXCERPTS  # document chunks placed in it, and their sources


class PromptBuilder:
    """Sampling settings and prompts per conversation, one turn encoder per model."""

    def __init__(
        self,
        settings: Settings,
        conversations: Conversations,
        history: HistoryCache,
        memory: MemoryKeeper,
        world_books: Mapping[str, Lorebook],
        documents: DocumentLibrary | None = None,
    ) -> None:
        self.settings = settings
        self.documents = documents
        self.conversations = conversations
        self.history = history
        self.memory = memory
        self.world_books = world_books
        self._encoders: dict[int, tuple[ChatModel, TurnEncoder]] = {}
        self._role_models: dict[str, ChatModel] = {}  # the model each role last built with
        self.preparing = 0

    def encoder(self, model: ChatModel) -> TurnEncoder:
        entry = self._encoders.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, TurnEncoder(model, model.template))
            self._encoders[id(model)] = entry
        return entry[1]

    async def prepare(self, conv: Conversation, mode: Mode, message: StoredMessage) -> None:
        """Note a message stored without an answer, and encode its turn, off the event loop, as
        the next prompt of ``conv`` will show it.

        Its author joins the conversation's players now (the prompt names speakers once a
        second player has spoken), and the turn is encoded as it arrives: a mention after
        hours of chatter finds its window's turns ready, and costs what a mention after a few
        messages does.  Encoding is only for a role whose model already built a prompt here
        (nothing is loaded for it), and at most :data:`MAX_PREPARING` turns at once; what is
        skipped is encoded when needed.
        """
        if message.role != USER:
            return
        try:
            await self._prepare(conv, mode, message)
        except STORAGE_ERRORS as exc:  # only an optimisation: the mention does it otherwise
            log.warning("could not prepare a turn of %s: %s", conv.key, exc)

    async def _prepare(self, conv: Conversation, mode: Mode, message: StoredMessage) -> None:
        players = players_of(conv)
        uid = message.author_id or clean_name(message.author_name)
        if uid not in {known for known, _name in players}:
            players.append((uid, clean_name(message.author_name)))
            conv = await self.conversations.update_settings(
                conv, players=[list(p) for p in players]
            )
        model = self._role_models.get(ROLE_FOR_MODE[mode])
        if model is None or self.preparing >= MAX_PREPARING:
            return
        # The history is held from the first such message on, so that the mention reads
        # nothing from the database (the cache follows every message stored after this).
        await self.history.get(conv)
        # The prompt shows a player under their persona's name (as build does).
        persona = personas_of(conv).get(message.author_id or "")
        if persona is not None and persona.name:
            message = replace(message, author_name=persona.name)
        encoder = self.encoder(model)
        self.preparing += 1
        job = asyncio.get_running_loop().run_in_executor(
            None, encoder.turn, message, len(players) > 1
        )
        job.add_done_callback(self._prepared)

    def _prepared(self, job: asyncio.Future[Turn]) -> None:
        self.preparing -= 1
        if not job.cancelled() and (exc := job.exception()) is not None:
            log.warning("could not encode a turn ahead: %s", exc)

    def sampling(self, mode: Mode, char: Character | None) -> SamplingSettings:
        base = self.settings.models[ROLE_FOR_MODE[mode]].sampling
        if char is None or not char.sampling:
            return base
        overrides = {
            k: int(v) if k == "repeat_last_n" else float(v) for k, v in char.sampling.items()
        }
        return replace(base, **overrides)  # type: ignore[arg-type]

    async def build(
        self,
        conv: Conversation,
        model: ChatModel,
        upto_id: int,
        char: Character | None,
        reserve: int,
        replacing: int | None = None,
        tools: ToolPrompt | None = None,
    ) -> Built:
        """The prompt answering message ``upto_id``.

        ``replacing`` names a reply's version group that the new reply will replace: none of
        its versions is part of the prompt.
        """
        self._role_models[ROLE_FOR_MODE["roleplay" if char is not None else "work"]] = model
        # What existed when message ``upto_id`` arrived, since the reset and the window start
        # (the cache is in conversation order: usually nothing, or little, is past the end).
        history = await self.history.get(conv)
        end = len(history)
        while end and position(history[end - 1])[0] > upto_id:
            end -= 1
        shown = history[:end]
        if replacing is not None:
            shown = [m for m in shown if m.swipe_group != replacing]
        if (players := with_new_players(players_of(conv), shown)) is not None:
            conv = await self.conversations.update_settings(
                conv, players=[list(p) for p in players]
            )
        personas = personas_of(conv)
        if personas:  # players who chose a persona speak under its name
            shown = [
                replace(m, author_name=personas[m.author_id].name)
                if m.role == USER and m.author_id in personas and personas[m.author_id].name
                else m
                for m in shown
            ]
        names = player_names(players_of(conv), personas)
        scene = None
        if char is not None:
            book = self.world_books.get(str(conv.settings.get("world_book", "")).lower())
            scene = Scene(
                char,
                self.conversations.cast_of(conv),
                book,
                personas=shown_personas(players_of(conv), personas),
                persona_budget=int(model.n_ctx * PERSONA_SHARE),
            )
            if scene.books:
                # Regex keys come from cards: matched off the event loop, each under a timeout.
                recent = [m.text for m in shown[-LORE_SCAN:]]
                lore = await asyncio.to_thread(match_entries, scene.books, recent)
                scene = replace(scene, lore=lore)
        memory = await self._memory(conv, model)
        excerpts = await self._excerpts(conv, model, shown) if char is None else NO_EXCERPTS
        # Off the event loop: a remote model may tokenize over HTTP, and a long new message
        # takes a while to tokenize even here.
        build = functools.partial(
            assemble,
            model,
            self.encoder(model),
            shown,
            system_prompt=self.settings.system_prompt,
            scene=scene,
            reserve=reserve,
            players=names,
            documents=excerpts.text,
            tools=tools,
        )
        prompt = await asyncio.to_thread(build, window_start=conv.window_start_id, memory=memory)
        start = prompt.window.start
        if start != conv.window_start_id:
            # A trim: the summary prepared for it (if any) is pinned from now on, at once.
            after = conv.reset_after_id
            summary = await self.memory.for_window(conv.key, conv.id, after, start)
            if summary is not None and summary.id != conv.settings.get("summary_id"):
                memory = replace(memory, summary=summary.text, cut_after=None)
                prompt = await asyncio.to_thread(build, window_start=start, memory=memory)
                start = prompt.window.start
                conv = await self.conversations.update_settings(conv, summary_id=summary.id)
            conv = await self.conversations.set_window_start(conv, start)
            self.history.window_moved(conv.key, start)
        await self._plan_summary(conv, char, prompt)
        return Built(prompt.tokens, prompt.stops, conv, prompt.parts, excerpts)

    async def _excerpts(
        self, conv: Conversation, model: ChatModel, shown: list[StoredMessage]
    ) -> Excerpts:
        """The conversation's document chunks for its last message and the turns before."""
        docs = self.documents
        if docs is None or not docs.settings.enabled or not shown or shown[-1].role != USER:
            return NO_EXCERPTS
        if not await docs.holds_any(conv.id):
            return NO_EXCERPTS
        asked = shown[-1].text
        ask = asked.startswith(ASK_PREFIX)
        recent = [m.text for m in reversed(shown[-5:-1]) if m.role == USER][:2]
        texts = [asked.removeprefix(ASK_PREFIX), *recent]

        def count(text: str) -> int:
            return len(model.tokenize(text.encode("utf-8"), False, False))

        budget = int(model.n_ctx * docs.settings.budget)
        return await docs.excerpts(conv.id, texts, count, budget, ask=ask)

    async def _memory(self, conv: Conversation, model: ChatModel) -> Memory:
        """The conversation's pinned summary and facts, and where the next trim should cut."""
        facts = [str(f) for f in conv.settings.get("facts") or []]
        note = str(conv.settings.get("note") or "")
        depth = self.settings.note_depth
        if self.settings.memory_budget <= 0:  # summaries off; pinned facts still work
            return Memory("", facts, MIN_FACT_BUDGET if facts else 0, None, note, depth)
        budget = int(model.n_ctx * self.settings.memory_budget)
        key, after = conv.key, conv.reset_after_id
        pinned = await self.memory.pinned(key, conv.id, after, conv.settings.get("summary_id"))
        cut = await self.memory.prepared(key, conv.id, after, conv.window_start_id)
        return Memory(pinned.text if pinned else "", facts, budget, cut, note, depth)

    async def _plan_summary(
        self, conv: Conversation, char: Character | None, prompt: Prompt
    ) -> None:
        """Plan the summary of the chunk the next trim will drop, if it is not written yet."""
        if self.settings.memory_budget <= 0:
            return
        boundary = next_boundary(prompt.window, prompt.budget)
        if boundary is None:
            return
        found = await self.memory.summaries(conv.key, conv.id, conv.reset_after_id)
        if found and found[0].last_id >= boundary:
            return
        mode: Mode = "work" if char is None else "roleplay"
        self.memory.plan(
            conv.key,
            Plan(
                conversation_id=conv.id,
                role=ROLE_FOR_MODE[mode],
                mode=mode,
                reset_after=conv.reset_after_id,
                boundary=boundary,
                budget=max(32, prompt.summary_room),
            ),
        )
