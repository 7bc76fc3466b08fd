"""Commands about the conversation itself: /start, /ping, /mode, /character, /reset."""

from __future__ import annotations

from collections.abc import AsyncIterator

from chat.commands.spec import Answer, Arg, ArgKind, Command, Engine, Invocation, Rights
from chat.limits import MAX_CARD_BYTES, shorten
from chat.messages import OutgoingReply
from chat.roleplay.cards import parse_card_bytes
from chat.roleplay.characters import CardError
from chat.settings import MODES, ROLE_FOR_MODE, parse_mode

OWNERS_ONLY = (
    "Only the bot's owners can import characters: they are shared by every conversation. "
    "(Owners are listed in the bot's settings.)"
)
MODE_USAGE = "Usage: /mode roleplay|work"


async def _opening(engine: Engine, inv: Invocation) -> AsyncIterator[OutgoingReply]:
    """The scene's greeting when a roleplay conversation (re)starts."""
    opened = await engine.actions.open_scene(inv.platform, inv.key, inv.is_dm, inv.user_name)
    if opened is not None:
        yield opened


async def _posts_opening(engine: Engine, inv: Invocation, text: str) -> Answer:
    return Answer(text=text, posts=_opening(engine, inv))


async def _greeting(engine: Engine, inv: Invocation) -> AsyncIterator[OutgoingReply]:
    yield await engine.actions.greeting(inv.platform, inv.key, inv.is_dm)


async def start(engine: Engine, inv: Invocation) -> Answer:
    return Answer(posts=_greeting(engine, inv), ack="Said hello.")


async def ping(engine: Engine, inv: Invocation) -> Answer:
    from datetime import UTC, datetime

    up = int((datetime.now(UTC) - engine.started_at).total_seconds())
    hours, rest = divmod(up, 3600)
    minutes, seconds = divmod(rest, 60)
    shown = f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s"
    return Answer(text=f"pong — up for {shown}.")


async def mode(engine: Engine, inv: Invocation) -> Answer:
    asked = inv.text("mode").strip()
    chosen = parse_mode(asked)
    if chosen is None:  # anyone may ask which mode this is
        now = await engine.actions.who_am_i(inv.platform, inv.key, inv.is_dm)
        wrong = "That is not a mode. " if asked else ""
        return Answer(text=f"{wrong}{now} {MODE_USAGE}", private=True)
    if not await allowed(inv, Rights.ADMIN):
        return refusal(inv, "change the mode")
    await engine.actions.set_mode(inv.platform, inv.key, chosen, inv.arrival)
    role = ROLE_FOR_MODE[chosen]
    return await _posts_opening(
        engine, inv, f"Mode set to {chosen}: the {role} model answers in {chosen} mode."
    )


async def character_show(engine: Engine, inv: Invocation) -> Answer:
    char = await engine.actions.character_of(inv.platform, inv.key)
    names = ", ".join(engine.characters.names())
    description = char.description.replace("{{char}}", char.display_name)
    greeting = char.greeting.replace("{{char}}", char.display_name)
    text = (
        f"Character here: {char.name}.\n**{char.name}**: {description}\n\n"
        f"*Greeting:* {greeting}\n\nAvailable: {names}."
    )
    return Answer(text=text, private=True, markdown=True)


async def character_list(engine: Engine, inv: Invocation) -> Answer:
    return Answer(text=f"Characters: {', '.join(engine.characters.names())}.", private=True)


async def character_set(engine: Engine, inv: Invocation) -> Answer:
    asked = inv.text("name")
    wanted = [n.strip() for n in asked.split(",") if n.strip()]
    cast = await engine.actions.set_cast(inv.platform, inv.key, wanted, inv.arrival)
    if cast is None:
        names = ", ".join(engine.characters.names())
        return Answer(
            text=f"I don't know a character called {shorten(asked)}. Try: {names}.", private=True
        )
    who = " and ".join(c.name for c in cast)
    verb = "takes" if len(cast) == 1 else "take"
    return await _posts_opening(engine, inv, f"{who} {verb} the stage. (Used in roleplay mode.)")


async def character_world(engine: Engine, inv: Invocation) -> Answer:
    name = inv.text("name").strip()
    book = None if name.lower() in ("", "off") else name
    if not await engine.actions.attach_world_book(inv.platform, inv.key, book, inv.arrival):
        known = ", ".join(sorted(engine.world_books)) or "none imported yet"
        return Answer(
            text=f"No world book called {shorten(name)} (available: {known}).", private=True
        )
    return Answer(text=f"World book {shorten(book)} attached." if book else "World book detached.")


