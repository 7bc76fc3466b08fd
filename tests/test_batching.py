"""Continuous batching on the real embedded model: several conversations generate at once on
one llama.cpp context, each getting the reply it gets alone."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ai_model.base import GenerationError
from ai_model.batched import BACKGROUND_CHUNK, BatchedModel
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.embedded import embedded_model_path
from ai_model.local import LocalModel
from ai_model.parking import SavedState
from ai_model.prefixes import KEEP, SharedPrefixes
from ai_model.templates import Piece, encode
from chat.core import ConversationCore
from chat.messages import IncomingMessage, ReplyKind
from tests.test_window import sentence
from tests.waiting import wait_until

SAMPLING = SamplingSettings(max_tokens=40, seed=123, temperature=0.6)


async def load(tmp_path: Path, **changes: Any) -> BatchedModel:
    changes.setdefault("state_dir", str(tmp_path / "states"))
    changes.setdefault("n_ctx", 1024)
    settings = ModelSettings(**changes)
    return await asyncio.to_thread(BatchedModel.load, settings, embedded_model_path(), "t")


def prompt(model: Any, *turns: str) -> list[int]:
    pieces = [
        p for i, t in enumerate(turns) for p in model.template.turn(("user", "assistant")[i % 2], t)
    ]
    return [*model.bos, *encode((*pieces, *model.template.generation_prompt()), model)]


async def reply(
    model: Any,
    tokens: list[int],
    slot: str | None,
    sampling: SamplingSettings = SAMPLING,
    stamps: list[float] | None = None,
    after: int = 0,
    then: asyncio.Event | None = None,
) -> str:
    """The whole reply; ``then`` is set once ``after`` + 1 pieces have arrived."""
    pieces = []
    async for piece in model.stream(tokens, sampling, slot=slot):
        pieces.append(piece)
        if stamps is not None:
            stamps.append(time.perf_counter())
        if then is not None and len(pieces) > after:
            then.set()
    return "".join(pieces)


CONVERSATIONS = [
    ("Ann: Tell me about the old mill north of town.", "It burned down.", "Ann: And then?"),
    ("Bob: What is the capital of France?",),
    ("Cy: Write a haiku about rain.",),
    ("Dee: Plan my Monday.", "Gym, then the report.", "Dee: Move the gym to the evening."),
]


STORIES = [
    ("Ann: Tell me about the old mill north of town.", "It burned.", "Ann: Tell me all of it."),
    ("Bob: Describe Paris to a visitor in a long paragraph.",),
    ("Cy: Write a long poem about the rain on the sea.",),
    ("Dee: Plan my week.", "Gym, then the report.", "Dee: Explain each day in detail."),
]


async def test_four_conversations_stream_at_once_each_with_its_alone_reply(
    tmp_path: Path,
) -> None:
    model = await load(tmp_path, parallel=4)
    serial = await asyncio.to_thread(
        LocalModel.load, ModelSettings(n_ctx=1024, parallel=1), embedded_model_path(), "s"
    )
    try:
        prompts = [prompt(model, *turns) for turns in STORIES]
        alone = [await reply(model, p, f"c{i}") for i, p in enumerate(prompts)]
        from_serial = [await reply(serial, p, f"c{i}") for i, p in enumerate(prompts)]
        assert alone == from_serial  # a sequence alone samples what the serial path samples

        stamps: list[list[float]] = [[] for _ in prompts]
        streaming = [asyncio.Event() for _ in prompts]

        async def join(i: int) -> str:
            # Interleaved in time: each conversation starts once the previous one streams.
            if i:
                await streaming[i - 1].wait()
            return await reply(model, prompts[i], f"t{i}", stamps=stamps[i], then=streaming[i])

        steps_before = len(model.scheduler.steps)
        together = await asyncio.gather(*(join(i) for i in range(4)))
        steps = list(model.scheduler.steps)[steps_before:]
    finally:
        model.close()
        serial.close()
    assert together == alone and all(r.strip() for r in alone)
    # All four streamed at once: every stream's first piece came before any stream ended,
    # and some decodes carried a token of each of the four.
    assert max(s[0] for s in stamps) < min(s[-1] for s in stamps)
    assert any(len(step.decoded) == 4 for step in steps)


async def test_a_consumer_that_stops_listening_frees_its_sequence(tmp_path: Path) -> None:
    model = await load(tmp_path, parallel=2, state_dir="")
    long = SamplingSettings(max_tokens=300, seed=5, temperature=0.9)
    a, b, c = (prompt(model, f"{name}: Tell me a very long story.") for name in "ABC")
    try:
        first_of_c = asyncio.Event()
        got: dict[str, int] = {"a": 0, "b": 0}

        async def stream(key: str, tokens: list[int], stop_after: int | None = None) -> None:
            async with contextlib.aclosing(model.stream(tokens, long, slot=key)) as pieces:
                async for _ in pieces:
                    got[key] = got.get(key, 0) + 1
                    if key == "c":
                        first_of_c.set()
                        return
                    if stop_after is not None and got[key] >= stop_after:
                        return  # the consumer goes away mid-stream

        runner_b = asyncio.create_task(stream("b", b))
        await stream("a", a, stop_after=3)
        # Both sequences were busy; c was queued.  a's sequence frees at the next step.
        await asyncio.wait_for(stream("c", c), 30)
        assert not runner_b.done()  # b never stopped meanwhile
        runner_b.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner_b
    finally:
        model.close()
    admissions = {adm.key: adm for adm in model.scheduler.admissions}
    assert admissions["c"].seq == admissions["a"].seq
    assert len(model.generated("a")) < 10  # a stopped generating after about three tokens


async def test_a_long_prompt_is_evaluated_in_chunks_between_running_tokens(
    tmp_path: Path,
) -> None:
    model = await load(tmp_path, parallel=2, n_ctx=2048, prefill_chunk=64, state_dir="")
    rng = random.Random(4)
    short = prompt(model, "Ann: Write a long, detailed story about a dragon who opens a bakery.")
    long = prompt(model, "Bob: " + sentence(rng, 1100) + " Summarise that.")
    assert len(long) > 1100
    running = SamplingSettings(max_tokens=200, seed=3, temperature=0.0)
    try:
        third = asyncio.Event()
        first = asyncio.create_task(reply(model, short, "a", running, after=2, then=third))
        await third.wait()
        await reply(model, long, "b", SamplingSettings(max_tokens=4, seed=1))
        assert not first.done()  # a was still streaming when b's reply ended
        await first
    finally:
        model.close()
    seq_b = next(adm.seq for adm in model.scheduler.admissions if adm.key == "b")
    prefilling = [step for step in model.scheduler.steps if dict(step.prefill).get(seq_b)]
    assert sum(dict(step.prefill)[seq_b] for step in prefilling) == len(long)
    assert len(prefilling) >= len(long) // 64
    # No step evaluated more than one chunk of b, and every one of them also gave a its token.
    assert all(dict(step.prefill)[seq_b] <= 64 for step in prefilling)
    seq_a = next(adm.seq for adm in model.scheduler.admissions if adm.key == "a")
    assert all(seq_a in step.decoded for step in prefilling)


# Evaluating a prompt's last token alone gives slightly other logits than evaluating it inside
# a longer batch (llama.cpp's kernels differ by batch size, in the serial path too), so a
# restored conversation is compared with the same conversation left resident, not with a cold
# one: parking must change nothing at all.


@pytest.mark.parametrize(
    ("tier", "changes"),
    [("ram", {"park_mb": 256, "state_dir": ""}), ("disk", {"park_mb": 0})],
)
async def test_evicted_conversations_are_parked_and_restored_to_the_same_reply(
    tmp_path: Path, tier: str, changes: dict[str, Any]
) -> None:
    model = await load(tmp_path, parallel=2, **changes)
    turns = CONVERSATIONS[0]
    before = len(prompt(model, *turns))
    try:
        first = await reply(model, prompt(model, *turns), "a")
        follow_up = prompt(model, *turns, first, "Ann: Thanks. What should I pack?")
        assert await reply(model, prompt(model, *turns), "kept") == first
        resident = await reply(model, follow_up, "kept")  # never left its sequence
        assert model.scheduler.admissions[-1].event == "resident"

        await reply(model, prompt(model, *CONVERSATIONS[1]), "b")
        await reply(model, prompt(model, *CONVERSATIONS[2]), "c")  # a's sequence goes to b or c
        assert "a" not in model.scheduler.resident()
        restored = await reply(model, follow_up, "a")
        back = model.scheduler.admissions[-1]
    finally:
        model.close()
    assert back.event == tier and back.key == "a"
    assert back.reused >= before and back.computed < 30
    assert restored == resident and restored.strip()


async def test_a_restart_restores_conversations_saved_at_shutdown(tmp_path: Path) -> None:
    model = await load(tmp_path, parallel=2)
    turns = CONVERSATIONS[3]
    before = len(prompt(model, *turns))
    first = await reply(model, prompt(model, *turns), "d")
    follow_up = prompt(model, *turns, first, "Dee: And Tuesday?")
    assert await reply(model, prompt(model, *turns), "e") == first
    resident = await reply(model, follow_up, "e")
    model.close()
    assert len(list((tmp_path / "states").glob("*.state"))) == 2

    again = await load(tmp_path, parallel=2)
    try:
        restored = await reply(again, follow_up, "d")
        event = again.scheduler.admissions[-1]
    finally:
        again.close()
    assert event.event == "disk" and event.reused >= before
    assert restored == resident and restored.strip()

    # Another load setting (here the context size) never trusts those files.
    other = await load(tmp_path, parallel=2, n_ctx=2048)
    try:
        await reply(other, follow_up, "d")
        assert other.scheduler.admissions[-1].event == "cold"
    finally:
        other.close()


async def test_the_window_holds_in_every_sequence(tmp_path: Path, make_core) -> None:  # type: ignore[no-untyped-def]
    import llama_cpp

    small = ModelSettings(
        n_ctx=512, parallel=4, state_dir="", sampling=SamplingSettings(max_tokens=32, seed=1)
    )
    model = await asyncio.to_thread(BatchedModel.load, small, embedded_model_path(), "w")
    lengths: list[int] = []
    original = model.stream

    def recording(tokens, sampling, stop=(), slot=None, background=False, grammar=None):  # type: ignore[no-untyped-def]
        lengths.append(len(tokens))
        return original(tokens, sampling, stop, slot, background, grammar)

    model.stream = recording  # type: ignore[method-assign]
    core: ConversationCore = make_core(
        {"character": model, "office": model}, models={"character": small, "office": small}
    )
    rng = random.Random(9)
    kinds: list[ReplyKind | None] = []
    peak = [0] * 4

    async def channel(i: int) -> None:
        for _ in range(5):
            text = sentence(rng, 70)
            msg = IncomingMessage("console", f"console:w{i}", f"u{i}", f"P{i}", text, is_dm=True)
            kinds.append([r async for r in core.answers.respond(msg)][-1].kind)
            mem = llama_cpp.llama_get_memory(model._ctx.ctx)
            for seq in range(4):
                peak[seq] = max(peak[seq], llama_cpp.llama_memory_seq_pos_max(mem, seq) + 1)

    try:
        await asyncio.gather(*(channel(i) for i in range(4)))
    finally:
        model.close()
    assert kinds == [ReplyKind.ANSWER] * 20
    assert max(lengths) + 32 <= 512 and 0 < max(peak) <= 512
    for i in range(4):
        conv = await core.conversations.get("console", f"console:w{i}")
        assert conv.window_start_id > 1  # every conversation's window moved


async def test_waiting_requests_are_admitted_first_come_first_served(tmp_path: Path) -> None:
    model = await load(tmp_path, parallel=2, state_dir="")
    order = [f"k{i}" for i in range(7)]
    try:
        tasks = []
        for key in order:
            tasks.append(asyncio.create_task(reply(model, prompt(model, f"{key}: hello"), key)))
            await asyncio.sleep(0)  # submitted in this order
        replies = await asyncio.gather(*tasks)
        with pytest.raises(GenerationError, match="does not fit"):
            await reply(model, [1] * 1024, "too-long")
    finally:
        model.close()
    assert all(r.strip() for r in replies)
    assert [a.key for a in model.scheduler.admissions] == order


async def test_a_request_that_cannot_be_admitted_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = await load(tmp_path, parallel=2, state_dir="")
    original = model.scheduler.parking.take

    def broken(key: str) -> Any:
        if key == "bad":
            raise OSError("disk gone")
        return original(key)

    monkeypatch.setattr(model.scheduler.parking, "take", broken)
    try:
        good = asyncio.create_task(reply(model, prompt(model, *CONVERSATIONS[1]), "good"))
        with pytest.raises(GenerationError, match="disk gone"):
            await reply(model, prompt(model, *CONVERSATIONS[2]), "bad")
        assert (await good).strip()  # the other user was answered
        assert (await reply(model, prompt(model, *CONVERSATIONS[2]), "next")).strip()
    finally:
        model.close()


SYSTEM = (
    "You are a helpful, concise office assistant in a team chat. Answer clearly and politely. "
    "When several people talk to you, each of their messages starts with their name."
)
# Users whose messages begin alike: a shared beginning must still stop before their text.
ALIKE = "Ann: Please summarise the quarterly report for the board, in three short bullet points, "
FRESH = [ALIKE + "about sales.", ALIKE + "about hiring.", ALIKE + "about costs.", "Bob: Hello!"]


def with_system(model: Any, text: str) -> list[int]:
    pieces = [*model.template.turn("system", SYSTEM), *model.template.turn("user", text)]
    return [*model.bos, *encode((*pieces, *model.template.generation_prompt()), model)]


async def test_fresh_conversations_start_from_the_beginning_others_shared(tmp_path: Path) -> None:
    model = await load(tmp_path, parallel=2, state_dir="")
    plain = await load(tmp_path, parallel=2, state_dir="", shared_prefix_mb=0)
    system_part = len([*model.bos, *encode(model.template.turn("system", SYSTEM), model)])
    opening = len(encode([Piece(model.template.open["user"], True)], model))
    try:
        prompts = [with_system(model, text) for text in FRESH]
        short = replace(SAMPLING, max_tokens=16)
        replies = [await reply(model, p, f"fresh-{i}", short) for i, p in enumerate(prompts)]
        events = list(model.scheduler.admissions)
        unshared = [await reply(plain, p, f"fresh-{i}", short) for i, p in enumerate(prompts)]
        plain_events = list(plain.scheduler.admissions)
    finally:
        model.close()
        plain.close()
    # The first two are evaluated whole; from the third on, only what is their own.
    assert [e.event for e in events] == ["cold", "cold", "shared", "shared"]
    assert [e.event for e in plain_events] == ["cold"] * 4
    # The shared part is the system turn and the next turn's opening markup (ChatML's
    # "<|im_start|>user\n"): never the users' text, though the first three messages begin
    # with the same words.
    assert opening > 1
    assert all(e.reused == system_part + opening for e in events[2:])
    assert events[2].computed == len(prompts[2]) - system_part - opening
    assert replies == unshared and all(r.strip() for r in replies)


def test_shared_beginnings_end_at_a_turn_and_come_from_other_conversations() -> None:
    control = {0, 50}  # token ids standing for chat markup
    shared = SharedPrefixes(10_000, lambda t: t in control)
    base = [0, *range(1, 50), 50, *range(51, 60)]  # a turn boundary after token 50
    assert shared.boundary("a", [*base, 100, 101]) == 0  # nothing to compare with yet
    assert shared.boundary("a", [*base, 102, 103]) == 0  # its own earlier prompt does not count
    assert shared.boundary("b", [*base, 104]) == 51  # cut back to the control token
    shared.add(SavedState(tuple(base[:51]), bytearray(6_000)))
    assert shared.boundary("c", [*base, 105]) == 0  # already held
    found = shared.find([*base[:40], 7, 7])
    assert found is not None and found.tokens == tuple(base[:51])  # cut at 40 when loaded
    assert shared.find([*base[:20], 9]) is None  # too little in common to be worth it
    shared.add(SavedState(tuple(range(200, 260)), bytearray(6_000)))  # past the budget
    assert shared.find([*base, 1]) is None and shared.nbytes == 6_000
    # With the template's openings known, a beginning takes in the rest of the opening that
    # its last control token starts (50 opens a turn as 50, 60, 61), and no further.
    opened = SharedPrefixes(10_000, lambda t: t in control, openings=[(50, 60, 61)])
    opened.boundary("a", [*base[:51], 60, 61, 100, 101])
    assert opened.boundary("b", [*base[:51], 60, 61, 100, 102]) == 53
    other = SharedPrefixes(10_000, lambda t: t in control, openings=[(50, 60, 61)])
    other.boundary("a", [*base[:51], 60, 62, 1])
    assert other.boundary("b", [*base[:51], 60, 62, 2]) == 51  # not a whole opening: at 50
    roomy = SharedPrefixes(10**9, lambda t: t in control)
    for n in range(KEEP + 2):  # more beginnings than are held: the oldest go first
        roomy.add(SavedState(tuple(range(1000 * n, 1000 * n + 40)), bytearray(10)))
    assert roomy.nbytes == KEEP * 10
    assert roomy.find([*range(0, 40), 1]) is None and roomy.find([*range(5000, 5040), 1])


async def test_background_work_is_evaluated_in_small_steps(tmp_path: Path) -> None:
    """A summary job's long prompt never holds a reply that starts meanwhile for more than a
    small step; a reply's own prompt still goes in full chunks."""
    model = await load(tmp_path, parallel=2, n_ctx=2048, state_dir="")
    rng = random.Random(5)
    summary_job = prompt(model, "Ann: " + sentence(rng, 700) + " Summarise that.")
    question = prompt(model, "Bob: " + sentence(rng, 60) + " What do you think?")
    assert len(question) > BACKGROUND_CHUNK
    try:
        job = asyncio.create_task(
            collect(model.stream(summary_job, SamplingSettings(max_tokens=4), background=True))
        )
        await wait_until(lambda: model.scheduler.steps)  # the job is being evaluated
        answer = await reply(model, question, "b", SamplingSettings(max_tokens=4, seed=1))
        await job
    finally:
        model.close()
    seq_job = model.scheduler.admissions[0].seq
    seq_b = next(adm.seq for adm in model.scheduler.admissions if adm.key == "b")
    job_steps = [
        dict(step.prefill)[seq_job]
        for step in model.scheduler.steps
        if dict(step.prefill).get(seq_job)
    ]
    b_steps = [
        dict(step.prefill)[seq_b] for step in model.scheduler.steps if dict(step.prefill).get(seq_b)
    ]
    assert sum(job_steps) == len(summary_job) and max(job_steps) == BACKGROUND_CHUNK
    assert b_steps == [len(question)] and answer.strip()


