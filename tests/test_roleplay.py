"""Roleplay prompt discipline, lorebooks, greetings and swipes, group scenes, output cleaning."""

from __future__ import annotations

import random
import re
from typing import Any

from ai_model.config import ModelSettings, SamplingSettings
from chat.core import ConversationCore
from chat.messages import IncomingMessage, OutgoingReply, ReplyKind
from chat.roleplay.characters import card_from_fields, character_from_card
from chat.roleplay.lorebook import Lorebook, activate, match_entries
from chat.roleplay.scene import choose_speakers, clean_reply, stop_strings, strip_name_tag
from tests.scripted import ScriptedModel
from tests.test_core import text_of

KEY = "discord:scene"


def say(name: str, text: str, mentions: bool = True) -> IncomingMessage:
    return IncomingMessage("discord", KEY, name.lower(), name, text, mentions_bot=mentions)


async def run(core: ConversationCore, msg: IncomingMessage) -> list[OutgoingReply]:
    return [r async for r in core.answers.respond(msg) if r.final]


async def roleplay_core(make_core: Any, model: ScriptedModel, **changes: Any) -> ConversationCore:
    core: ConversationCore = make_core({"character": model, "office": model}, **changes)
    await core.actions.set_mode("discord", KEY, "roleplay")
    return core


def card(**data: Any) -> dict[str, Any]:
    name = data.pop("name", "Seraphine")
    data.setdefault("description", "{{char}} guards <USER>'s library.")
    return card_from_fields(name, creator_notes="SECRET NOTE", **data)


async def test_story_is_pinned_examples_drop_first_and_macros_apply(make_core: Any) -> None:
    examples = "<START>\n{{user}}: Where is the atlas?\n{{char}}: " + "Shelf nine. " * 60
    model = ScriptedModel(["Indeed."], n_ctx=2048)
    small = ModelSettings(n_ctx=2048, sampling=SamplingSettings(max_tokens=128))
    core = await roleplay_core(make_core, model, models={"character": small, "office": small})
    await core.library.import_card(
        card(
            mes_example=examples,
            system_prompt="{{original}} Mind the candles.",
            post_history_instructions="Stay terse, <BOT>.",
        )
    )
    await core.actions.set_character("discord", KEY, "Seraphine")
    for i in range(40):
        await run(core, say("Ann", f"Question number {i}: " + "tell me more. " * 8))
    first, last = text_of(model.prompts[0]), text_of(model.prompts[-1])
    for prompt in (first, last):
        assert "Seraphine guards Ann's library." in prompt  # macros, story pinned
        assert "Mind the candles." in prompt and "This is a roleplay chat" in prompt
        assert "SECRET NOTE" not in prompt  # creator notes never reach the model
        # Post-history instructions come after the history, right before the reply cue.
        assert prompt.index("Stay terse, Seraphine.") > prompt.rindex("Question number")
    assert "Shelf nine." in first and "Ann: Where is the atlas?" in first
    assert "Shelf nine." not in last  # examples went first when space ran short
    assert "Question number 0:" not in last and "Question number 39:" in last
    assert all(len(p) + 128 <= 2048 for p in model.prompts)


def book(*entries: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"entries": list(entries), "extensions": {}, **extra}


def entry(keys: list[str], content: str, **more: Any) -> dict[str, Any]:
    return {
        "keys": keys,
        "content": content,
        "enabled": True,
        "insertion_order": 10,
        "extensions": {},
        **more,
    }


def test_lorebook_activation_rules_and_budget() -> None:
    lore = Lorebook.from_json(
        book(
            entry(["dragon"], "DRAGON lore", insertion_order=30),
            entry(["Ember"], "EMBER lore", case_sensitive=True, insertion_order=20),
            entry([r"\bcast(le|ing)\b"], "CASTLE lore", use_regex=True, insertion_order=10),
            entry(
                ["sword"],
                "SWORD lore",
                selective=True,
                secondary_keys=["broken"],
                insertion_order=25,
            ),
            entry(["never"], "CONSTANT lore", constant=True, insertion_order=1),
            entry(["dragon"], "DISABLED lore", enabled=False),
            entry(["moon"], "AFTER lore", position="after_char"),
            scan_depth=2,
        )
    )
    count = len
    recent = ["old: the moon rises", "a DRAGON near the castle", "an ember and a sword"]
    got = activate([lore], match_entries([lore], recent), count, 10_000)
    # Scan depth 2: the moon line is too old; "ember" is not "Ember"; the sword needs "broken".
    assert got.before == ("CONSTANT lore", "CASTLE lore", "DRAGON lore")
    assert got.after == ()
    recent = ["a broken sword", "Ember sees the moon"]
    got = activate([lore], match_entries([lore], recent), count, 10_000)
    assert got.before == ("CONSTANT lore", "EMBER lore", "SWORD lore")
    assert got.after == ("AFTER lore",)
    # Over budget, the lowest priority goes first.
    ranked = Lorebook.from_json(
        book(
            entry(["a"], "x" * 40, priority=1, name="low", insertion_order=1),
            entry(["a"], "y" * 40, priority=9, name="high", insertion_order=2),
            token_budget=50,
        )
    )
    got = activate([ranked], match_entries([ranked], ["a"]), count, 10_000)
    assert got.before == ("y" * 40,) and got.dropped == ("low",)


