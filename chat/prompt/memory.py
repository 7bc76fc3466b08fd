"""Memory beyond the window: a rolling summary of what the window moved past, and pinned facts.

The summary follows the window's trims, so that it never breaks prefix reuse more often than
they do.  Right after a trim (and before the first one) a job *prepares* the summary of the
chunk of history that the next trim will drop: the previous summary merged with those
messages.  At the next trim the window cuts exactly where that summary ends, and the summary
becomes the pinned one, both at once.  Between trims the pinned summary, and so the front of
the prompt, does not change.

Jobs run on the routed model when their conversation has been idle for a few seconds and no
reply is generating on that model: they are background work.  A new message in that
conversation, or any reply starting on the model, cancels the job; it starts again when things
are quiet.  So a summary never runs while a reply streams in its conversation, and a reply
waits for it at most the scheduler step in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from ai_model.base import ChatModel, ModelError
from ai_model.config import SamplingSettings
from ai_model.templates import encode
from chat.fairness import LruDict
from chat.prompt.window import Window, clean_name
from storage.records import ASSISTANT, StoredMessage, Summary
from storage.store import STORAGE_ERRORS, Store

log = logging.getLogger(__name__)

MAX_FACTS = 20
MAX_FACT_CHARS = 300
MAX_NOTE_CHARS = 500
CHUNK_FRACTION = (
    0.25  # the share of the history budget one trim drops (chat.prompt.window.fit_window)
)
IDLE_S = 5.0  # a conversation is idle this long after its last turn before a summary starts
MAX_CHUNKS_PER_JOB = 4  # the work one summary job may do (each chunk: one generation)
SHORTEN_TRIES = 2
MIN_FACT_BUDGET = 256  # tokens pinned facts may always use, even with summaries off

ROLEPLAY_INSTRUCTIONS = (
    "You keep the memory of a roleplay story. Merge the summary so far with the new messages "
    "into one summary of the story so far, written in the third person: who is who (by "
    "name), where they are, what happened, what was decided or promised, and every fact "
    "stated about the characters and the world. Write only the summary, at most {words} words."
)
WORK_INSTRUCTIONS = (
    "You keep the minutes of a team chat. Merge the summary so far with the new messages into "
    "one summary: decisions, who owns what, open items, and every name, number and date that "
    "matters. Write only the summary, at most {words} words."
)
SHORTEN = (
    "Shorten this summary to at most {words} words. Keep names, facts, decisions and open "
    "items. Write only the shortened summary."
)


def memory_text(summary: str, facts: Sequence[str]) -> str:
    """The pinned memory block as the model reads it (empty: no block)."""
    parts = []
    if summary:
        parts.append(f"Summary of the conversation before the messages below:\n{summary}")
    if facts:
        numbered = "\n".join(f"{i}. {fact}" for i, fact in enumerate(facts, 1))
        parts.append(f"Facts to remember:\n{numbered}")
    return "\n\n".join(parts)


def fit_memory(
    summary: str, facts: Sequence[str], budget: int, count: Callable[[str], int]
) -> tuple[str, list[str]]:
    """The summary and the facts that fit ``budget`` tokens together: facts first (users
    pinned them), then as much of the summary as fits, cut at its start (its end is the most
    recent).  The summary is the bot's own text; the facts are the users' (a user turn)."""
    kept: list[str] = []
    for fact in facts:
        if count(memory_text("", [*kept, fact])) > budget:
            break
        kept.append(fact)
    left = budget - (count(memory_text("", kept)) if kept else 0)
    if not summary or count(memory_text(summary, ())) <= left:
        return summary, kept
    # Cut at word starts in the text itself, so that what is kept reads exactly as written.
    starts = [m.start() for m in re.finditer(r"\S+", summary)]
    low, high = 0, len(starts)  # the fewest words to drop so that the block fits
    while low < high:
        mid = (low + high) // 2
        if count(memory_text("… " + summary[starts[mid] :], ())) <= left:
            high = mid
        else:
            low = mid + 1
    rest = summary[starts[low] :] if low < len(starts) else ""
    return ("… " + rest if rest else ""), kept


def next_boundary(window: Window, budget: int) -> int | None:
    """The last turn position of the chunk the next trim will drop (whole exchanges), or None
    while the window holds less than that before its newest turn."""
    turns = window.turns
    total = 0
    for i, turn in enumerate(turns[:-1]):
        total += len(turn.tokens)
        if total < budget * CHUNK_FRACTION:
            continue
        j = i
        while j + 1 < len(turns) and turns[j + 1].position == turn.position:
            j += 1  # the replies to the last question belong with it
        return turn.position if j + 1 < len(turns) else None
    return None


@dataclass(slots=True)
class Plan:
    """What the next job of a conversation should summarize."""

    conversation_id: int
    role: str
    mode: str
    reset_after: int
    boundary: int  # summarize every message up to this position
    budget: int  # tokens the summary may take


class MemoryKeeper:
    """Summaries per conversation: which one is pinned, and the jobs that prepare the next."""

    def __init__(
        self,
        store: Store,
        models: Callable[[str], Awaitable[ChatModel]],
        *,
        idle: Callable[[str], bool],
    ) -> None:
        self.store = store
        self._models = models  # role -> awaitable ChatModel
        self._idle = idle  # whether a conversation has nothing queued or streaming
        self._replying: dict[str, int] = {}  # role -> replies generating on its model
        self._summaries: LruDict[str, list[Summary]] = LruDict(4096)
        self._plans: LruDict[str, Plan] = LruDict(4096)  # the oldest plans are dropped
        self._failed: LruDict[str, int] = LruDict(4096)  # where a job failed: not retried at once
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, tuple[str, asyncio.Task[None]]] = {}  # key -> (role, work)
        self._tick = asyncio.Event()  # set (and replaced) whenever a turn or a reply ends
        self._hurry: dict[str, asyncio.Event] = {}
        self.idle_s = IDLE_S
        self.summaries_written = 0
        self.closed = False

    # -- what prompts use ---------------------------------------------------------------------

    async def summaries(self, key: str, conversation_id: int, after: int) -> list[Summary]:
        """The conversation's summaries since its reset, the one reaching furthest first."""
        found = self._summaries.get(key)
        if found is None:
            found = await self.store.summaries.of(conversation_id, after_id=after)
            self._summaries[key] = found
        return [s for s in found if s.first_id > after]

    async def pinned(
        self, key: str, conversation_id: int, after: int, summary_id: object
    ) -> Summary | None:
        for summary in await self.summaries(key, conversation_id, after):
            if summary.id == summary_id:
                return summary
        return None

    async def for_window(
        self, key: str, conversation_id: int, after: int, start: int
    ) -> Summary | None:
        """The summary to pin once the window starts at ``start``: the newest that covers
        nothing the window still shows."""
        for summary in await self.summaries(key, conversation_id, after):
            if summary.last_id < start:
                return summary
        return None

    async def prepared(self, key: str, conversation_id: int, after: int, start: int) -> int | None:
        """Where a summary prepared for the next trim ends (the trim should cut there)."""
        found = await self.summaries(key, conversation_id, after)
        return found[0].last_id if found and found[0].last_id >= start else None

    def forget(self, key: str) -> None:
        """A reset: nothing summarized before applies any more."""
        self.interrupt(key)
        self._summaries.pop(key)
        self._plans.pop(key)
        self._failed.pop(key)

    # -- jobs ---------------------------------------------------------------------------------

    def plan(self, key: str, plan: Plan) -> None:
        """Remember what to summarize next; the job starts at :meth:`wake`."""
        if self._failed.get(key) == plan.boundary:
            return
        self._plans[key] = plan

    def notify(self) -> None:
        """A turn or a reply ended somewhere: waiting jobs look again whether it is quiet."""
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    def wake(self, key: str) -> None:
        """The conversation's turn ended: start its job if one is planned and needed."""
        self.notify()
        if not self.closed and self._plans.get(key) is not None and key not in self._jobs:
            task = asyncio.get_running_loop().create_task(self._run(key))
            self._jobs[key] = task
            task.add_done_callback(lambda _t: self._ended(key))

    def _ended(self, key: str) -> None:
        self._jobs.pop(key, None)
        self._hurry.pop(key, None)

    def interrupt(self, key: str) -> None:
        """A message or command arrived in ``key``: its job stops now (and runs later)."""
        task = self._jobs.get(key)
        if task is not None:
            task.cancel()

    def _room(self, role: str) -> bool:
        """Whether ``role``'s model is free for background work: no reply generating on it.
        (Even with free sequences, a summary's prompt chunks would share the replies' decode
        steps, and on a CPU every token in a step costs the replies time.)"""
        return self._replying.get(role, 0) == 0

    @contextlib.asynccontextmanager
    async def replying(self, key: str, role: str) -> AsyncIterator[None]:
        """A reply generates in ``key`` on ``role``'s model: summaries make way."""
        self._replying[role] = self._replying.get(role, 0) + 1
        try:
            self.make_room(role)
            await self.quiet(key)
            yield
        finally:
            self._replying[role] -= 1
            self.notify()

    def make_room(self, role: str) -> None:
        """A reply starts on ``role``'s model: jobs generating on it stop, and wait for quiet."""
        for running_role, work in list(self._running.values()):
            if running_role == role:
                work.cancel()

    async def quiet(self, key: str) -> None:
        """Wait until no job of ``key`` is generating (the one that was is cancelled)."""
        task = self._jobs.get(key)
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    def hurry(self, key: str) -> None:
        """Start the job of ``key`` without waiting for the idle time (bench, tests)."""
        self._hurry.setdefault(key, asyncio.Event()).set()

    async def settle(self, key: str) -> None:
        """Start the job of ``key`` now and wait for it to end (bench, tests)."""
        task = self._jobs.get(key)
        if task is not None:
            self.hurry(key)
            await asyncio.wait({task})

    async def close(self) -> None:
        """Stop every job (a stop or a restart; they start again when needed)."""
        self.closed = True
        tasks = list(self._jobs.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _run(self, key: str) -> None:
        while True:
            plan = self._plans.get(key)
            if plan is None:
                return
            # A conversation is idle once nothing happened in it for a while: a summary
            # started between two quick messages would hold the model when the next arrives.
            hurry = self._hurry.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), self.idle_s)
            while not (self._idle(key) and self._room(plan.role)):
                await self._tick.wait()
            work = asyncio.get_running_loop().create_task(self._summarize(key, plan))
            self._running[key] = (plan.role, work)
            try:
                await asyncio.wait({work})
            finally:
                self._running.pop(key, None)
                if not work.done():  # this task itself was cancelled: stop the work too
                    work.cancel()
            if work.cancelled():
                continue  # a reply needed the model: wait for quiet, then start again
            if (exc := work.exception()) is not None:
                if isinstance(exc, (ModelError, *STORAGE_ERRORS)):
                    log.warning("memory: no summary for %s this time: %s", key, exc)
                else:
                    log.error("memory: the summary job of %s failed", key, exc_info=exc)
                self._failed[key] = plan.boundary
            if self._plans.get(key) is plan:
                self._plans.pop(key)
            return

    async def _summarize(self, key: str, plan: Plan) -> None:
        model: ChatModel = await self._models(plan.role)
        found = await self.summaries(key, plan.conversation_id, plan.reset_after)
        previous = found[0] if found else None
        if previous is not None and previous.last_id >= plan.boundary:
            return
        after = max(plan.reset_after, previous.last_id if previous else 0)
        history = await self.store.messages.history(
            plan.conversation_id, after_id=after, upto_id=plan.boundary
        )
        lines = [transcript_line(m) for m in history]
        if not lines:
            return
        summary = previous.text if previous else ""
        # Tokenizing hostile or huge messages takes a while: never on the event loop.
        # Room for the instructions, the summary so far and the new one beside each chunk.
        room = max(64, model.n_ctx - 2 * plan.budget - 256)
        chunks = await asyncio.to_thread(chunk_lines, model, lines, room)
        if len(chunks) > MAX_CHUNKS_PER_JOB:
            # A backlog (say, a long conversation from before memory was on): the chunks next
            # to the window matter most; older ones are skipped rather than holding the model.
            log.info(
                "memory: %s has %d chunks to summarize; the oldest %d are skipped",
                key,
                len(chunks),
                len(chunks) - MAX_CHUNKS_PER_JOB,
            )
            chunks = chunks[-MAX_CHUNKS_PER_JOB:]
        for chunk in chunks:
            summary = await self._merge(model, plan, summary, chunk)
        summary = await self._shorten(model, plan, summary)
        if not summary:
            log.warning("memory: the model wrote an empty summary for %s", key)
            self._failed[key] = plan.boundary
            return
        summary, tokens = await asyncio.to_thread(_within, model, summary, plan.budget)
        first = previous.first_id if previous else history[0].id
        stored = await self.store.summaries.add(
            plan.conversation_id, first, plan.boundary, summary, tokens
        )
        self._summaries[key] = [stored, *found][:4]
        self.summaries_written += 1
        log.info("memory: %s summarized up to message %d (%d tokens)", key, plan.boundary, tokens)

    async def _merge(self, model: ChatModel, plan: Plan, summary: str, chunk: list[str]) -> str:
        words = max(20, int(plan.budget * 0.6))
        instructions = ROLEPLAY_INSTRUCTIONS if plan.mode == "roleplay" else WORK_INSTRUCTIONS
        content = f"Summary so far:\n{summary or '(nothing yet)'}\n\nNew messages:\n" + "\n".join(
            chunk
        )
        return await generate(
            model, instructions.format(words=words), content, plan.budget, background=True
        )

    async def _shorten(self, model: ChatModel, plan: Plan, summary: str) -> str:
        for _ in range(SHORTEN_TRIES):
            if await asyncio.to_thread(_count, model, summary) <= plan.budget:
                return summary
            words = max(20, int(plan.budget * 0.5))
            summary = await generate(
                model, SHORTEN.format(words=words), summary, plan.budget, background=True
            )
        return summary  # still too long: cut to the budget before it is stored (_within)


