"""Continuous batching: one llama.cpp context, ``parallel`` sequences, one decode per step.

A scheduler thread owns the context.  Each step packs into a single ``llama_decode`` one token
for every running generation plus a chunk (``prefill_chunk`` tokens at most) of every prompt
still being evaluated, then samples each sequence that produced logits with its own sampler
chain.  New requests join at the next step, first come first served; a request whose consumer
stopped listening frees its sequence at the next step.

A conversation keeps its sequence, and so its evaluated tokens, while it is among the most
recently used; when its sequence is given to another conversation its state is parked
(:mod:`ai_model.parking`) and restored on its next message instead of being recomputed.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from ai_model.arrivals import Upcoming
from ai_model.base import ModelUsage
from ai_model.handoff import DONE
from ai_model.parking import (
    MIN_USEFUL_PREFIX,
    Parking,
    SavedState,
    common_prefix,
    read_sequence,
    write_sequence,
)
from ai_model.prefixes import SharedPrefixes
from ai_model.requests import Admission, Request, Step
from ai_model.sampling import GrammarCheck, held_back, make_sampler, narrows

log = logging.getLogger(__name__)

MAX_REMEMBERED_REPLIES = 4096
HISTORY = 4096  # admissions and steps kept for tests and the bench


class _Seq:
    """One sequence of the context and the conversation (and request) it holds."""

    def __init__(self, seq_id: int) -> None:
        self.id = seq_id
        self.key: str | None = None
        self.tokens: list[int] = []  # evaluated, at positions 0..n-1 of this sequence
        self.used = 0.0
        self.req: Request | None = None
        self.admitted = 0
        self.prompt_len = 0
        self.pending: list[int] = []  # prompt tokens still to evaluate
        self.share_at = 0  # copy the state out once this many tokens are evaluated (0: never)
        self.next_token: int | None = None  # sampled, evaluated at the next step
        self.sampler: Any = None
        self.check: GrammarCheck | None = None
        self.n_generated = 0
        self.decoder: codecs.IncrementalDecoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""
        self.sent = 0


class Scheduler:
    """Runs every generation of one loaded model on one thread, batched."""

    def __init__(
        self,
        name: str,
        ctx: Any,
        vocab: Any,
        *,
        parallel: int,
        n_batch: int,
        prefill_chunk: int,
        parking: Parking,
        shared_prefix_bytes: int = 0,
        openings: Sequence[Sequence[int]] = (),
        wait_s: float = 0.0,
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self.name = name
        self._ctx = ctx  # _internals.LlamaContext
        self._vocab = vocab
        self._mem = llama_cpp.llama_get_memory(ctx.ctx)
        self.n_batch = n_batch
        self.prefill_chunk = prefill_chunk
        self.parking = parking
        self.shared = SharedPrefixes(
            shared_prefix_bytes,
            lambda t: bool(llama_cpp.llama_vocab_is_control(vocab, t)),
            openings,
        )
        self.seqs = [_Seq(i) for i in range(parallel)]
        internals: Any = _internals
        self._batch = internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self._piece = ctypes.create_string_buffer(256)
        self._queue: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.upcoming = Upcoming(wait_s)
        self._outbox: list[tuple[Request, object]] = []  # handed over at the next _flush
        self._admitted = 0
        self.generated: OrderedDict[str | None, tuple[int, ...]] = OrderedDict()
        self.admissions: deque[Admission] = deque(maxlen=HISTORY)
        self.steps: deque[Step] = deque(maxlen=HISTORY)
        self.prompt_totals = [0, 0]  # prompt tokens reused and computed since load
        self.held_s = 0.0  # steps held for announced prompts, since load
        self.grammar_checks = [0, 0]  # tokens checked against a grammar, and rejected
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self._thread = threading.Thread(target=self._run, name=f"llama-{name}", daemon=True)
        self._thread.start()

    # -- the event loop's side ----------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._closing:
                request.emit(RuntimeError("the model is shutting down"))
                request.emit(DONE)
                return
            self._queue.append(request)
            self.upcoming.arrived(request.key)
            self._cond.notify()

    def announce(self, key: str | None) -> None:
        """A request of conversation ``key`` is on its way (see :mod:`ai_model.arrivals`)."""
        with self._cond:
            self.upcoming.announce(key, time.monotonic())

    def close(self) -> None:
        """Refuse what is queued, let running generations end, stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def usage(self) -> ModelUsage:
        """Queue, busy sequences and parked states now (read from the event loop: each
        figure is one read of a value the thread replaces whole, so none is torn)."""
        return ModelUsage(
            queued=len(self._queue),
            busy=sum(s.req is not None for s in self.seqs),
            parked=self.parking.count,
            prompt_reused=self.prompt_totals[0],
            prompt_computed=self.prompt_totals[1],
        )

    def resident(self) -> list[str | None]:
        """The conversations held in sequences, most recently used first."""
        return [s.key for s in sorted(self.seqs, key=lambda s: -s.used) if s.tokens]

    # -- the thread ---------------------------------------------------------------------------

    def _running(self) -> list[_Seq]:
        return sorted((s for s in self.seqs if s.req is not None), key=lambda s: s.admitted)

    def _take_admissible(self) -> list[Request]:
        """Pop, in arrival order, the requests that a free sequence can take now (caller holds
        the lock).  A conversation whose sequence is still busy waits without blocking others."""
        free = sum(s.req is None for s in self.seqs)
        busy_keys = {s.key for s in self.seqs if s.req is not None and s.key is not None}
        taken: list[Request] = []
        kept: deque[Request] = deque()
        while self._queue:
            req = self._queue.popleft()
            if req.cancel.is_set():
                req.emit(DONE)
            elif free > 0 and (req.key is None or req.key not in busy_keys):
                taken.append(req)
                free -= 1
                if req.key is not None:
                    busy_keys.add(req.key)
            else:
                kept.append(req)
        self._queue = kept
        return taken

    def _gather(self) -> None:
        """Hold a step that would start prompts alone for the ones announced to follow, while
        a sequence is free for them (caller holds the lock; see :mod:`ai_model.arrivals`)."""
        while self._queue and not self._closing and not self._running():
            if sum(s.req is None for s in self.seqs) <= len(self._queue):
                return
            if (until := self.upcoming.until(began := time.monotonic())) is None:
                return
            self._cond.wait(until - began)
            self.held_s += time.monotonic() - began

    def _run(self) -> None:
        while True:
            self._flush()  # what the last step wrote, before anything can wait or run
            with self._cond:
                while not self._queue and not self._running() and not self._closing:
                    self._cond.wait()
                self._gather()
                if self._closing:
                    for req in self._queue:
                        req.emit(RuntimeError("the model is shutting down"))
                        req.emit(DONE)
                    self._queue.clear()
                    if not self._running():
                        return
                admitted = self._take_admissible()
            for req in admitted:
                try:
                    self._admit(req)
                except Exception as exc:  # this request alone: the others go on
                    log.exception("%s: could not admit a request", self.name)
                    req.emit(exc)
                    req.emit(DONE)
                    for seq in self.seqs:
                        if seq.req is req:
                            self._release(seq)
                            self._clear(seq)
            try:
                for seq in self._running():
                    assert seq.req is not None
                    if seq.req.cancel.is_set():
                        self._finish(seq, flush=False)
                if self._running():
                    self._step()
            except Exception as exc:  # a bug or a llama.cpp failure: fail the running ones
                log.exception("%s: the batch scheduler failed", self.name)
                for seq in self._running():
                    self._fail(seq, exc)

    # -- admission ----------------------------------------------------------------------------

    def _pick(self, key: str | None) -> _Seq:
        idle = [s for s in self.seqs if s.req is None]
        if key is not None:
            for seq in idle:
                if seq.key == key:
                    return seq
        # Each sequence is a KV stream of its own, and llama.cpp decodes every stream between
        # the lowest and the highest sequence of a batch: four generations on sequences 0, 2,
        # 5 and 7 cost what eight do (55 ms a step against 31 ms on 0-3, 135M model, 2 cores).
        # A new generation takes the free sequence that keeps the busy ones closest together.
        busy = [s.id for s in self.seqs if s.req is not None]

        def span(seq: _Seq) -> int:
            ids = [*busy, seq.id]
            return max(ids) - min(ids)

        empty = [s for s in idle if not s.tokens]
        if empty:
            return min(empty, key=lambda s: (span(s), s.id))
        # What a request without a conversation (a summary job) left is of use to nobody: it
        # goes before any conversation's state, which would have to be parked.
        anonymous = [s for s in idle if s.key is None]
        return min(anonymous or idle, key=lambda s: (span(s), s.used))

    def _clear(self, seq: _Seq) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self._mem, seq.id, -1, -1)
        seq.tokens, seq.key = [], None

    def _evict(self, seq: _Seq) -> None:
        if seq.key is not None and seq.tokens:
            log.debug("%s: parking %s (%d tokens)", self.name, seq.key, len(seq.tokens))
            self.parking.put(seq.key, read_sequence(self._ctx.ctx, seq.id, seq.tokens))
        self._clear(seq)

    def _restore(self, seq: _Seq, key: str, prompt: Sequence[int]) -> str:
        found = self.parking.take(key)
        if found is None:
            return "cold"
        state, tier = found
        if common_prefix(state.tokens, prompt) < MIN_USEFUL_PREFIX:
            log.info("%s: the parked state of %s no longer matches: dropped", self.name, key)
            return "cold"
        if not self._load(seq, state):
            log.warning("%s: could not restore the parked state of %s", self.name, key)
            self._clear(seq)
            return "cold"
        return tier

    def _load(self, seq: _Seq, state: SavedState) -> bool:
        """Write ``state`` into ``seq``'s cells; whether llama.cpp took all of it."""
        import llama_cpp

        if not write_sequence(self._ctx.ctx, seq.id, state) or (
            llama_cpp.llama_memory_seq_pos_max(self._mem, seq.id) + 1 != len(state.tokens)
        ):
            return False
        seq.tokens = list(state.tokens)
        return True

    def _start_shared(self, seq: _Seq, key: str | None, prompt: Sequence[int]) -> str:
        """A fresh prompt: start from a beginning other conversations shared, if one is held,
        or plan to keep a copy of the one it shares with them (see :mod:`ai_model.prefixes`)."""
        state = self.shared.find(prompt)
        if state is None:
            seq.share_at = self.shared.boundary(key, prompt)
            return "cold"
        if not self._load(seq, state):  # _admit cuts what it loaded to what the prompt shares
            log.warning("%s: llama.cpp refused a shared beginning", self.name)
            self._clear(seq)
            seq.key = key
            return "cold"
        return "shared"

    def _admit(self, req: Request) -> None:
        import llama_cpp

        seq = self._pick(req.key)
        prompt = list(req.prompt)
        seq.share_at = 0
        if req.key is not None and seq.key == req.key:
            event = "resident"
        else:
            self._evict(seq)
            event = "cold" if req.key is None else self._restore(seq, req.key, prompt)
            seq.key = req.key
            if event == "cold":
                event = self._start_shared(seq, req.key, prompt)
        # The last prompt token is always evaluated again: its logits start the reply.
        keep = min(common_prefix(seq.tokens, prompt), len(prompt) - 1)
        if keep < len(seq.tokens):
            if not llama_cpp.llama_memory_seq_rm(self._mem, seq.id, keep, -1):
                llama_cpp.llama_memory_seq_rm(self._mem, seq.id, -1, -1)
                keep = 0
            del seq.tokens[keep:]
        # What llama.cpp itself holds for this sequence now, not what we believe it holds.
        reused = llama_cpp.llama_memory_seq_pos_max(self._mem, seq.id) + 1
        self._admitted += 1
        seq.req, seq.admitted, seq.prompt_len = req, self._admitted, len(prompt)
        seq.pending = prompt[keep:]
        seq.next_token, seq.n_generated = None, 0
        narrowed = req.grammar is not None or narrows(req.sampling)
        seq.sampler = make_sampler(req.sampling, pick=not narrowed)
        if narrowed:
            seq.check = GrammarCheck(self._vocab, self._n_vocab, req.grammar, req.sampling)
        seq.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        seq.text, seq.sent = "", 0
        seq.used = time.monotonic()
        self.admissions.append(Admission(req.key, seq.id, event, reused, len(seq.pending)))
        self.prompt_totals[0] += reused
        self.prompt_totals[1] += len(seq.pending)

    # -- one step -----------------------------------------------------------------------------

    def _step(self) -> None:
        import llama_cpp

        began = time.perf_counter()
        batch = self._batch.batch
        running = self._running()
        # What each sequence evaluates this step: its sampled token, or else a chunk of its
        # prompt.  Generating sequences come first, then prompts in arrival order, within
        # n_batch.
        work: dict[int, list[int]] = {}
        decoded = []
        for seq in running:
            if seq.next_token is not None:
                work[seq.id] = [seq.next_token]
                decoded.append(seq.id)
        budget = self.n_batch - len(work)
        prefill = []
        for seq in running:
            if not seq.pending or budget <= 0 or seq.req is None:
                continue
            size = min(seq.req.prefill_chunk or self.prefill_chunk, self.prefill_chunk, budget)
            if seq.share_at > len(seq.tokens):  # the shared beginning ends a chunk
                size = min(size, seq.share_at - len(seq.tokens))
            chunk = seq.pending[:size]
            work[seq.id] = chunk
            budget -= len(chunk)
            prefill.append((seq.id, len(chunk)))
        # Rows in ascending sequence order: llama.cpp takes a batch's KV streams as one range
        # when they come in order, and gathers them one by one otherwise (54 ms against 31 ms a
        # step for four generations, 135M model, 2 cores).
        rows: list[tuple[_Seq, int, bool]] = []  # (sequence, token, wants logits)
        for seq_id in sorted(work):
            seq = self.seqs[seq_id]
            tokens = work[seq_id]
            last = seq.next_token is not None or len(tokens) == len(seq.pending)
            for j, token in enumerate(tokens):
                i = len(rows)
                logits = last and j == len(tokens) - 1
                batch.token[i] = token
                batch.pos[i] = len(seq.tokens) + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = logits
                rows.append((seq, token, logits))
        batch.n_tokens = len(rows)
        start = time.perf_counter()
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        decode = time.perf_counter() - start
        if status != 0:
            self.steps.append(Step(tuple(decoded), tuple(prefill), decode))
            involved = {id(r[0]): r[0] for r in rows}.values()
            for seq in involved:
                self._fail(seq, RuntimeError(f"llama_decode returned {status}"))
            return
        for seq in running:
            if seq.next_token is not None:
                seq.tokens.append(seq.next_token)
                seq.next_token = None
        for seq_id, n in prefill:
            filled = self.seqs[seq_id]
            filled.tokens.extend(filled.pending[:n])
            del filled.pending[:n]
            if filled.share_at and len(filled.tokens) == filled.share_at:
                filled.share_at = 0
                self.shared.add(read_sequence(self._ctx.ctx, filled.id, filled.tokens))
        sampling = 0.0
        for i, (seq, _token, logits) in enumerate(rows):
            if logits and seq.req is not None:
                start = time.perf_counter()
                if seq.check is None:
                    token = int(seq.sampler.sample(self._ctx, i))
                else:
                    try:
                        token = seq.check.sample(seq.sampler.sampler, self._ctx.ctx, i)
                    except RuntimeError as exc:  # a grammar that allows nothing: this one alone
                        self._fail(seq, exc)
                        continue
                sampling += time.perf_counter() - start
                self._accept(seq, token)
        total = time.perf_counter() - began
        self.steps.append(Step(tuple(decoded), tuple(prefill), decode, sampling, total))

    def _piece_of(self, token: int) -> bytes:
        import llama_cpp

        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, 256, 0, False)
        return bytes(self._piece.raw[: max(n, 0)])

    def _accept(self, seq: _Seq, token: int) -> None:
        import llama_cpp

        req = seq.req
        assert req is not None
        if llama_cpp.llama_vocab_is_eog(self._vocab, token) or (
            llama_cpp.llama_vocab_is_control(self._vocab, token)
            and token not in req.allowed_controls
        ):
            # The end of the reply, or a control token no reply may hold (a turn header the
            # model wrote itself): the reply ends here, and the token is never evaluated, kept
            # or replayed.
            self._finish(seq)
            return
        seq.n_generated += 1
        seq.text += seq.decoder.decode(self._piece_of(token))
        text = seq.text
        window = max((len(s) for s in req.stops), default=0)
        hits = [i for s in req.stops if (i := text.find(s, max(0, seq.sent - window))) >= 0]
        if hits:
            end = min(hits)
            if end > seq.sent:
                self._send(req, text[seq.sent : end])
            seq.sent = len(text)
            self._finish(seq, flush=False)
            return
        safe = len(text) - held_back(text, req.stops)
        if safe > seq.sent:
            self._send(req, text[seq.sent : safe])
            seq.sent = safe
        seq.next_token = token
        if seq.n_generated >= req.max_tokens:
            self._finish(seq)

    def _finish(self, seq: _Seq, flush: bool = True) -> None:
        req = seq.req
        assert req is not None
        if flush and not req.cancel.is_set():
            text = seq.text + seq.decoder.decode(b"", final=True)
            if len(text) > seq.sent:
                self._send(req, text[seq.sent :])
        # The reply's own tokens, as evaluated: the next prompt reuses the cache through them.
        self.generated[seq.key] = tuple(seq.tokens[seq.prompt_len :])
        self.generated.move_to_end(seq.key)
        while len(self.generated) > MAX_REMEMBERED_REPLIES:
            self.generated.popitem(last=False)
        self._send(req, DONE)
        self._release(seq)

    def _send(self, req: Request, item: object) -> None:
        """Hand ``item`` to ``req``'s consumer at the next :meth:`_flush`, with the rest of the
        step's items: the event loop is woken once a step, not once a piece (see
        :class:`ai_model.handoff.Mailbox`, which wakes it as the next decode starts)."""
        self._outbox.append((req, item))

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        for req, item in out:
            req.emit(item)

    def _fail(self, seq: _Seq, exc: Exception) -> None:
        if seq.req is not None:
            self._send(seq.req, exc)
            self._send(seq.req, DONE)
        self._release(seq)
        self._clear(seq)  # its cache may be half-written: start it afresh next time

    def _release(self, seq: _Seq) -> None:
        if seq.sampler is not None:
            seq.sampler.close()
        if seq.check is not None:
            self.grammar_checks[0] += seq.check.checked
            self.grammar_checks[1] += seq.check.rejected
            seq.check.close()
            seq.check = None
        seq.req, seq.sampler, seq.next_token, seq.pending = None, None, None, []
        seq.used = time.monotonic()

    # -- shutdown -----------------------------------------------------------------------------

    def held_states(self) -> list[tuple[str, SavedState]]:
        """The resident conversations' states (after :meth:`close`)."""
        return [
            (s.key, read_sequence(self._ctx.ctx, s.id, s.tokens))
            for s in self.seqs
            if s.key is not None and s.tokens
        ]

    def free(self) -> None:
        self._batch.close()