async def test_lorebook_and_world_book_reach_the_prompt(make_core: Any) -> None:
    model = ScriptedModel(["Hm."])
    core = await roleplay_core(make_core, model)
    await core.library.import_world_book("realm", book(entry(["harbor"], "The harbor is frozen.")))
    assert await core.actions.attach_world_book("discord", KEY, "realm")
    assert not await core.actions.attach_world_book("discord", KEY, "nowhere")
    await run(core, say("Ann", "Mira, any news about the mill?"))
    prompt = text_of(model.prompts[-1])
    assert "bandits now use its ruins" in prompt  # Mira's own character_book
    assert "The harbor is frozen." not in prompt
    await run(core, say("Ann", "Mira, and the harbor?"))
    assert "The harbor is frozen." in text_of(model.prompts[-1])


async def test_greeting_swipes_and_regenerate_keep_versions(make_core: Any) -> None:
    model = ScriptedModel(["First take.", "Second take."])
    core = await roleplay_core(make_core, model)
    replies = await run(core, say("Ann", "Hello, Mira!"))
    assert "Welcome to the Lantern Inn" in replies[0].text and replies[0].swipe == (1, 3)
    assert replies[1].text == "First take." and replies[1].speaker == "Mira"
    regenerated = [
        r async for r in core.versions.regenerate("discord", KEY, is_dm=False) if r.final
    ]
    assert regenerated[-1].text == "Second take."
    back = await core.versions.swipe("discord", KEY, -1)
    assert back.text == "First take." and back.swipe == (1, 2)
    await run(core, say("Ann", "Mira, and then?"))
    prompt = text_of(model.prompts[-1])
    assert "First take." in prompt and "Second take." not in prompt  # the chosen version
    await core.actions.reset("discord", KEY)
    opened = await core.actions.open_scene("discord", KEY, is_dm=False)
    assert opened is not None and "Welcome to the Lantern Inn" in opened.text
    swiped = await core.versions.swipe("discord", KEY)
    assert "Stew's hot tonight" in swiped.text and swiped.swipe == (2, 3)


async def test_two_player_scene_prompt_and_stops_carry_both_names(make_core: Any) -> None:
    model = ScriptedModel(["Mira: *pours* Here you are.\nBob: thanks\nAnn: cheers"])
    core = await roleplay_core(make_core, model)
    await run(core, say("Bob", "I sit down.", mentions=False))
    replies = await run(core, say("Ann", "Mira, two ales!"))
    assert replies[-1].text == "*pours* Here you are."  # cleaned: own tag gone, cut at Bob:
    prompt = text_of(model.prompts[-1])
    assert "Bob: I sit down." in prompt and "Ann: Mira, two ales!" in prompt
    assert set(model.stops[-1]) >= {"\nAnn:", "\nBob:"}
    assert "\nMira:" not in model.stops[-1]


async def test_two_character_scene_turn_order(make_core: Any) -> None:
    model = ScriptedModel(lambda prompt: "Aye." if "You are Reyes" in text_of(prompt) else "Sure.")
    core = await roleplay_core(make_core, model)
    core.rng = random.Random(1)
    cast = await core.actions.set_cast("discord", KEY, ["Mira", "Captain Reyes"])
    assert cast is not None and [c.name for c in cast] == ["Mira", "Captain Reyes"]
    await core.actions.open_scene("discord", KEY, is_dm=False)
    replies = await run(core, say("Ann", "Reyes, what do you think? And you, Mira?"))
    assert [r.speaker for r in replies] == ["Captain Reyes", "Mira"]  # order of mention
    assert "\nMira:" in model.stops[0] and "\nReyes:" in model.stops[1]
    # Mira's prompt shows what Reyes just said, with his name.
    assert "Reyes: Aye." in text_of(model.prompts[1])
    previous = replies[-1].speaker
    for _ in range(8):
        replies = await run(core, say("Ann", "Anyone?"))
        assert replies and replies[0].speaker != previous  # never itself twice in a row
        previous = replies[-1].speaker
    speakers = [c.name for c in choose_speakers(cast, "Anyone?", "Mira", random.Random(3))]
    assert "Mira" not in speakers and speakers  # nobody answers itself twice in a row


