"""A second real generating model: Gemma 3 270M (a base model with no chat template in its
file), framed with the named ``gemma`` format: no system role, strict alternation, replies
ending at ``<end_of_turn>``; through the core and through Telegram's local server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ai_model.config import ModelSettings, SamplingSettings
from ai_model.local import LocalModel
from ai_model.templates import GEMMA, encode
from bot.app import run_platforms
from chat.core import ConversationCore
from chat.messages import IncomingMessage
from chat.settings import parse_settings
from tests.fake_telegram import FakeTelegram

GROUP = -100300
ANN, BOB = 601, 602
END_OF_TURN = "<end_of_turn>"


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    from ai_model.embedded import EmbeddedModelMissing, gemma_model_path

    try:
        return gemma_model_path()
    except EmbeddedModelMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Gemma 3 270M is not installed in CI ({exc}): make bootstrap installs it")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def gemma_llama(gemma_path: Path) -> Iterator[Any]:
    """One llama.cpp instance of Gemma for the module."""
    from llama_cpp import Llama

    from ai_model.local import _llama_kwargs

    llm = Llama(**_llama_kwargs(ModelSettings(n_ctx=2048), gemma_path))
    yield llm
    llm.close()


@pytest.fixture
def gemma_model(gemma_llama: Any, gemma_path: Path) -> Iterator[LocalModel]:
    """The real :class:`LocalModel` on it, per test (its turn lock lives in the test's loop)."""
    from ai_model.local import llama_template

    template = llama_template(ModelSettings(chat_template="gemma"), gemma_llama, gemma_path)
    model = LocalModel(gemma_llama, "Gemma 3 270M", template, 2048)
    yield model
    model._executor.shutdown(wait=True)


class Recording:
    """The real model, recording each prompt it is asked to continue."""

    def __init__(self, model: LocalModel) -> None:
        self.model = model
        self.prompts: list[list[int]] = []
        self.name, self.template, self.n_ctx, self.bos = (
            model.name,
            model.template,
            model.n_ctx,
            model.bos,
        )

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_bos, special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.model.detokenize(tokens)

    def generated(self, slot: str | None) -> Sequence[int]:
        return self.model.generated(slot)

    def upcoming(self, slot: str | None) -> None:
        self.model.upcoming(slot)

    async def stream(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> AsyncIterator[str]:
        self.prompts.append(list(tokens))
        async for piece in self.model.stream(tokens, *args, **kwargs):
            yield piece


def _special_text(model: LocalModel, tokens: list[int]) -> str:
    return bytes(model.llama.detokenize(tokens, special=True)).decode("utf-8", "replace")


def test_end_of_turn_is_an_end_of_generation_token_of_the_vocabulary(
    gemma_model: LocalModel,
) -> None:
    import llama_cpp

    (eot,) = gemma_model.tokenize(END_OF_TURN.encode(), add_bos=False, special=True)
    vocab = llama_cpp.llama_model_get_vocab(gemma_model.llama.model)
    assert llama_cpp.llama_vocab_is_eog(vocab, eot)
    assert gemma_model.template is GEMMA  # named: the file has no template of its own
    assert "tokenizer.chat_template" not in gemma_model.llama.metadata


async def test_a_reply_ends_at_end_of_turn_which_is_never_shown_or_kept(
    gemma_model: LocalModel,
) -> None:
    (eot,) = gemma_model.tokenize(END_OF_TURN.encode(), add_bos=False, special=True)
    llm = gemma_model.llama
    sample = llm.sample
    calls = 0

    def sample_then_end(*args: Any, **kwargs: Any) -> int:
        # The model is a base model: it rarely ends a turn by itself, so it is made to, on
        # its fourth token, with the id the vocabulary marks as end of generation.
        nonlocal calls
        calls += 1
        return eot if calls == 4 else int(sample(*args, **kwargs))

    llm.sample = sample_then_end
    try:
        prompt = [
            *gemma_model.bos,
            *encode(
                [*GEMMA.turn("user", "Tell me a long story."), *GEMMA.generation_prompt()],
                gemma_model,
            ),
        ]
        greedy = SamplingSettings(max_tokens=40, temperature=0.0, seed=1)
        text = "".join([p async for p in gemma_model.stream(prompt, greedy, slot="eot")])
    finally:
        llm.sample = sample
    assert calls == 4  # it stopped at the end-of-turn token, not at max_tokens
    assert END_OF_TURN not in text and text.strip()
    assert eot not in gemma_model.generated("eot")


async def test_gemma_answers_a_two_player_scene_through_the_core(
    gemma_model: LocalModel, make_core: Any
) -> None:
    recording = Recording(gemma_model)
    core: ConversationCore = make_core({"character": recording, "office": recording})
    key = "telegram:-1"
    await core.actions.set_mode("telegram", key, "roleplay")
    for who, words in (
        ("Ann", "Mira, two ales please!"),
        ("Bob", "And some bread, Mira."),
        ("Ann", "Mira, is there a room free?"),
    ):
        message = IncomingMessage("telegram", key, who, who, words, is_dm=False)
        replies = [r async for r in core.answers.respond(message)]
        assert replies[-1].final and replies[-1].text.strip()
    shown = _special_text(gemma_model, recording.prompts[-1])
    # No system role: the pinned part is the first user turn's start; turns alternate.
    assert "<start_of_turn>system" not in shown
    first = shown.split("<start_of_turn>user\n", 1)[1]
    assert first.startswith("This is a roleplay chat. You are Mira.")
    roles = [t.split("\n", 1)[0] for t in shown.split("<start_of_turn>")[1:]]
    assert roles[-1] == "model"
    assert all(a != b for a, b in itertools.pairwise(roles)), roles
    assert "Ann: Mira, two ales please!" in shown and "Bob: And some bread, Mira." in shown
    assert shown.count("<bos>") == 1
    # Once both players are in the scene, each prompt extends the one before up to its cue
    # (the first reply's text may tokenize apart from what was generated): the cache is reused.
    first_prompt, second = recording.prompts[-2], recording.prompts[-1]
    assert second[: len(first_prompt) - 3] == first_prompt[:-3]


async def test_gemma_plays_a_two_player_scene_over_telegram(
    gemma_path: Path, tmp_path: Path
) -> None:
    server = FakeTelegram()
    await server.start()
    gemma = {
        "path": str(gemma_path),
        "chat_template": "gemma",
        "n_ctx": 2048,
        "sampling": {"max_tokens": 24, "seed": 3},
    }
    settings = parse_settings(
        {"models": {"character": gemma, "office": gemma}},
        env={"TELEGRAM_BOT_TOKEN": "1:t", "TELEGRAM_BASE_URL": server.base_url},
    )
    settings = replace(settings, database_url=f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    task = asyncio.create_task(run_platforms(settings))
    try:
        await server.wait_for(lambda: "setMyCommands" in server.methods())
        server.admins.add((GROUP, ANN))
        server.push(GROUP, ANN, "Ann", "/mode roleplay")
        await server.wait_for(lambda: len(server.bot_messages(GROUP)) >= 2)  # set + greeting
        asked = {
            server.push(GROUP, ANN, "Ann", "Mira, two ales please!"),
            server.push(GROUP, BOB, "Bob", "Mira, what news from the road?"),
        }

        def answered() -> bool:
            return {m.reply_to for m in server.bot_messages(GROUP)} >= asked

        await server.wait_for(answered, within=180)
        answers = [m for m in server.bot_messages(GROUP) if m.reply_to in asked]
        assert all(m.text.strip() and END_OF_TURN not in m.text for m in answers)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        await server.stop()
