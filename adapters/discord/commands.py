"""The engine's command declarations as Discord slash commands, under Discord's rules.

Every interaction gets its first response within Discord's 3 seconds, whatever is queued in
the conversation: a command that is not done by :data:`DEFER_AFTER_S` is deferred (with the
privacy it declares) and its answer follows in the deferred response.  Commands whose answer
streams or waits for the conversation's turn are deferred at once.  No interaction ever gets
two initial responses.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import discord
from discord import app_commands

from adapters.discord.api import DiscordOptions, Tree, Webhooks
from adapters.discord.intake import PLATFORM, Intake, conversation_key, role_ids
from adapters.discord.sinks import MAX_MESSAGE_CHARS, NO_MENTIONS, ChannelSink, InteractionSink
from adapters.streaming import chain
from adapters.text import split_message
from chat.commands import Answer, ArgKind, Command
from chat.commands.spec import Invocation, Terms
from chat.core import ConversationCore
from chat.messages import Attachment, OutgoingReply, ReplyKind

log = logging.getLogger(__name__)

DEFER_AFTER_S = 1.5  # Discord refuses a first response after 3 s: defer well before
TERMS = Terms(
    admins="members with the Manage Channels permission (or a bot admin role)",
    place="channel",
    platform_name="Discord",
)
_ANNOTATIONS: dict[ArgKind, Any] = {
    ArgKind.TEXT: str,
    ArgKind.NUMBER: int,
    ArgKind.FLAG: bool,
    ArgKind.FILE: discord.Attachment,
}


class _Response:
    """The answer slot of one interaction: responds once, then follows up."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self.deferred_private: bool | None = None

    @property
    def done(self) -> bool:
        return self.interaction.response.is_done()

    async def defer(self, private: bool) -> None:
        if not self.done:
            await self.interaction.response.defer(ephemeral=private, thinking=True)
            self.deferred_private = private

    async def say(self, text: str, private: bool) -> None:
        chunks = split_message(text, MAX_MESSAGE_CHARS) or ["…"]
        first, rest = chunks[0], chunks[1:]
        followup = self.interaction.followup
        if not self.done:
            await self.interaction.response.send_message(
                first, ephemeral=private, allowed_mentions=NO_MENTIONS
            )
        elif self.deferred_private is False and private:
            # Deferred in public, answered for the caller only: the public stub goes.
            await self.interaction.delete_original_response()
            await followup.send(first, ephemeral=True, allowed_mentions=NO_MENTIONS)
        else:
            await self.interaction.edit_original_response(
                content=first, allowed_mentions=NO_MENTIONS
            )
        for chunk in rest:
            await followup.send(chunk, ephemeral=private, allowed_mentions=NO_MENTIONS)


class SlashCommands:
    """Registers every declaration as a slash command (a group for one with subcommands)."""

    def __init__(
        self,
        core: ConversationCore,
        tree: Tree,
        intake: Intake,
        webhooks: Webhooks,
        options: DiscordOptions,
    ) -> None:
        self.core = core
        self.tree = tree
        self.intake = intake
        self.webhooks = webhooks
        self.options = options

    def register(self) -> None:
        for command in self.core.commands.on(PLATFORM):
            if command.subcommands:
                group = app_commands.Group(name=command.name, description=command.description)
                for sub in command.subcommands:
                    group.add_command(self._slash(sub))
                self.tree.add_command(group)
            else:
                self.tree.add_command(self._slash(command))

    def _slash(self, command: Command) -> app_commands.Command[Any, ..., None]:
        async def callback(interaction: discord.Interaction, **options: Any) -> None:
            await self._invoke(command, interaction, options)

        params = [
            inspect.Parameter(
                "interaction",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=discord.Interaction,
            )
        ]
        descriptions: dict[str, str] = {}
        choices: dict[str, list[app_commands.Choice[str]]] = {}
        for arg in command.args:
            annotation = _ANNOTATIONS[arg.kind]
            default: Any = inspect.Parameter.empty
            if not arg.required:
                annotation = annotation | None
                default = False if arg.kind is ArgKind.FLAG else None
            params.append(
                inspect.Parameter(
                    arg.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
                )
            )
            descriptions[arg.name] = arg.description[:100]
            if arg.choices:
                choices[arg.name] = [app_commands.Choice(name=c, value=c) for c in arg.choices]
        hook: Any = callback
        hook.__signature__ = inspect.Signature(params)
        hook.__discord_app_commands_param_description__ = descriptions
        if choices:
            hook.__discord_app_commands_param_choices__ = choices
        return app_commands.Command(
            name=command.name, description=command.description[:100], callback=callback
        )

    # -- one interaction ----------------------------------------------------------------------

    async def _invoke(
        self, command: Command, interaction: discord.Interaction, options: dict[str, Any]
    ) -> None:
        key = conversation_key(interaction.channel_id or 0)
        arrival = self.core.queues.arrive(key)  # at once: the conversation's order
        response = _Response(interaction)
        try:
            files = [
                Attachment(value.filename, value.size, value.read)
                for value in options.values()
                if isinstance(value, discord.Attachment)
            ]
            args = {k: v for k, v in options.items() if not isinstance(v, discord.Attachment)}
            inv = Invocation(
                PLATFORM,
                key,
                str(interaction.user.id),
                interaction.user.display_name,
                interaction.guild is None,
                args,
                files,
                is_admin=self._admin_check(interaction),
                arrival=arrival,
                terms=TERMS,
                roles=role_ids(interaction.user),
                guild_id=str(interaction.guild_id) if interaction.guild_id else None,
            )
            work = asyncio.create_task(self.core.commands.run(command, inv))
            done, _ = await asyncio.wait({work}, timeout=DEFER_AFTER_S)
            if not done:
                await response.defer(command.private)
            answer = await work
            await self._render(command, answer, response)
        finally:
            arrival.settle()

    async def _render(self, command: Command, answer: Answer, response: _Response) -> None:
        interaction = response.interaction
        private = command.private if answer.private is None else answer.private
        channel = interaction.channel
        if answer.stream is not None:  # the answer streams into the response itself
            await response.defer(private)
            await self.intake.stream(channel, answer.stream, InteractionSink(interaction, private))
            return
        if answer.text:
            await response.say(answer.text, private)
        if answer.posts is None:
            if not answer.text:
                await response.say(_ack(answer, None) or "Done.", private)
            return
        await response.defer(private)  # the posts may wait for the conversation's turn
        first = await anext(answer.posts, None)
        if first is None:
            if not answer.text:
                await response.say(_ack(answer, None) or "Done.", private)
            return
        if first.final and first.kind is not ReplyKind.ANSWER and not answer.text:
            await response.say(first.text, True)  # nothing to do, or not now: for the caller
            return
        sink = ChannelSink(self.webhooks, channel)
        await self.intake.stream(channel, chain(first, answer.posts), sink)
        if not answer.text:
            await response.say(_ack(answer, first) or "Done.", private)

    def _admin_check(self, interaction: discord.Interaction) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return self.is_admin(interaction)

        return check

    def is_admin(self, interaction: discord.Interaction) -> bool:
        """Whether the caller may change this conversation (anyone may, in a DM).

        Discord resolves ``interaction.permissions`` for the channel the command was used in,
        counting its permission overwrites; a thread's come from its parent channel.
        """
        perms = interaction.permissions if interaction.guild is not None else None
        return self.options.administers(interaction.user, perms)


def _ack(answer: Answer, first: OutgoingReply | None) -> str:
    if callable(answer.ack):
        return answer.ack(first) if first is not None else ""
    return answer.ack
