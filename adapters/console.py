"""A terminal chat with the bot: streamed replies and the chat commands (/help lists them)."""

from __future__ import annotations

import asyncio
import getpass
import logging
from typing import TextIO

from adapters.base import SentMessage, deliver
from adapters.streaming import single
from chat.core import ConversationCore
from chat.messages import IncomingMessage, OutgoingReply, ReplyKind
from chat.settings import ROLE_FOR_MODE, parse_mode

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
            await deliver(self, self.core.respond(msg))

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
            await self.core.delivered(reply, [])  # shown in full: the message is answered
        return SentMessage(sent.conversation_key, sent.message_id, reply.text)

    async def _open_scene(self) -> None:
        greeting = await self.core.open_scene(PLATFORM, self.key, is_dm=True, user=self.user)
        if greeting is not None:
            await deliver(self, single(greeting))

    async def _character(self, name: str) -> None:
        if not name:
            current = await self.core.character_of(PLATFORM, self.key)
            names = ", ".join(self.core.characters.names())
            self._write(f"Character: {current.name}. Available: {names}.\n")
            return
        if name.lower().startswith("world"):
            book = name[5:].strip()
            detach = book.lower() in ("", "off")
            if await self.core.attach_world_book(PLATFORM, self.key, None if detach else book):
                self._write(
                    "World book detached.\n" if detach else f"World book {book} attached.\n"
                )
            else:
                self._write(f"No world book called {book}.\n")
            return
        cast = await self.core.set_cast(PLATFORM, self.key, [n.strip() for n in name.split(",")])
        if cast is None:
            self._write(f"No character called {name}. /character lists them.\n")
            return
        self._write(f"{' and '.join(c.name for c in cast)} on stage (in roleplay mode).\n")
        await self._open_scene()

    async def _memory_command(self, name: str, arg: str) -> None:
        core, key = self.core, self.key
        if name == "/memory":
            answer = await core.memory_report(PLATFORM, key)
        elif name == "/remember":
            answer = await core.remember(PLATFORM, key, arg)
        elif name == "/forget":
            answer = await core.forget_fact(PLATFORM, key, arg)
        elif name == "/note":
            answer = await core.set_note(PLATFORM, key, arg)
        else:
            answer = await core.set_persona(PLATFORM, key, self.user, arg)
        self._write(answer + "\n")

    async def _command(self, text: str) -> bool:
        """Run a slash command; return False when the chat should end."""
        name, _, arg = text.partition(" ")
        name = name.lower()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self._write(
                await self.core.help_text(PLATFORM, self.key, is_dm=True) + "\n"
                "  /quit                leave the chat\n"
            )
        elif name == "/reset":
            await self.core.reset(PLATFORM, self.key)
            self._write("Started a fresh conversation. Earlier messages stay stored.\n")
            await self._open_scene()
        elif name == "/character":
            await self._character(arg.strip())
        elif name in ("/regenerate", "/swipe"):
            if name == "/regenerate":
                replies = self.core.regenerate(PLATFORM, self.key, is_dm=True)
            else:
                step = -1 if arg.strip().lower() in ("back", "prev", "previous", "-1") else 1
                replies = single(await self.core.swipe(PLATFORM, self.key, step))
            await deliver(self, replies)
        elif name in ("/memory", "/remember", "/forget", "/note", "/persona"):
            await self._memory_command(name, arg)
        elif name in ("/continue", "/summarize"):
            if name == "/continue":
                replies = self.core.continue_reply(PLATFORM, self.key, is_dm=True)
            else:
                replies = self.core.summarize(PLATFORM, self.key, True, None, arg)
            await deliver(self, replies)
        elif name == "/mode":
            mode = parse_mode(arg)
            if mode is None:
                now = await self.core.who_am_i(PLATFORM, self.key, is_dm=True)
                wrong = "That is not a mode. " if arg.strip() else ""
                self._write(f"{wrong}{now} Usage: /mode roleplay|work\n")
            else:
                await self.core.set_mode(PLATFORM, self.key, mode)
                self._write(f"Mode set to {mode}: the {ROLE_FOR_MODE[mode]} model answers now.\n")
                await self._open_scene()
        else:
            self._write(f"Unknown command {name}. Type /help for the list.\n")
        return True


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "you"
