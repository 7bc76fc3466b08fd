"""/tools: which tools the office model has here, and switching them on or off (admins)."""

from __future__ import annotations

from chat.commands.spec import Answer, Command, Engine, Invocation, Rights
from chat.tools.rounds import tools_on

ONLY_LLAMA3 = " They work with models framed as Llama 3.x (Meta's tool format) only."


async def tools_show(engine: Engine, inv: Invocation) -> Answer:
    conv = await engine.conversations.get(inv.platform, inv.key)
    roleplay = engine.conversations.mode_of(conv, inv.is_dm) == "roleplay"
    names = ", ".join(tool.name for tool in engine.answers.tool_use.tools)
    if tools_on(conv, roleplay, engine.settings.tools):
        native = engine.settings.tools.format == "native"
        text = f"Tools are on here: {names}.{ONLY_LLAMA3 if native else ''}"
    else:
        text = f"Tools are off here. {names and f'Available: {names}. '}/tools on turns them on."
    return Answer(text=text, private=True)


async def _switch(engine: Engine, inv: Invocation, on: bool) -> Answer:
    conv = await engine.conversations.get(inv.platform, inv.key)
    await engine.conversations.update_settings(conv, tools=on)
    said = "on: I may use them to answer" if on else "off: I answer in words only"
    return Answer(text=f"Tools {said} in this conversation.")


async def tools_enable(engine: Engine, inv: Invocation) -> Answer:
    return await _switch(engine, inv, True)


async def tools_disable(engine: Engine, inv: Invocation) -> Answer:
    return await _switch(engine, inv, False)


COMMANDS = (
    Command(
        "tools",
        "The assistant's tools here (time, arithmetic, reminders, searches): show, on, off",
        subcommands=(
            Command("show", "Which tools are on here", tools_show),
            Command(
                "on",
                "Let the assistant use its tools here (admins)",
                tools_enable,
                rights=Rights.ADMIN,
                what="switch the tools",
            ),
            Command(
                "off",
                "The assistant answers in words only here (admins)",
                tools_disable,
                rights=Rights.ADMIN,
                what="switch the tools",
            ),
        ),
        default="show",
        usage="[show|on|off]",
    ),
)
