"""The engine's command declarations as Telegram commands: the command menu, one handler per
command, and a card file sent with the caption ``/character import``."""

from __future__ import annotations

import logging

from telegram import Bot, BotCommand, Document, Message, Update
from telegram.constants import ChatType

from adapters.telegram.api import admin_check
from adapters.telegram.intake import PLATFORM, Intake, conversation_key
from chat.commands import Answer, Command, CommandSet, Parsed
from chat.commands.spec import Invocation, Terms
from chat.core import ConversationCore
from chat.messages import Attachment

log = logging.getLogger(__name__)

TERMS = Terms(admins="chat administrators", place="group", platform_name="Telegram")


def menu(commands: CommandSet) -> list[BotCommand]:
    """The command menu: every command Telegram shows, with its description."""
    return [BotCommand(c.name, c.description[:256]) for c in commands.on(PLATFORM)]


class TelegramCommands:
    """Runs a typed command against its declaration and answers in the chat."""

    def __init__(self, core: ConversationCore, bot: Bot, intake: Intake) -> None:
        self.core = core
        self.bot = bot
        self.intake = intake

    def names(self) -> list[str]:
        return [c.name for c in self.core.commands.on(PLATFORM)]

    async def run(self, update: Update) -> None:
        """``/name words`` (or a document whose caption is a command)."""
        message = update.effective_message
        if message is None or message.from_user is None:
            return
        typed = (message.text or message.caption or "").strip()
        head, _, words = typed.partition(" ")
        name, _, target = head[1:].partition("@")
        if target and target.lower() != (self.bot.username or "").lower():
            return  # a command for another bot in the group
        command = self.core.commands.find(name, PLATFORM)
        if command is None:
            await self.intake.on_unknown_command(update, self.core.commands)
            return
        document = _document(message)
        parsed = self.core.commands.parse(command, words, has_file=document is not None)
        if isinstance(parsed, str):
            await self.intake.say(message, parsed)
            return
        await self._answer(message, parsed, document, update)

    async def _answer(
        self, message: Message, parsed: Parsed, document: Document | None, update: Update
    ) -> None:
        user = message.from_user
        assert user is not None
        # Anonymous admins all post as one Telegram user: count them by their group instead.
        who = f"chat{message.sender_chat.id}" if message.sender_chat else str(user.id)
        inv = Invocation(
            PLATFORM,
            conversation_key(message.chat_id),
            who,
            user.full_name or user.username or who,
            message.chat.type == ChatType.PRIVATE,
            parsed.args,
            [_attachment(document)] if document is not None else [],
            is_admin=admin_check(self.bot, message),
            arrival=self.intake.arrival(update),
            terms=TERMS,
        )
        answer = await self.core.commands.run(parsed.command, inv)
        await self._render(message, parsed.command, answer)

    async def _render(self, message: Message, command: Command, answer: Answer) -> None:
        chat_id = message.chat_id
        if answer.text:
            await self.intake.say(message, answer.text, markdown=answer.markdown)
        if answer.stream is not None:
            await self.intake.stream(chat_id, answer.stream, None)
        if answer.posts is not None:
            await self.intake.stream(chat_id, answer.posts, None)


def _document(message: Message) -> Document | None:
    """The file that came with a command: attached to it, or the message it replies to."""
    if message.document is not None:
        return message.document
    replied = message.reply_to_message
    return replied.document if replied is not None else None


def _attachment(document: Document) -> Attachment:
    async def read() -> bytes:
        return bytes(await (await document.get_file()).download_as_bytearray())

    return Attachment(document.file_name or "file", document.file_size or 0, read)
