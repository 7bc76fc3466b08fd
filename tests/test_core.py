"""The conversation core: routing, ordering, persistence, group names and failures."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import pytest

from ai_model.base import ChatModel, GenerationError
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.registry import ModelRegistry
from ai_model.sampling import Grammar
from chat.core import APOLOGY, ConversationCore
from chat.messages import IncomingMessage, OutgoingReply, ReplyKind
from chat.settings import Settings
from storage import Store, open_database
from storage.records import ASSISTANT, USER
from tests.conftest import BACKENDS, FixedModels
from tests.scripted import ScriptedModel
from tests.waiting import wait_until


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Every test here that uses the database runs on SQLite and on PostgreSQL."""
    return str(request.param)


def text_of(prompt: Sequence[int]) -> str:
    """Decode a ScriptedModel (byte tokenizer) prompt, control tokens shown as ¦."""
    return bytes(t if t < 256 else ord("|") for t in prompt).decode("utf-8", "replace")


def echo_last_user(prompt: Sequence[int]) -> str:
    text = text_of(prompt)
    last = text.rsplit("user\n", 1)[1].split("|", 1)[0]
    name, named, rest = last.partition(": ")  # a name only when several people talk
    return f"re: {rest if named and name.isalpha() else last}"


def dm(text: str, key: str = "console:me", name: str = "Ann") -> IncomingMessage:
    return IncomingMessage("console", key, name.lower(), name, text, is_dm=True)


async def collect(core: ConversationCore, msg: IncomingMessage) -> list[OutgoingReply]:
    return [reply async for reply in core.answers.respond(msg)]


async def test_routing_sends_roleplay_to_the_character_model_and_work_to_office(
    settings: Settings, store: Store
) -> None:
    # Two different load settings, so the registry really loads two models.
    models = {
        "character": ModelSettings(n_ctx=2048, sampling=SamplingSettings(max_tokens=24, seed=3)),
        "office": ModelSettings(n_ctx=4096, sampling=SamplingSettings(max_tokens=24, seed=3)),
    }
    registry = ModelRegistry(models)
    assert not registry.shares_model("character", "office")
    settings = replace(settings, models=models)
    served: list[tuple[str, ChatModel, str]] = []

    class Spy:
        async def get(self, role: str) -> ChatModel:
            model = await registry.get(role)
            original = model.stream

            def stream(tokens, sampling, stop=(), slot=None, background=False, grammar=None):  # type: ignore[no-untyped-def]
                served.append((role, model, model.detokenize(tokens)))  # type: ignore[attr-defined]
                return original(tokens, sampling, stop, slot, background, grammar)

            model.stream = stream  # type: ignore[method-assign]
            return model

    core = ConversationCore(settings, store, Spy())
    try:
        await core.actions.set_mode("discord", "discord:rp", "roleplay")
        rp = IncomingMessage("discord", "discord:rp", "1", "Ann", "Hello innkeeper!")
        work = IncomingMessage("discord", "discord:work", "1", "Ann", "Draft an agenda.")
        for msg in (rp, work):
            replies = await collect(core, msg)
            assert replies[-1].final and replies[-1].kind is ReplyKind.ANSWER
            assert replies[-1].text
        (role1, model1, prompt1), (role2, model2, prompt2) = served
        assert (role1, role2) == ("character", "office")
        assert model1 is await registry.get("character")
        assert model2 is await registry.get("office") and model1 is not model2
        assert "You are Mira" in prompt1 and "office assistant" in prompt2
        assert replies[-1].speaker is None
    finally:
        registry.close()


def test_roles_with_the_same_file_and_settings_share_one_model() -> None:
    registry = ModelRegistry({"character": ModelSettings(), "office": ModelSettings()})
    assert registry.shares_model("character", "office")


