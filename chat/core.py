"""The engine, assembled: each part is an object with explicit collaborators.

=================  ============================================================================
``conversations``  conversation rows, cached (:mod:`chat.conversations`)
``queues``         each conversation's arrival order and answering turns, fair shares
``history``        the in-context messages of active conversations (:mod:`chat.prompt.history`)
``memory``         summaries beyond the window (:mod:`chat.prompt.memory`)
``prompts``        prompt building (:mod:`chat.prompt.building`)
``edits``          platform edits and deletions (:mod:`chat.edits`)
``answers``        the answer pipeline (:mod:`chat.answers`)
``delivery``       what reached the platform: reply states (:mod:`chat.delivery`)
``versions``       /regenerate and /swipe (:mod:`chat.versions`)
``actions``        mode, character, reset, greetings (:mod:`chat.actions`)
``steering``       facts, the author's note, personas (:mod:`chat.steering`)
``continuation``   /continue (:mod:`chat.continuation`)
``summaries``      /summarize (:mod:`chat.summarize`)
``library``        characters and world books shared by every conversation
``documents``      files posted in work conversations (:mod:`chat.documents`)
``recovery``       what a restart must finish (:mod:`chat.recovery`)
``reminders``      /remind and the delivery of reminders (:mod:`chat.reminders`)
``commands``       the commands users type, declared once (:mod:`chat.commands`)
``metrics``        what operators watch (:mod:`chat.metrics`)
=================  ============================================================================
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

from chat.access import Access
from chat.actions import Actions
from chat.answers import Answers, ModelProvider
from chat.commands import CommandSet
from chat.continuation import Continuation
from chat.conversations import Conversations
from chat.delivery import Delivery
from chat.documents.library import DocumentLibrary
from chat.documents.posting import Postings
from chat.edits import Edits
from chat.faults import KillPoints
from chat.metrics import Metrics
from chat.prompt.building import PromptBuilder
from chat.prompt.history import HistoryCache
from chat.prompt.memory import MemoryKeeper
from chat.queues import Queues
from chat.recovery import Recovery
from chat.reminders.service import Reminders
from chat.roleplay.characters import CharacterLibrary, shipped_characters
from chat.roleplay.library import Library
from chat.settings import Settings
from chat.steering import Steering
from chat.summarize import Summaries
from chat.tools.builtin import Toolbox
from chat.turn_texts import APOLOGY
from chat.versions import Versions
from storage.store import Store

__all__ = ["APOLOGY", "ConversationCore", "ModelProvider"]


class ConversationCore:
    """Turns incoming messages into streamed, persisted replies, and runs the commands."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        models: ModelProvider,
        *,
        rng: random.Random | None = None,
        kill_points: KillPoints | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.started_at = datetime.now(UTC)
        fixed = [*shipped_characters(), *settings.characters.values()]
        character = settings.models.get("character")
        self.characters = CharacterLibrary(fixed, default=settings.default_character)
        self.memory = MemoryKeeper(store, models.get, idle=lambda key: not self.queues.busy(key))
        # A summary never runs while its conversation has a turn (and waits for quiet after).
        self.metrics = Metrics()
        self.queues = Queues(
            settings,
            on_ticket=self.memory.interrupt,
            on_release=self.memory.wake,
            metrics=self.metrics,
        )
        self.metrics.watch_queue(self.queues.busy_count)
        self.conversations = Conversations(store, settings, self.characters, busy=self.queues.busy)
        windows = [m.n_ctx for m in settings.models.values()] or [8192]
        self.history = HistoryCache(store, max_rows=max(windows) // 2 + 1)
        self.library = Library(
            store,
            self.characters,
            {c.name for c in fixed},
            model=lambda: models.get("character"),
            encoder=lambda model: self.prompts.encoder(model),
            # A deployment may have no character model (an office-only bot): no card to check.
            reserve=character.sampling.max_tokens if character else 0,
        )
        self.world_books = self.library.world_books
        self.documents = DocumentLibrary(
            settings.documents,
            store,
            office_model=lambda: models.get("office"),
            metrics=self.metrics,
        )
        self.prompts = PromptBuilder(
            settings,
            self.conversations,
            self.history,
            self.memory,
            self.world_books,
            self.documents,
        )
        self.edits = Edits(
            settings, store, self.conversations, self.queues, self.history, self.documents
        )
        kills = kill_points or KillPoints()
        self.delivery = Delivery(store, kills)
        self.access = Access(settings.access, settings.is_owner)
        self.postings = Postings(self.documents, self.conversations, self.access, self.queues)
        self.reminders = Reminders(
            settings.reminders, store, self.conversations, metrics=self.metrics
        )
        toolbox = Toolbox(store, self.conversations, self.reminders, self.documents)
        self.answers = Answers(
            settings,
            store,
            models,
            self.conversations,
            self.queues,
            self.prompts,
            self.history,
            self.memory,
            self.edits,
            self.characters,
            self.delivery,
            kill_points=kills,
            access=self.access,
            metrics=self.metrics,
            rng=rng or random.Random(),
            opening=lambda conv, is_dm, user: self.actions.open(conv, is_dm, user),
            tools=toolbox.tools(),
        )
        self.versions = Versions(
            store,
            self.conversations,
            self.queues,
            self.history,
            self.characters,
            self.answers,
            self.delivery,
        )
        self.edits.regenerate = self.versions.regenerate
        self.actions = Actions(
            store,
            self.conversations,
            self.queues,
            self.history,
            self.memory,
            self.characters,
            self.world_books,
        )
        self.steering = Steering(settings, self.conversations, self.queues, self.memory, models)
        self.continuation = Continuation(
            store,
            models,
            self.conversations,
            self.queues,
            self.prompts,
            self.history,
            self.memory,
            self.characters,
            self.delivery.shown,
        )
        self.summaries = Summaries(store, models, self.conversations, self.queues, self.memory)
        self.recovery = Recovery(
            settings, store, self.conversations, self.queues, self.answers, self.started_at
        )
        self.commands = CommandSet(self)

    @property
    def rng(self) -> random.Random:
        return self.answers.rng

    @rng.setter
    def rng(self, value: random.Random) -> None:
        self.answers.rng = value

    @property
    def closing(self) -> bool:
        return self.answers.closing

    def is_owner(self, platform: str, user_id: str) -> bool:
        """Whether this platform user may change what all conversations share."""
        return self.settings.is_owner(platform, user_id)

    async def drain(self, grace_s: float) -> int:
        """Stop taking messages; wait up to ``grace_s`` seconds for the answers in flight.

        Returns how many conversations were still answering when the time ran out.
        """
        self.answers.closing = True
        await self.memory.close()
        deadline = asyncio.get_running_loop().time() + grace_s
        while True:
            busy = self.queues.busy_count()
            if not busy or asyncio.get_running_loop().time() >= deadline:
                return busy
            await asyncio.sleep(0.05)
