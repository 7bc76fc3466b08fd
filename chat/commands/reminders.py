"""Commands about reminders and time zones: /remind, /reminders (list, cancel), /timezone."""

from __future__ import annotations

from chat.commands.conversation import allowed
from chat.commands.spec import Answer, Arg, ArgKind, Command, Engine, Invocation, Rights


async def remind(engine: Engine, inv: Invocation) -> Answer:
    text = await engine.reminders.add(
        inv.platform, inv.key, inv.user_id, inv.user_name, inv.text("request")
    )
    return Answer(text=text)


async def reminders_list(engine: Engine, inv: Invocation) -> Answer:
    return Answer(text=await engine.reminders.listing(inv.platform, inv.key))


async def reminders_cancel(engine: Engine, inv: Invocation) -> Answer:
    number = inv.args.get("number")
    if not isinstance(number, int):
        return Answer(
            text="Usage: /reminders cancel <number> (the number /reminders shows).", private=True
        )
    held = await engine.reminders.open_in(inv.platform, inv.key)
    if not 1 <= number <= len(held):
        return Answer(
            text=f"There is no reminder {number} here; /reminders lists them.", private=True
        )
    chosen = held[number - 1]
    if chosen.user_id != inv.user_id and not await allowed(inv, Rights.ADMIN):
        return Answer(
            text=f"Only whoever set it, or {inv.terms.admins}, can cancel that reminder.",
            private=True,
        )
    return Answer(text=await engine.reminders.cancel(inv.platform, inv.key, chosen))


async def timezone_show(engine: Engine, inv: Invocation) -> Answer:
    text = await engine.reminders.describe_zones(inv.platform, inv.key, inv.user_id)
    return Answer(text=text, private=True)


async def timezone_set(engine: Engine, inv: Invocation) -> Answer:
    zone = inv.text("zone")
    text = await engine.reminders.set_zone(
        inv.platform, inv.key, inv.user_id, zone, conversation=True
    )
    return Answer(text=text)


async def timezone_mine(engine: Engine, inv: Invocation) -> Answer:
    zone = inv.text("zone")
    text = await engine.reminders.set_zone(
        inv.platform, inv.key, inv.user_id, zone, conversation=False
    )
    return Answer(text=text, private=True)


ZONE = Arg("zone", "An IANA time zone: Europe/Berlin, America/New_York, UTC", required=True)

COMMANDS = (
    Command(
        "remind",
        "Remind you later: in 2 hours, tomorrow 9:00, every Monday 10:00",
        remind,
        args=(Arg("request", "When, then what: in 2 hours send the report", required=True),),
        usage="<when> <what>",
    ),
    Command(
        "reminders",
        "The reminders set here: list or cancel them",
        subcommands=(
            Command("list", "List the reminders to come here", reminders_list),
            Command(
                "cancel",
                "Cancel a reminder (whoever set it, or admins)",
                reminders_cancel,
                args=(Arg("number", "Its number in /reminders", ArgKind.NUMBER, required=True),),
            ),
        ),
        default="list",
        usage="[list|cancel <number>]",
    ),
    Command(
        "timezone",
        "Time zones for reminders: show them, set this conversation's, or your own",
        subcommands=(
            Command("show", "Your time zone and this conversation's", timezone_show),
            Command(
                "set",
                "Set this conversation's time zone (admins)",
                timezone_set,
                args=(ZONE,),
                rights=Rights.ADMIN,
                what="set the time zone",
            ),
            Command("mine", "Set your own time zone", timezone_mine, args=(ZONE,)),
        ),
        default="set",
        usage="[<zone>|mine <zone>]",
    ),
)
