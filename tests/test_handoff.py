"""Pieces handed from a generation thread to the event loop (ai_model/handoff.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ai_model.handoff import DONE, Handoff, Mailbox, mailbox


async def test_pieces_posted_from_a_thread_arrive_in_order_with_few_wake_ups() -> None:
    handoffs = [Handoff() for _ in range(4)]
    box = mailbox(asyncio.get_running_loop())
    drains = 0
    drain = box._drain

    def counted() -> None:
        nonlocal drains
        drains += 1
        drain()

    box._drain = counted  # type: ignore[method-assign]

    def generate() -> None:
        for step in range(50):  # a scheduler step hands over one piece of each stream
            for i, handoff in enumerate(handoffs):
                handoff.emit(f"{i}:{step} ")
        for handoff in handoffs:
            handoff.emit(DONE)

    thread = threading.Thread(target=generate)
    thread.start()
    texts = ["".join([p async for p in h.pieces()]) for h in handoffs]
    thread.join()
    for i, text in enumerate(texts):
        assert text == "".join(f"{i}:{step} " for step in range(50))
    assert drains < 4 * 50  # posts made before the loop was woken rode on one wake-up


def test_a_closed_loop_tells_the_generation_nobody_listens() -> None:
    loop = asyncio.new_event_loop()

    async def make() -> Handoff:
        return Handoff()

    handoff = loop.run_until_complete(make())
    loop.close()
    handoff.emit("late")
    assert handoff.cancel.is_set()
    other = asyncio.new_event_loop()
    box = Mailbox(other)
    other.close()
    with pytest.raises(RuntimeError):
        box.post(asyncio.Queue(), "x")
