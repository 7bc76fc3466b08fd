"""Generation held to a grammar on the real embedded model: every call written under the
tool-call grammar parses and validates; a lazy grammar leaves a reply in words as it was; the
grammar is checked against the token the chain picks, and the vocabulary filtered only when
that token is turned down (llama.cpp's sample-then-check path)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ai_model.config import SamplingSettings
from ai_model.templates import encode
from chat.tools.builtin import Toolbox
from chat.tools.grammar import CLOSE, OPEN, call_grammar, call_in
from chat.tools.registry import BadCall, Tools, read_call
from tests.test_batching import load

SYSTEM = (
    "You can use tools. To use one, answer with exactly one call: "
    f'{OPEN}{{"name": "<tool>", "arguments": {{…}}}}{CLOSE}. Tools: current_time, calculate, '
    "set_reminder, list_reminders, cancel_reminder, search_history, search_documents."
)
QUESTIONS = [
    "What's 17% of 2,340?",
    "Remind me in 2 hours to send the report.",
    "What time is it in Tokyo?",
    "What did we decide about the launch date?",
    "Cancel my second reminder.",
    "Which reminders do I have?",
    "Find the venue in the documents.",
    "How much is 12 times 19?",
]


def tools() -> Tools:
    return Toolbox(None, None, None, None).tools()  # type: ignore[arg-type]


def ask(model: Any, question: str) -> list[int]:
    pieces = [*model.template.turn("system", SYSTEM), *model.template.turn("user", question)]
    return [*model.bos, *encode((*pieces, *model.template.generation_prompt()), model)]


async def generate(model: Any, question: str, seed: int, **kw: Any) -> str:
    sampling = SamplingSettings(max_tokens=256, temperature=0.8, seed=seed)
    pieces = [p async for p in model.stream(ask(model, question), sampling, **kw)]
    return "".join(pieces)


async def test_two_hundred_constrained_calls_all_parse_and_validate(tmp_path: Path) -> None:
    model = await load(tmp_path, parallel=4, state_dir="", n_ctx=1024)
    toolset = tools()
    grammar = call_grammar(toolset, lazy=False)
    malformed: list[tuple[str, str]] = []
    try:
        for batch in range(25):
            replies = await asyncio.gather(
                *(
                    generate(
                        model, QUESTIONS[i % len(QUESTIONS)], 1000 + batch * 8 + i, grammar=grammar
                    )
                    for i in range(8)
                )
            )
            for reply in replies:
                written = call_in(reply)
                try:
                    assert reply.startswith(OPEN) and reply.rstrip().endswith(CLOSE), "frame"
                    assert written is not None, "no call"
                    toolset.check(read_call(written, "arguments"))
                except (AssertionError, BadCall) as exc:
                    malformed.append((reply, str(exc)))
        checked, rejected = model.scheduler.grammar_checks
    finally:
        model.close()
    assert malformed == []
    assert checked > 200 * 10  # every token of every call was checked
    assert 0 < rejected < checked  # the chain's pick was turned down at times, not always


async def test_a_lazy_grammar_leaves_a_reply_in_words_as_it_was(tmp_path: Path) -> None:
    model = await load(tmp_path, parallel=2, state_dir="", n_ctx=1024)
    lazy = call_grammar(tools(), lazy=True)
    greedy = SamplingSettings(max_tokens=48, temperature=0.0, repeat_penalty=1.0)
    prompt = ask(model, "Say hello to the team in one sentence.")
    try:
        free = "".join([p async for p in model.stream(prompt, greedy)])
        held = "".join([p async for p in model.stream(prompt, greedy, grammar=lazy)])
    finally:
        model.close()
    assert OPEN not in free and free.strip()
    assert held == free