def test_turn_order_rules() -> None:
    quiet = character_from_card(card(name="Quiet", extensions={"talkativeness": "0"}))
    loud = character_from_card(card(name="Loud", extensions={"talkativeness": "1"}))
    rng = random.Random(0)
    assert [c.name for c in choose_speakers([quiet, loud], "hello", None, rng)] == ["Loud"]
    assert [c.name for c in choose_speakers([quiet, loud], "hello", "Loud", rng)] == ["Quiet"]
    named = choose_speakers([quiet, loud], "quiet, speak up", None, rng)
    assert [c.name for c in named] == ["Quiet"]


def test_output_cleaning_and_stop_strings() -> None:
    others = ["Ann", "Bob", "Reyes"]
    assert clean_reply("**Mira:** *smiles* Hi!", "Mira", others) == "*smiles* Hi!"
    assert clean_reply("Hi!\nAnn: I answer for Ann", "Mira", others) == "Hi!"
    assert clean_reply("Hi!\n  reyes: me too", "Mira", others) == "Hi!"
    assert clean_reply("Annabel: is fine", "Mira", others) == "Annabel: is fine"
    # A reply that opens with a participant's tag is cleaned, not dropped.
    assert clean_reply("Ann: only me", "Mira", others) == "only me"
    assert clean_reply("*Bob:* hm\nReyes: no", "Mira", others) == "hm"
    assert strip_name_tag("Alice: Hello there.", ["Alice"]) == "Hello there."
    assert strip_name_tag("Alicent: Hello.", ["Alice"]) == "Alicent: Hello."
    assert strip_name_tag("Note: x", []) == "Note: x"
    assert stop_strings(["Ann", "Bob"], ["Mira", "Reyes"], "Mira") == [
        "\nAnn:",
        "\nBob:",
        "\nReyes:",
    ]


async def test_character_sampling_overrides_reach_the_model(make_core: Any) -> None:
    model = ScriptedModel(["Fine."])
    core = await roleplay_core(make_core, model)
    await run(core, say("Ann", "Mira?"))
    used = model.samplings[-1]
    assert (used.temperature, used.min_p, used.repeat_penalty) == (0.7, 0.08, 1.12)
    await core.actions.set_mode("discord", KEY, "work")
    await run(core, say("Ann", "Agenda?"))
    assert model.samplings[-1].temperature == 0.6  # the office keeps the role's defaults


async def test_real_model_forty_turn_scene_never_speaks_for_a_player(
    smollm_llama: Any, make_core: Any
) -> None:
    import asyncio

    from ai_model.embedded import embedded_model_path
    from ai_model.local import LocalModel

    settings = ModelSettings(n_ctx=2048, sampling=SamplingSettings(max_tokens=40, seed=42))
    model = await asyncio.to_thread(LocalModel.load, settings, embedded_model_path(), "scene")
    core: ConversationCore = make_core(
        {"character": model, "office": model}, models={"character": settings, "office": settings}
    )
    await core.actions.set_mode("discord", KEY, "roleplay")
    # Lines that keep the same lorebook entries active, so the prompt's front is stable and
    # llama.cpp reuses it (a changing lorebook re-evaluates the prompt, slow on a CPU).
    lines = [
        ("Ann", "Mira, we need a room for the night."),
        ("Bob", "And something hot to eat, Mira!"),
        ("Ann", "Mira, is there music tonight?"),
        ("Bob", "Mira, who else is staying here?"),
    ]
    tag = re.compile(r"^\s*[*_]*(Ann|Bob)[*_]*\s*:", re.IGNORECASE | re.MULTILINE)
    # What the model itself wrote, before any cleaning: the output cleaner removes a leading
    # player tag, so the shown replies could never show one.
    raw: list[str] = []
    original = model.stream

    def recording(tokens, sampling, stop=(), slot=None, background=False, grammar=None):  # type: ignore[no-untyped-def]
        async def pieces():  # type: ignore[no-untyped-def]
            written = ""
            async for piece in original(tokens, sampling, stop, slot, background, grammar):
                written += piece
                yield piece
            if slot is not None:  # a reply, not a summary job
                raw.append(written)

        return pieces()

    model.stream = recording  # type: ignore[method-assign]
    replies = []
    try:
        for turn in range(40):
            name, text = lines[turn % len(lines)]
            got = await run(core, say(name, f"{text} ({turn})"))
            replies.append(got[-1])
    finally:
        model.close()
    assert len(replies) == 40 and len(raw) == 40
    offenders = [r for r in raw if tag.search(r)]
    assert offenders == []
    # Real answers, not apologies or "(no reply)" notices.
    answered = [r for r in replies if r.kind is ReplyKind.ANSWER and r.text.strip()]
    assert len(answered) >= 30