async def test_messages_of_one_channel_are_answered_in_order_one_at_a_time(make_core) -> None:  # type: ignore[no-untyped-def]
    model = ScriptedModel(echo_last_user, delay=0.01)
    core: ConversationCore = make_core({"character": model, "office": model})
    finished: list[int] = []

    async def send(i: int) -> list[OutgoingReply]:
        replies = await collect(core, dm(f"message {i}"))
        finished.append(i)
        return replies

    results = await asyncio.gather(*(send(i) for i in range(5)))
    assert finished == [0, 1, 2, 3, 4]
    assert [r[-1].text for r in results] == [f"re: message {i}" for i in range(5)]
    for i, prompt in enumerate(model.prompts):
        text = text_of(prompt)
        # Each answer saw the earlier messages and answers, but not the later messages,
        # although those were already stored when it was generated.
        assert all(f"message {j}" in text for j in range(i + 1))
        assert all(f"re: message {j}" in text for j in range(i))
        assert f"message {i + 1}" not in text
        assert text.index(f"message {i}") > text.rindex(f"re: message {i - 1}") if i else True


async def test_channels_do_not_wait_for_each_other(make_core) -> None:  # type: ignore[no-untyped-def]
    character = ScriptedModel(["*bows*"])
    office = ScriptedModel(["Here is the agenda."])
    character.gate = asyncio.Event()
    core: ConversationCore = make_core({"character": character, "office": office})
    await core.actions.set_mode("discord", "discord:rp", "roleplay")
    slow = asyncio.create_task(
        collect(core, IncomingMessage("discord", "discord:rp", "1", "Ann", "Hi"))
    )
    fast = await asyncio.wait_for(
        collect(core, IncomingMessage("discord", "discord:work", "1", "Ann", "Agenda?")), 5
    )
    assert fast[-1].text == "Here is the agenda." and not slow.done()
    character.gate.set()
    assert (await slow)[-1].text == "*bows*"


async def test_history_and_mode_survive_a_restart(settings: Settings) -> None:
    model = ScriptedModel(echo_last_user)
    for text in ("remember the blue door", "and the silver key"):
        store = Store(await open_database(settings.database_url))
        core = ConversationCore(settings, store, FixedModels({"character": model, "office": model}))
        if text.startswith("remember"):
            await core.actions.set_mode("console", "console:me", "roleplay")
        await collect(core, dm(text))
        await store.close()  # the process ends
    last = text_of(model.prompts[-1])
    assert "remember the blue door" in last and "re: remember the blue door" in last
    assert "You are Mira" in last  # the roleplay mode was kept too


async def test_group_messages_carry_names_and_unaddressed_ones_are_only_stored(make_core) -> None:  # type: ignore[no-untyped-def]
    model = ScriptedModel(["Welcome, both of you."])
    core: ConversationCore = make_core({"character": model, "office": model})
    key = "telegram:-100"
    quiet = IncomingMessage("telegram", key, "2", "Bob", "I sit by the fire.", mentions_bot=False)
    assert await collect(core, quiet) == []
    assert model.prompts == []
    loud = IncomingMessage("telegram", key, "1", "Ann\nsystem", "Barkeep, two ales!")
    replies = await collect(core, loud)
    assert replies[-1].text == "Welcome, both of you."
    text = text_of(model.prompts[-1])
    assert "Bob: I sit by the fire." in text and "Ann system: Barkeep, two ales!" in text
    assert "\nBob:" in model.stops[-1] and "\nAnn system:" in model.stops[-1]


class FailingModel(ScriptedModel):
    async def stream(
        self,
        tokens: Sequence[int],
        sampling: SamplingSettings,
        stop: Sequence[str] = (),
        slot: str | None = None,
        background: bool = False,
        grammar: Grammar | None = None,
    ) -> AsyncIterator[str]:
        yield "Half a th"
        raise GenerationError("llama_decode returned -1")


async def test_a_failed_generation_apologises_and_loses_nothing(make_core, caplog) -> None:  # type: ignore[no-untyped-def]
    model = FailingModel()
    core: ConversationCore = make_core({"character": model, "office": model})
    replies = await collect(core, dm("Are you there?"))
    assert replies[-1].final and replies[-1].kind is ReplyKind.ERROR
    assert replies[-1].text == APOLOGY
    assert "llama_decode returned -1" in caplog.text
    conv = await core.conversations.get("console", "console:me")
    history = await core.store.messages.history(conv.id)
    assert [(m.role, m.text) for m in history] == [(USER, "Are you there?")]
    assert ASSISTANT not in {m.role for m in history}


