"""Tools end to end on the real embedded model (SmolLM2-135M, ChatML: the tagged format, held
to the call grammar).

SmolLM2's own template takes no tools, so they are offered with ``format = "all"``; and the
135M model never chooses a tool by itself (asked "What's 17% of 2,340?" with tools offered, it
answers "… = 5.68."), so these replies run with ``choice = "required"``: the first generation
is a call held to the grammar from its first token.  Everything after is the
model's own: which tool, its arguments, and the answer written from the result.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest

from ai_model.batched import BatchedModel
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.embedded import embedded_model_path
from chat.messages import IncomingMessage
from chat.tools.rounds import ToolSettings

GREEDY = {"office": ModelSettings(sampling=SamplingSettings(temperature=0.0, max_tokens=120))}
REQUIRED = ToolSettings(format="all", choice="required")  # SmolLM2's template takes none


class Recorded:
    """The model, with the prompts it was given."""

    def __init__(self, model: BatchedModel) -> None:
        self.model = model
        self.prompts: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def stream(self, tokens: Sequence[int], *args: Any, **kw: Any) -> AsyncIterator[str]:
        self.prompts.append(self.model.detokenize(tokens))
        return self.model.stream(tokens, *args, **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchedModel]:
    del tmp_path_factory
    settings = ModelSettings(parallel=2, state_dir="", n_ctx=2048)
    loaded = BatchedModel.load(settings, embedded_model_path(), "t")
    yield loaded
    loaded.close()


async def answer(core: Any, msg: IncomingMessage) -> str:
    return [r async for r in core.answers.respond(msg) if r.text][-1].text


async def test_a_sum_is_computed_by_the_tool_and_the_number_is_in_the_reply(
    make_core: Any, model: BatchedModel
) -> None:
    core = make_core({"office": model}, models=GREEDY, tools=REQUIRED)
    checked = model.scheduler.grammar_checks[0]
    ask = IncomingMessage("telegram", "telegram:12", "5", "Ann", "How much is 12 times 19?")
    reply = await answer(core, ask)
    assert "228" in reply and reply.endswith("Tools used: calculate.")
    assert "<tool_call>" not in reply and "<tool_response>" not in reply
    assert model.scheduler.grammar_checks[0] > checked  # the call was held to the grammar


async def test_a_search_runs_with_the_models_own_query_beyond_the_window(
    make_core: Any, model: BatchedModel
) -> None:
    """The search runs and its result reaches the next prompt as content.  Which words it
    looks for is the model's choice: the 135M model writes a query unrelated to the question
    (a timestamp), so finding the message is shown on the scripted model
    (``tests/test_tool_rounds.py``), not here."""
    recorded = Recorded(model)
    core = make_core({"office": recorded}, models=GREEDY, tools=REQUIRED)
    key = "telegram:-9"

    async def say(user: str, name: str, text: str) -> None:
        msg = IncomingMessage("telegram", key, user, name, text, mentions_bot=False)
        async for _ in core.answers.respond(msg):
            pass

    await say("1", "Ann", "The launch date is March 3rd, agreed.")
    for n in range(60):  # unaddressed chatter: the launch goes out of the 2,048-token window
        await say("2", "Bob", f"filler message number {n} about lunch and the weather today")
    ask = IncomingMessage("telegram", key, "1", "Ann", "What did we say about the launch date?")
    reply = await answer(core, ask)
    assert "March 3rd" not in recorded.prompts[0]  # before the window
    first, second = recorded.prompts
    assert second.startswith(first) and '"name": "search_history"' in second[len(first) :]
    assert "<tool_response>\nNo earlier message holds all of: " in second[len(first) :]
    assert reply.endswith("Tools used: search_history.")
