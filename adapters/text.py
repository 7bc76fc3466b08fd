"""Platform-neutral text handling: splitting long replies and light Markdown to Telegram HTML."""

from __future__ import annotations

import html
import re

FENCE = "```"
_CLOSE = "\n" + FENCE
_SEPARATORS = ("\n\n", "\n", ". ", "! ", "? ", "; ", ", ", " ")


def _best_cut(window: str) -> int:
    """Where to end a chunk inside ``window``: a paragraph, line, sentence or word boundary."""
    floor = len(window) // 3  # a boundary too near the start would make many tiny messages
    for sep in _SEPARATORS:
        at = window.rfind(sep)
        if at > floor:
            return at + len(sep)
    return len(window)


def _open_fence(text: str, end: int) -> tuple[int, str] | None:
    """The (start, opening line) of a code fence still open at ``end``, or None."""
    opened: tuple[int, str] | None = None
    pos = 0
    for line in text[:end].splitlines(keepends=True):
        if line.lstrip().startswith(FENCE):
            opened = None if opened else (pos, line.strip())
        pos += len(line)
    return opened


def split_message(text: str, limit: int) -> list[str]:
    """Split ``text`` into chunks of at most ``limit`` characters.

    Cuts fall on a paragraph, line or sentence boundary, never inside a code fence: a fenced
    block that does not fit is cut before it; one longer than a whole message is closed at the
    cut and reopened (same language) in the next chunk.
    """
    if limit < 32:
        raise ValueError("limit too small to split sensibly")
    chunks: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = _best_cut(rest[:limit])
        fence = _open_fence(rest, cut)
        if fence is not None:
            start, opener = fence
            if start > limit // 4:
                cut = start  # the block starts a new message
            else:
                room = limit - len(_CLOSE)
                cut = _best_cut(rest[:room])
                if _open_fence(rest, cut) is not None:
                    chunks.append(rest[:cut].rstrip("\n") + _CLOSE)
                    rest = opener + "\n" + rest[cut:].lstrip("\n")
                    continue
        chunk = rest[:cut].rstrip()
        if chunk:
            chunks.append(chunk)
        rest = rest[cut:].lstrip()
    if rest:
        chunks.append(rest)
    return chunks


_FENCED = re.compile(r"```([\w+-]*)[^\S\n]*\n?(.*?)(?:```|\Z)", re.S)
_INLINE = [
    (re.compile(r"`([^`\n]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", re.S), r"<b>\1</b>"),
    (re.compile(r"(?<![*\w])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![*\w])"), r"<i>\1</i>"),
    (re.compile(r"(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)", re.S), r"<u>\1</u>"),
]


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    # Inline code first, protected from the emphasis rules by placeholders.
    codes: list[str] = []

    def keep(match: re.Match[str]) -> str:
        codes.append(f"<code>{match.group(1)}</code>")
        return f"\x00{len(codes) - 1}\x00"

    out = _INLINE[0][0].sub(keep, out)
    for pattern, repl in _INLINE[1:]:
        out = pattern.sub(repl, out)
    return re.sub(r"\x00(\d+)\x00", lambda m: codes[int(m.group(1))], out)


def to_telegram_html(text: str) -> str:
    """Render the light Markdown models write (fences, `code`, **bold**, *action*) as HTML."""
    parts: list[str] = []
    pos = 0
    for match in _FENCED.finditer(text):
        parts.append(_inline_html(text[pos : match.start()]))
        lang, body = match.group(1), html.escape(match.group(2).rstrip("\n"), quote=False)
        cls = f' class="language-{lang}"' if lang else ""
        parts.append(f"<pre><code{cls}>{body}</code></pre>")
        pos = match.end()
    parts.append(_inline_html(text[pos:]))
    return "".join(parts)
