"""The program as a user runs it: console chat through stdin, and start-up errors."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_bot(
    args: list[str], tmp_path: Path, stdin: str = "", timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DISCORD_TOKEN", "TELEGRAM_BOT_TOKEN", "BOT_CONFIG"}
    }
    environ.update(
        {"BOT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", "USER": "tester", **env}
    )
    environ["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environ,
        timeout=timeout,
    )


def test_console_exchange_with_commands_and_history_across_restarts(tmp_path: Path) -> None:
    script = "\n".join(
        [
            "/help",
            "Hello! What can you do?",
            "/mode roleplay",
            "Good evening, innkeeper.",
            "/continue",
            "/remember The inn is the Lantern.",
            "/memory",
            "/mode dance",
            "/bogus",
            "/quit",
            "",
        ]
    )
    first = run_bot(["console"], tmp_path, script)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "/mode roleplay|work" in out and "/reset" in out  # help
    assert "you> bot> " in out  # the office assistant answered
    assert "Mode set to roleplay" in out
    assert "Mira> " in out  # the character answered after the switch
    assert "That is not a mode. I play Mira (roleplay mode). Usage: /mode roleplay|work" in out
    assert "/bogus is not one of my commands; send /help." in out
    assert "I will remember that (fact 1)" in out and "1. The inn is the Lantern." in out
    # The terminal chat keeps the log out of the conversation: warnings only...
    assert " INFO " not in first.stderr and " INFO " not in out
    assert "Traceback" not in first.stderr

    second = run_bot(["-v", "run"], tmp_path, "Do you remember me?\n/reset\n")
    assert second.returncode == 0, second.stderr
    # ... unless -v brings it back: the start-up log names the model serving each role.
    assert "character role -> SmolLM2-135M-Instruct" in second.stderr
    assert "office role -> SmolLM2-135M-Instruct" in second.stderr
    assert "Mira> " in second.stdout  # the mode survived the restart
    assert "Started a fresh conversation" in second.stdout
    with sqlite3.connect(tmp_path / "bot.db") as db:
        rows = db.execute(
            "SELECT m.role, m.text, m.reply_to_id, m.in_context FROM messages m"
            " JOIN conversations c ON c.id = m.conversation_id"
            " WHERE c.key = 'console:tester' ORDER BY m.id"
        ).fetchall()
        reset_after = db.execute(
            "SELECT reset_after_id FROM conversations WHERE key = 'console:tester'"
        ).fetchone()[0]
    assert [r[1] for r in rows if r[0] == "user"] == [
        "Hello! What can you do?",
        "Good evening, innkeeper.",
        "Do you remember me?",
    ]
    assert sum(1 for r in rows if r[0] == "assistant" and r[2] is not None) == 3
    # The roleplay scene opened with Mira's greeting (its alternatives stored as swipes),
    # after the mode switch and again after the reset.
    greetings = [r for r in rows if r[0] == "assistant" and r[2] is None]
    assert [g[3] for g in greetings] == [1, 0, 0, 1, 0, 0]
    assert "Welcome to the Lantern Inn" in greetings[0][1]
    assert "Welcome to the Lantern Inn" in second.stdout
    assert reset_after == len(rows) - 3


def test_missing_model_file_stops_start_up_with_one_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "bot.toml"
    config.write_text(
        '[models.office]\npath = "models/absent.gguf"\n'
        'download_url = "https://example.invalid/absent.gguf"\n'
    )
    for command in ("run", "check"):
        result = run_bot(["--config", str(config), command], tmp_path)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert str(tmp_path / "models" / "absent.gguf") in result.stderr
        assert "https://example.invalid/absent.gguf" in result.stderr
        assert "office role" in result.stderr
    assert not (tmp_path / "bot.db").exists()  # nothing started


def test_bad_settings_file_is_reported_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bot.toml"
    config.write_text('[platforms.discord]\ntoken = "oops"\n')
    result = run_bot(["--config", str(config), "check"], tmp_path)
    assert result.returncode == 2
    assert "environment only" in result.stderr and "Traceback" not in result.stderr


async def test_console_ping_answers_pong_and_the_uptime(make_core: Any) -> None:
    import io

    from adapters.console import ConsoleAdapter
    from tests.scripted import ScriptedModel

    model = ScriptedModel(["hi"])
    core = make_core({"office": model, "character": model})
    out = io.StringIO()
    await ConsoleAdapter(core, io.StringIO("/help\n/ping\n/quit\n"), out, user="me").start()
    assert "/ping" in out.getvalue() and "pong — up for 0 min" in out.getvalue()


async def test_the_terminal_chat_reads_a_file_by_its_path(make_core: Any, tmp_path: Path) -> None:
    import io

    from adapters.console import ConsoleAdapter
    from tests.document_files import pdf
    from tests.scripted import ScriptedModel
    from tests.test_documents import PAGES, documents_block

    model = ScriptedModel(["Ninety days [1]."])
    core = make_core({"office": model, "character": model})
    (tmp_path / "contract.pdf").write_bytes(pdf(PAGES))
    typed = (
        f"/docs add {tmp_path / 'contract.pdf'}\n/docs add /no/such/file.pdf\n/docs\n"
        "/ask what is the notice period?\n/quit\n"
    )
    out = io.StringIO()
    await ConsoleAdapter(core, io.StringIO(typed), out, user="me").start()
    shown = out.getvalue()
    assert "Read contract.pdf (PDF, 4 pages" in shown
    assert "Attach a file to /docs add" in shown  # a path that is not a file
    assert "1. contract.pdf (PDF" in shown
    assert "[1] contract.pdf, page 3:" in documents_block(model.prompts[-1])
    assert documents_block(model.prompts[-1]).startswith("Answer the question below only from")
    assert "Sources: [1] contract.pdf, page 3" in shown
