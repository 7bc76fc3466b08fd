"""Building a conversation's prompt: the history since the window start, the scene, the memory.

Each prompt is assembled off the event loop (:mod:`chat.prompt.assembly`).  When the window has to move,
the summary prepared for that trim (:mod:`chat.prompt.memory`) is pinned in the same step, so the front
of the prompt changes once per trim and not again when the summary arrives.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import replace

from ai_model.base import ChatModel
from ai_model.config import SamplingSettings
from chat.prompt.assembly import LORE_SCAN, Memory, Prompt, Scene, assemble
from chat.roleplay.characters import Character
from chat.actions import personas_of
from chat.conversations import ConversationState
from chat.prompt.history import position
from chat.roleplay.lorebook import match_entries
from chat.prompt.memory import MIN_FACT_BUDGET, Plan, next_boundary
from chat.prompt.window import clean_name
from chat.settings import ROLE_FOR_MODE, Mode
from storage.records import USER, Conversation


class PromptBuilding(ConversationState):
    """Sampling settings and prompts per conversation."""

    def _sampling(self, mode: Mode, char: Character | None) -> SamplingSettings:
        base = self.settings.models[ROLE_FOR_MODE[mode]].sampling
        if char is None or not char.sampling:
            return base
        overrides = {
            k: int(v) if k == "repeat_last_n" else float(v) for k, v in char.sampling.items()
        }
        return replace(base, **overrides)  # type: ignore[arg-type]

    async def build_prompt(
        self,
        conv: Conversation,
        model: ChatModel,
        upto_id: int,
        char: Character | None,
        reserve: int,
        replacing: int | None = None,
    ) -> tuple[list[int], list[str], Conversation]:
        """Token ids of the prompt answering message ``upto_id``, stop strings, updated conv.

        ``replacing`` names a reply's version group that the new reply will replace: none of
        its versions is part of the prompt.
        """
        # What existed when message ``upto_id`` arrived, since the reset and the window start
        # (the cache is in conversation order: usually nothing, or little, is past the end).
        history = await self.history.get(conv)
        end = len(history)
        while end and position(history[end - 1])[0] > upto_id:
            end -= 1
        shown = history[:end]
        if replacing is not None:
            shown = [m for m in shown if m.swipe_group != replacing]
        personas = personas_of(conv)
        if personas:  # players who chose a persona speak under its name
            shown = [
                replace(m, author_name=personas[m.author_id].name)
                if m.role == USER and m.author_id in personas and personas[m.author_id].name
                else m
                for m in shown
            ]
        scene = None
        if char is not None:
            book = self.world_books.get(str(conv.settings.get("world_book", "")).lower())
            persona = str(conv.settings.get("persona", ""))
            about = {
                p.name or clean_name(m.author_name): p.description
                for m in shown
                if m.role == USER and (p := personas.get(m.author_id or "")) is not None
            }
            scene = Scene(char, self.cast_of(conv), book, persona, personas=about)
            if scene.books:
                # Regex keys come from cards: matched off the event loop, each under a timeout.
                recent = [m.text for m in shown[-LORE_SCAN:]]
                lore = await asyncio.to_thread(match_entries, scene.books, recent)
                scene = replace(scene, lore=lore)
        memory = await self._memory(conv, model)
        # Off the event loop: a remote model may tokenize over HTTP, and a long new message
        # takes a while to tokenize even here.
        build = functools.partial(
            assemble,
            model,
            self._encoder(model),
            shown,
            system_prompt=self.settings.system_prompt,
            scene=scene,
            reserve=reserve,
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
                conv = await self._update_settings(conv.platform, conv.key, summary_id=summary.id)
            await self.store.set_window_start(conv.id, start)
            conv = self._conversations[conv.key] = replace(conv, window_start_id=start)
            self.history.window_moved(conv.key, start)
        await self._plan_summary(conv, char, prompt)
        return prompt.tokens, prompt.stops, conv

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
