"""Commands that steer the conversation: /memory, /remember, /forget, /note, /persona."""

from __future__ import annotations

from chat.commands.conversation import allowed, refusal
from chat.commands.spec import Answer, Arg, ArgKind, Command, Engine, Invocation, Rights


async def memory(engine: Engine, inv: Invocation) -> Answer:
    return Answer(text=await engine.steering.report(inv.platform, inv.key), private=True)


async def remember(engine: Engine, inv: Invocation) -> Answer:
    fact = inv.text("fact")
    return Answer(text=await engine.steering.remember(inv.platform, inv.key, fact, inv.arrival))


async def forget(engine: Engine, inv: Invocation) -> Answer:
    number = inv.text("number")
    return Answer(
        text=await engine.steering.forget_fact(inv.platform, inv.key, number, inv.arrival)
    )


async def note(engine: Engine, inv: Invocation) -> Answer:
    text = inv.text("text")
    return Answer(text=await engine.steering.set_note(inv.platform, inv.key, text, inv.arrival))


async def persona(engine: Engine, inv: Invocation) -> Answer:
    """``/persona Name: description`` sets the caller's own; ``/persona`` alone clears it;
    ``/persona clear <name>``, ``/persona off`` and ``/persona on`` are for admins."""
    text = inv.text("text").strip()
    word, _, rest = text.partition(" ")
    steering = engine.steering
    if word.lower() in ("off", "on") and not rest.strip():
        if not await allowed(inv, Rights.ADMIN):
            return refusal(inv, "switch personas")
        answer = await steering.switch_personas(
            inv.platform, inv.key, on=word.lower() == "on", arrival=inv.arrival
        )
        return Answer(text=answer)
    if word.lower() == "clear" and rest.strip():
        admin = await allowed(inv, Rights.ADMIN)
        answer = await steering.clear_persona(
            inv.platform, inv.key, rest, admin=admin, arrival=inv.arrival
        )
        return Answer(text=answer, private=not admin)
    answer = await steering.set_persona(inv.platform, inv.key, inv.user_id, text, inv.arrival)
    return Answer(text=answer)


COMMANDS = (
    Command("memory", "What I remember here beyond my window", memory, private=True),
    Command(
        "remember",
        "Pin a fact I must keep in mind (admins, in groups)",
        remember,
        args=(Arg("fact", "The fact, in one sentence", required=True),),
        rights=Rights.ADMIN,
        what="pin facts",
        usage="<fact>",
    ),
    Command(
        "forget",
        "Unpin a fact by its number (admins, in groups)",
        forget,
        args=(Arg("number", "The fact's number, as /memory lists it", ArgKind.NUMBER, True),),
        rights=Rights.ADMIN,
        what="unpin facts",
        usage="<n>",
    ),
    Command(
        "note",
        "Set or clear the author's note that steers replies (admins, in groups)",
        note,
        args=(Arg("text", "The note that steers replies; leave out to clear it"),),
        rights=Rights.ADMIN,
        what="set the author's note",
        usage="[text]",
    ),
    Command(
        "persona",
        "Who you play here: Name: description (empty: clear; admins: clear <name>, off, on)",
        persona,
        args=(Arg("text", "Name: description, or a description alone"),),
        private=True,
        usage="[Name: who]",
    ),
)