async def test_reset_starts_a_fresh_prompt_but_keeps_the_rows(make_core) -> None:  # type: ignore[no-untyped-def]
    model = ScriptedModel(echo_last_user)
    core: ConversationCore = make_core({"character": model, "office": model})
    await collect(core, dm("old topic"))
    await core.actions.reset("console", "console:me")
    await collect(core, dm("new topic"))
    assert "old topic" not in text_of(model.prompts[-1])
    conv = await core.conversations.get("console", "console:me")
    assert await core.store.messages.count(conv.id) == 4


async def test_commands_take_the_conversations_turn(make_core) -> None:  # type: ignore[no-untyped-def]
    model = ScriptedModel(echo_last_user, delay=0.02)
    core: ConversationCore = make_core({"character": model, "office": model})
    first = asyncio.create_task(collect(core, dm("old topic")))
    await asyncio.sleep(0.01)  # the answer to "old topic" is being written
    reset = asyncio.create_task(core.actions.reset("console", "console:me"))
    await asyncio.sleep(0)
    after = asyncio.create_task(collect(core, dm("new topic")))
    await asyncio.gather(first, reset, after)
    assert (await first)[-1].text == "re: old topic"  # finished before the reset acted
    fresh = text_of(model.prompts[-1])
    assert "new topic" in fresh and "old topic" not in fresh
    # The answer to the earlier message, stored after the command arrived, stays out too.
    conv = await core.conversations.get("console", "console:me")
    history = await core.store.messages.history(conv.id, after_id=conv.reset_after_id)
    assert [m.text for m in history] == ["new topic", "re: new topic"]
    # A mode change waits for the answer in flight, then applies to what follows.
    pending = asyncio.create_task(collect(core, dm("still work?")))
    await asyncio.sleep(0.01)
    await core.actions.set_mode("console", "console:me", "roleplay")
    assert pending.done() and (await pending)[-1].text == "re: still work?"


async def test_real_model_serves_one_generation_at_a_time_in_arrival_order(smollm) -> None:  # type: ignore[no-untyped-def]
    from ai_model.templates import encode

    sampling = SamplingSettings(max_tokens=8, seed=5)
    spans: dict[int, tuple[float, float]] = {}
    loop = asyncio.get_running_loop()

    def prompt_for(i: int) -> list[int]:
        pieces = smollm.template.turn("user", f"Say the number {i}.")
        return [*smollm.bos, *encode((*pieces, *smollm.template.generation_prompt()), smollm)]

    async def ask(i: int) -> None:
        first = None
        async for _ in smollm.stream(prompt_for(i), sampling):
            first = first or loop.time()
        assert first is not None
        spans[i] = (first, loop.time())

    # A listener that gives up after one piece must not leave the model busy or locked.
    async for _ in smollm.stream(prompt_for(99), SamplingSettings(max_tokens=64, seed=5)):
        break
    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(ask(i)))
        await asyncio.sleep(0)  # requests arrive in this order
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    starts = sorted(spans, key=lambda i: spans[i][0])
    assert starts == [0, 1, 2, 3]
    for a, b in itertools.pairwise(starts):
        assert spans[a][1] <= spans[b][0]  # no overlap: one generation at a time


async def test_a_mode_change_waiting_for_its_turn_is_made_before_the_next_message_is_taken_in(
    make_core,  # type: ignore[no-untyped-def]
) -> None:
    """A message that arrives after /mode is taken in under the new mode, even while /mode
    waits for an answer in flight (this once let a message get the old mode's greeting)."""
    office, character = ScriptedModel(["Noted."]), ScriptedModel(["*Mira nods.*"])
    core: ConversationCore = make_core({"character": character, "office": office})
    office.gate = asyncio.Event()
    first = asyncio.create_task(collect(core, dm("the agenda")))
    await wait_until(lambda: office.prompts)
    change = asyncio.create_task(
        core.actions.set_mode("console", "console:me", "roleplay", core.queues.arrive("console:me"))
    )
    after = asyncio.create_task(collect(core, dm("hello there")))
    await asyncio.sleep(0.2)
    office.gate.set()
    await asyncio.gather(first, change)
    replies = await after
    finals = [r.text for r in replies if r.final]
    greeting = core.characters.find("Mira")
    assert greeting is not None and finals[0].startswith(greeting.greeting[:20])  # the scene opens
    assert finals[-1] == "*Mira nods.*" and len(office.prompts) == 1
