"""Commands that make the model write, or bring back what it wrote: /chat, /regenerate,
/swipe, /continue, /summarize.  Each picks its target in the conversation's turn."""

from __future__ import annotations

from collections.abc import AsyncIterator

from chat.commands.spec import Answer, Arg, ArgKind, Command, Engine, Invocation
from chat.messages import IncomingMessage, OutgoingReply


async def chat(engine: Engine, inv: Invocation) -> Answer:
    message = IncomingMessage(
        inv.platform,
        inv.key,
        inv.user_id,
        inv.user_name,
        inv.text("message"),
        mentions_bot=True,
        is_dm=inv.is_dm,
    )
    return Answer(stream=engine.answers.respond(message, arrival=inv.arrival))


async def regenerate(engine: Engine, inv: Invocation) -> Answer:
    replies = engine.versions.regenerate(inv.platform, inv.key, inv.is_dm, inv.user_id, inv.arrival)
    return Answer(posts=replies, ack="Done: the last reply was rewritten.")


async def _swiped(engine: Engine, inv: Invocation, step: int) -> AsyncIterator[OutgoingReply]:
    yield await engine.versions.swipe(inv.platform, inv.key, step, inv.arrival)


async def swipe(engine: Engine, inv: Invocation) -> Answer:
    step = -1 if inv.text("direction") == "back" else 1
    return Answer(posts=_swiped(engine, inv, step), ack=_showing)


def _showing(reply: OutgoingReply) -> str:
    shown = reply.swipe
    return f"Showing version {shown[0]} of {shown[1]}." if shown else "Done."


async def continue_(engine: Engine, inv: Invocation) -> Answer:
    replies = engine.continuation.continue_reply(
        inv.platform, inv.key, inv.is_dm, inv.user_id, inv.arrival
    )
    return Answer(posts=replies, ack="Done: the last reply goes on.")


async def summarize(engine: Engine, inv: Invocation) -> Answer:
    count = inv.text("count")
    replies = engine.summaries.summarize(
        inv.platform, inv.key, inv.is_dm, inv.user_id, count, inv.arrival
    )
    return Answer(stream=replies)


COMMANDS = (
    Command(
        "chat",
        "Ask the bot something here",
        chat,
        args=(Arg("message", "What to say", required=True),),
        rationed=True,
        platforms=frozenset({"discord"}),  # elsewhere, a plain message does this
    ),
    Command(
        "regenerate",
        "Write my last reply again (earlier versions are kept)",
        regenerate,
        private=True,
        rationed=True,
    ),
    Command(
        "swipe",
        "Show the next (or previous) version of my last reply",
        swipe,
        args=(
            Arg(
                "direction",
                "next or back",
                choices=("next", "back"),
                aliases={"prev": "back", "previous": "back", "-1": "back"},
            ),
        ),
        private=True,
        usage="[back]",
    ),
    Command("continue", "Make my last reply longer", continue_, private=True, rationed=True),
    Command(
        "summarize",
        "Sum up the last messages (work mode)",
        summarize,
        args=(Arg("count", "How many messages (default: since my last reply)", ArgKind.NUMBER),),
        rationed=True,
        usage="[count]",
    ),
)