async def character_import(engine: Engine, inv: Invocation) -> Answer:
    if not inv.files:
        return Answer(
            text="Attach the card file (PNG, JSON or CHARX) to /character import, or reply to "
            "the file with /character import.",
            private=True,
        )
    card = inv.files[0]
    if card.size > MAX_CARD_BYTES:
        return Answer(
            text=f"That file is too large to be a character card (at most "
            f"{MAX_CARD_BYTES // (1024 * 1024)} MB).",
            private=True,
        )
    try:
        parsed = parse_card_bytes(await card.read(), card.name)
        imported = await engine.library.import_card(parsed, replace=inv.flag("replace"))
    except CardError as exc:
        return Answer(text=f"I could not import that card: {exc}.", private=True)
    name = shorten(imported.character.name)
    done = f"Replaced the earlier {name}" if imported.replaced else f"Imported {name}"
    return Answer(text=f"{done}. Use /character set {name} to play them.", private=True)


async def reset(engine: Engine, inv: Invocation) -> Answer:
    await engine.actions.reset(inv.platform, inv.key, inv.arrival)
    done = "Started a fresh conversation. Earlier messages stay stored."
    conv = await engine.conversations.get(inv.platform, inv.key)
    if inv.flag("all"):
        gone = await engine.documents.forget_all(conv.id)
        done = f"Started a fresh conversation and deleted its {gone} document(s)."
    elif await engine.documents.holds_any(conv.id):
        done += " Its documents stay too (/reset all deletes them)."
    return await _posts_opening(engine, inv, done)


# -- rights --------------------------------------------------------------------------------------


async def allowed(inv: Invocation, rights: Rights, engine: Engine | None = None) -> bool:
    """Whether the caller has ``rights`` here; raises RightsUnknown when the platform cannot
    say (the runner tells the caller to try again).  Owners are bot owners: anywhere."""
    if rights is Rights.ANYONE or (inv.is_dm and rights is Rights.ADMIN):
        return True
    if rights is Rights.OWNER:
        return engine is not None and engine.settings.is_owner(inv.platform, inv.user_id)
    return await inv.is_admin()


def refusal(inv: Invocation, what: str) -> Answer:
    if inv.arrival is not None:
        inv.arrival.settle()
    terms = inv.terms
    return Answer(text=f"Only {terms.admins} can {what} in this {terms.place}.", private=True)


MODE_ARG = Arg(
    "mode", "roleplay or work (leave out to see this conversation's mode)", choices=MODES
)
NAME_ARG = Arg("name", "A character, or several separated by commas", required=True)

COMMANDS = (
    Command("start", "Say hello (in roleplay: the character's greeting)", start),
    Command("ping", "Check that I am here, and for how long", ping, private=True),
    Command(
        "mode",
        "Show this conversation's mode, or set it (admins, in groups)",
        mode,
        args=(MODE_ARG,),
        usage="roleplay|work",
    ),
    Command(
        "character",
        "Show or choose the character (admins, in groups)",
        subcommands=(
            Command("show", "Show this conversation's character", character_show, private=True),
            Command(
                "set",
                "Choose the conversation's character (admins)",
                character_set,
                args=(NAME_ARG,),
                rights=Rights.ADMIN,
                what="change the character",
            ),
            Command("list", "List the characters", character_list, private=True),
            Command(
                "world",
                "Attach a world book here, or 'off' (admins)",
                character_world,
                args=(Arg("name", "The world book, or off", required=True),),
                rights=Rights.ADMIN,
                what="change the world book",
            ),
            Command(
                "import",
                "Import a character card (bot owners)",
                character_import,
                args=(
                    Arg("card", "A SillyTavern/TavernAI card: PNG, JSON or CHARX", ArgKind.FILE),
                    Arg("replace", "Replace an imported character of the same name", ArgKind.FLAG),
                ),
                rights=Rights.OWNER,
                what="import characters",
                private=True,
            ),
        ),
        default="set",
        usage="[name]",
    ),
    Command(
        "reset",
        "Start a fresh conversation (history stays stored)",
        reset,
        args=(Arg("all", "Also delete the documents posted here", ArgKind.FLAG),),
        rights=Rights.ADMIN,
        what="reset the conversation",
        usage="[all]",
    ),
)