def transcript_line(message: StoredMessage) -> str:
    """One stored message as a line a summarizing prompt quotes: ``Name: text``."""
    who = "Assistant" if message.role == ASSISTANT and not message.author_name else None
    return f"{who or clean_name(message.author_name)}: {message.text}"


def _count(model: ChatModel, text: str) -> int:
    return len(model.tokenize(text.encode("utf-8"), False, False))


def _within(model: ChatModel, text: str, budget: int) -> tuple[str, int]:
    """``text`` and its token count, cut at its start to at most ``budget`` tokens (blocking)."""
    ids = model.tokenize(text.encode("utf-8"), False, False)
    if len(ids) <= budget:
        return text, len(ids)
    cut = "… " + model.detokenize(ids[len(ids) - budget + 2 :]).strip()
    return cut, len(model.tokenize(cut.encode("utf-8"), False, False))


def chunk_lines(model: ChatModel, lines: Sequence[str], room: int) -> list[list[str]]:
    """``lines`` in order, in chunks whose text as sent (the lines joined by newlines) takes
    at most ``room`` tokens; a longer line keeps its start (blocking: tokenizes)."""
    newline = len(model.tokenize(b"\n", False, False))
    chunks: list[list[str]] = [[]]
    used = 0
    for line in lines:
        ids = model.tokenize(line.encode("utf-8"), False, False)
        if len(ids) > room:
            line = model.detokenize(ids[: room - 8])
            ids = model.tokenize(line.encode("utf-8"), False, False)
        cost = len(ids) + (newline if chunks[-1] else 0)
        if chunks[-1] and used + cost > room:
            chunks.append([])
            used, cost = 0, len(ids)
        chunks[-1].append(line)
        used += cost
    # Tokens can merge across a join: check each chunk as it will be sent.
    checked: list[list[str]] = []
    for chunk in (c for c in chunks if c):
        while chunk:
            cut = len(chunk)
            while cut > 1 and _count(model, "\n".join(chunk[:cut])) > room:
                cut -= 1
            checked.append(chunk[:cut])
            chunk = chunk[cut:]
    return checked


def instructed_prompt(model: ChatModel, instructions: str, content: str) -> list[int]:
    """A one-shot prompt: system instructions, the content as a user turn (plain text), the
    reply cue (blocking: tokenizes)."""
    template = model.template
    pieces = [
        *template.turn("system", instructions),
        *template.turn("user", content),
        *template.generation_prompt(),
    ]
    return [*model.bos, *encode(pieces, model)]


async def generate(
    model: ChatModel,
    instructions: str,
    content: str,
    max_tokens: int,
    seed: int = 11,
    background: bool = False,
) -> str:
    """The whole answer to :func:`instructed_prompt` (tokenized off the event loop)."""
    tokens = await asyncio.to_thread(instructed_prompt, model, instructions, content)
    room = model.n_ctx - len(tokens) - 1
    if room < 16:
        raise ModelError("the summary prompt does not fit the window")
    sampling = SamplingSettings(max_tokens=min(max_tokens, room), temperature=0.3, seed=seed)
    text = ""
    async for piece in model.stream(tokens, sampling, (), background=background):
        text += piece
    return text.strip()
