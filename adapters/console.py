"""A terminal chat with the bot: streamed replies and the chat commands (/help lists them)."""

from __future__ import annotations

import asyncio
import getpass
import logging
from pathlib import Path
from typing import TextIO

from adapters.base import SentMessage, deliver
from chat.commands.spec import ArgKind, Invocation
from chat.core import ConversationCore
from chat.messages import Attachment, IncomingMessage, OutgoingReply, ReplyKind

log = logging.getLogger(__name__)

PLATFORM = "console"
PROMPT = "you> "
PENDING = "pending"


class ConsoleAdapter:
    """Reads lines from ``stdin`` and prints streamed replies to ``stdout``.

    A terminal has no message size limit, and printing the new text of each snapshot is the
    console's "edit".
    """

    name = PLATFORM
    MAX_MESSAGE_CHARS: int | None = None
    connected = True  # a terminal is there while the process runs

    def __init__(
        self, core: ConversationCore, stdin: TextIO, stdout: TextIO, user: str | None = None
    ) -> None:
        self.core = core
        self.stdin = stdin
        self.stdout = stdout
        self.user = user or _local_user()
        self.key = f"{PLATFORM}:{self.user}"
        self._stopped = asyncio.Event()

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    async def start(self) -> None:
        self._write(f"Chatting as {self.user}. Type /help for commands, /quit to leave.\n")
        reminding = self.core.reminders.loop(PLATFORM, self.send)
        reminding.start()
        try:
            await self._chat()
        finally:
            await reminding.stop()

    async def _chat(self) -> None:
        while not self._stopped.is_set():
            self._write(PROMPT)
            line = await asyncio.to_thread(self.stdin.readline)
            if not line:  # end of input
                self._write("\n")
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not await self._command(text):
                    break
                continue
            msg = IncomingMessage(
                platform=PLATFORM,
                conversation_key=self.key,
                author_id=self.user,
                author_name=self.user,
                text=text,
                mentions_bot=True,
                is_dm=True,
            )
            await deliver(self, self.core.answers.respond(msg))

    async def stop(self) -> None:
        self._stopped.set()

    async def stop_intake(self) -> None:
        self._stopped.set()

    async def send(self, reply: OutgoingReply) -> SentMessage:
        if not reply.text and not reply.final:  # accepted, nothing to show yet
            return SentMessage(self.key, PENDING, "")
        self._write(f"{reply.speaker or 'bot'}> ")
        return await self.edit(SentMessage(self.key, "console", ""), reply)

    async def edit(self, sent: SentMessage, reply: OutgoingReply) -> SentMessage:
        if sent.message_id == PENDING and reply.text:
            # First text after the empty "accepted" snapshot: the speaker's name goes first.
            self._write(f"{reply.speaker or 'bot'}> ")
            sent = SentMessage(sent.conversation_key, "console", "")
        if reply.kind is not ReplyKind.ANSWER:
            # Notices and apologies replace whatever was streamed so far.
            self._write(("\n" if sent.text else "") + reply.text + "\n")
            return SentMessage(sent.conversation_key, sent.message_id, reply.text)
        new = reply.text[len(sent.text) :] if reply.text.startswith(sent.text) else reply.delta
        counter = f"  ({reply.swipe[0]}/{reply.swipe[1]}, /swipe for others)" if reply.swipe else ""
        self._write(new + (counter + "\n" if reply.final else ""))
        if reply.final:
            await self.core.delivery.delivered(reply, [])  # shown in full: answered
        return SentMessage(sent.conversation_key, sent.message_id, reply.text)

    async def _command(self, text: str) -> bool:
        """Run a slash command; return False when the chat should end."""
        head, _, words = text.partition(" ")
        name = head[1:].lower()
        if name in ("quit", "exit"):
            return False
        commands = self.core.commands
        command = commands.find(name, PLATFORM)
        if command is None:
            self._write(commands.unknown(f"/{name}") + "\n")
            return True
        path = _file_named(words)
        parsed = commands.parse(command, words, has_file=path is not None)
        if isinstance(parsed, str):
            self._write(parsed + "\n")
            return True
        files = []
        if path is not None and any(a.kind is ArgKind.FILE for a in parsed.command.args):
            files.append(_attachment(path))
        inv = Invocation(PLATFORM, self.key, self.user, self.user, True, parsed.args, files)
        answer = await commands.run(parsed.command, inv)
        if answer.text:
            self._write(answer.text + "\n")
        for replies in (answer.stream, answer.posts):
            if replies is not None:
                await deliver(self, replies)
        return True


def _file_named(words: str) -> Path | None:
    """The terminal's way to attach a file: its path, the last of the command's words."""
    found = words.strip().split(" ", 1)
    for candidate in (words.strip(), found[-1].strip()):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_file():
                return path
    return None


def _attachment(path: Path) -> Attachment:
    async def read() -> bytes:
        return await asyncio.to_thread(path.read_bytes)

    return Attachment(path.name, path.stat().st_size, read)


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "you"
