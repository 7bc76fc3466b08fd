"""Commands about the conversation's documents: /docs (list, add, forget) and /ask."""

from __future__ import annotations

from chat.commands.conversation import allowed
from chat.commands.spec import Answer, Arg, ArgKind, Command, Engine, Invocation, Rights
from chat.documents.library import ASK_PREFIX
from chat.documents.reading import SUPPORTED
from chat.messages import IncomingMessage

WORK_ONLY = (
    "Documents are for work conversations; this one is a roleplay scene (/mode work changes it)."
)


async def _work_conversation_id(engine: Engine, inv: Invocation) -> int | None:
    conv = await engine.conversations.get(inv.platform, inv.key)
    if engine.conversations.mode_of(conv, inv.is_dm) != "work":
        return None
    return conv.id


async def docs_list(engine: Engine, inv: Invocation) -> Answer:
    conv_id = await _work_conversation_id(engine, inv)
    if conv_id is None:
        return Answer(text=WORK_ONLY, private=True)
    return Answer(text=await engine.documents.listing(conv_id))


async def docs_add(engine: Engine, inv: Invocation) -> Answer:
    if not inv.files:
        return Answer(
            text=f"Attach a file to /docs add ({SUPPORTED}), or simply post it here.",
            private=True,
        )
    message = IncomingMessage(
        inv.platform,
        inv.key,
        inv.user_id,
        inv.user_name,
        "",
        is_dm=inv.is_dm,
        roles=inv.roles,
        guild_id=inv.guild_id,
    )
    lines = await engine.postings.receive(message, inv.files)
    if lines is None:
        return Answer(text=WORK_ONLY, private=True)
    return Answer(text="\n".join(lines))


async def docs_forget(engine: Engine, inv: Invocation) -> Answer:
    conv_id = await _work_conversation_id(engine, inv)
    if conv_id is None:
        return Answer(text=WORK_ONLY, private=True)
    number = inv.args.get("number")
    if not isinstance(number, int):
        return Answer(text="Usage: /docs forget <number> (the number /docs shows).", private=True)
    held = await engine.documents.of(conv_id)
    if 1 <= number <= len(held):
        mine = held[number - 1].poster_id == inv.user_id
        if not mine and not await allowed(inv, Rights.ADMIN):
            terms = inv.terms
            return Answer(
                text=f"Only whoever posted it, or {terms.admins}, can make me forget "
                f"{held[number - 1].name}.",
                private=True,
            )
    return Answer(text=await engine.documents.forget(conv_id, number))


async def ask(engine: Engine, inv: Invocation) -> Answer:
    question = inv.text("question").strip()
    conv_id = await _work_conversation_id(engine, inv)
    if conv_id is None:
        return Answer(text=WORK_ONLY, private=True)
    if not await engine.documents.holds_any(conv_id):
        return Answer(text=f"There are no documents here yet. Post a file ({SUPPORTED}) first.")
    if not await engine.documents.search(conv_id, [question]):
        # Nothing to answer from: saying so beats letting the model guess.
        return Answer(text="The documents here say nothing I can find about that.")
    message = IncomingMessage(
        inv.platform,
        inv.key,
        inv.user_id,
        inv.user_name,
        ASK_PREFIX + question,
        mentions_bot=True,
        is_dm=inv.is_dm,
        roles=inv.roles,
        guild_id=inv.guild_id,
    )
    return Answer(stream=engine.answers.respond(message, arrival=inv.arrival))


COMMANDS = (
    Command(
        "docs",
        "The documents posted here: list, add or forget them",
        subcommands=(
            Command("list", "List the documents I hold for this conversation", docs_list),
            Command(
                "add",
                "Read a file into this conversation's documents",
                docs_add,
                args=(Arg("file", f"A file: {SUPPORTED}", ArgKind.FILE),),
            ),
            Command(
                "forget",
                "Delete a document (its poster, or admins)",
                docs_forget,
                args=(Arg("number", "Its number in /docs", ArgKind.NUMBER, required=True),),
                what="make me forget a document",
            ),
        ),
        default="list",
        usage="[list|add|forget <number>]",
    ),
    Command(
        "ask",
        "Answer from this conversation's documents only",
        ask,
        args=(Arg("question", "What to look up", required=True),),
        rationed=True,
    ),
)