async def test_serial_background_work_stops_between_small_steps(
    smollm: LocalModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the serial path too (one generation at a time), a summary job's long prompt goes in
    small steps, and a job that stops (a reply needs the model) frees the model within a step:
    the reply queued behind it does not wait for the rest of the job's prompt."""
    rng = random.Random(6)
    summary_job = prompt(smollm, "Ann: " + sentence(rng, 700) + " Summarise that.")
    question = prompt(smollm, "Bob: " + sentence(rng, 40) + " What do you think?")
    alone = await reply(smollm, question, "b", SamplingSettings(max_tokens=8, seed=1))
    evaluated: list[tuple[str, int]] = []  # (who, how many tokens) per llama.cpp evaluation
    who = ["job"]
    real_eval = smollm.llama.eval

    def eval_(tokens: Any) -> None:
        evaluated.append((who[0], len(tokens)))
        real_eval(tokens)

    monkeypatch.setattr(smollm.llama, "eval", eval_)
    job = asyncio.create_task(
        collect(smollm.stream(summary_job, SamplingSettings(max_tokens=4), background=True))
    )
    await wait_until(lambda: evaluated)  # the job's prompt is being evaluated
    answer = asyncio.create_task(
        reply(smollm, question, "b", SamplingSettings(max_tokens=8, seed=1))
    )
    await asyncio.sleep(0)  # the reply is queued for the model's turn
    job.cancel()  # what MemoryKeeper.make_room does when a reply starts
    with contextlib.suppress(asyncio.CancelledError):
        await job
    who[0] = "reply"
    assert await answer == alone  # the reply did not notice the job
    job_steps = [n for name, n in evaluated if name == "job"]
    assert set(job_steps) == {BACKGROUND_CHUNK}  # small steps
    assert sum(job_steps) <= len(summary_job) // 4  # stopped long before the end
    assert [name for name, _ in evaluated] == ["job"] * len(job_steps) + ["reply"] * (
        len(evaluated) - len(job_steps)
    )


async def test_summary_jobs_reuse_their_own_sequence_not_a_conversations(
    tmp_path: Path,
) -> None:
    """Work without a conversation (summary jobs) takes a sequence; once it has one, the next
    job reuses it instead of parking another conversation."""
    model = await load(tmp_path, parallel=2, n_ctx=2048, state_dir="")
    short = SamplingSettings(max_tokens=4, seed=1)
    try:
        await reply(model, prompt(model, "Hello from a."), "a", short)
        await reply(model, prompt(model, "Hello from b."), "b", short)
        for n in range(3):
            job = prompt(model, f"Summarise chapter {n}: the ship sailed north.")
            await collect(model.stream(job, short, background=True))
        await reply(model, prompt(model, "Hello from b.", "Hi.", "Still there?"), "b", short)
    finally:
        model.close()
    events = [(adm.key, adm.event) for adm in model.scheduler.admissions]
    assert events[:2] == [("a", "cold"), ("b", "cold")]
    assert events[-1] == ("b", "resident")  # the jobs parked a (the least recent) and only a
    job_seqs = {adm.seq for adm in model.scheduler.admissions if adm.key is None}
    assert len(job_seqs) == 1


async def collect(pieces: Any) -> str:
    return "".join([piece async for piece in pieces])


async def test_a_flood_of_new_conversations_keeps_the_state_folder_within_its_budget(
    tmp_path: Path,
    make_core,  # type: ignore[no-untyped-def]
    store,  # type: ignore[no-untyped-def]
) -> None:
    """Every conversation past the two sequences is parked, and spills to disk (no RAM
    tier): the folder never holds more than ``state_dir_max_mb``, the newest states are kept,
    and messages keep being stored."""
    folder = tmp_path / "states"
    small = ModelSettings(
        n_ctx=1024,
        parallel=2,
        park_mb=0,
        state_dir=str(folder),
        state_dir_max_mb=2,
        sampling=SamplingSettings(max_tokens=8, seed=1),
    )
    model = await asyncio.to_thread(BatchedModel.load, small, embedded_model_path(), "f")
    core: ConversationCore = make_core(
        {"character": model, "office": model}, models={"character": small, "office": small}
    )
    rng = random.Random(4)
    peak = 0
    try:
        for i in [*range(12), 9]:
            text = sentence(rng, 30)
            msg = IncomingMessage("console", f"console:f{i}", f"u{i}", f"P{i}", text, is_dm=True)
            assert [r async for r in core.answers.respond(msg)][-1].kind is ReplyKind.ANSWER
            for _ in range(20):  # the spill thread writes while the next one is asked
                peak = max(peak, sum(p.stat().st_size for p in folder.glob("*")))
                await asyncio.sleep(0.01)
        events = [a.event for a in model.scheduler.admissions]
    finally:
        model.close()
    assert 0 < peak <= 2 * 2**20
    assert sum(p.stat().st_size for p in folder.glob("*")) <= 2 * 2**20
    assert events[-1] == "disk"  # the latest parked came back from its file; older ones went
    stored = 0
    for i in range(12):
        conv = await core.conversations.get("console", f"console:f{i}")
        stored += len(await store.messages.history(conv.id))
    assert stored == 2 * 13
