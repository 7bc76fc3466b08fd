"""Command line: ``python -m bot [--config PATH] {run,console,check,prompt,bench,...}``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ai_model.base import ModelError
from bot.shutdown import Shutdown
from chat.settings import Settings, SettingsError, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bot",
        description="Self-hosted Discord/Telegram chatbot on local GGUF models.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="settings file (default: $BOT_CONFIG, else ./bot.toml if present, else built-ins)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the platforms that have a token; the console if none (default)")
    sub.add_parser("console", help="chat with the bot in this terminal")
    sub.add_parser("check", help="check the settings and model files, then exit")
    chars = sub.add_parser("character", help="import, export or list character cards")
    chars_sub = chars.add_subparsers(dest="action", required=True)
    imp = chars_sub.add_parser("import", help="import a card (JSON, PNG or CHARX)")
    imp.add_argument("path")
    imp.add_argument(
        "--replace", action="store_true", help="replace an imported character of the same name"
    )
    exp = chars_sub.add_parser("export", help="write a character's card (JSON, or PNG by suffix)")
    exp.add_argument("name")
    exp.add_argument("path")
    chars_sub.add_parser("list", help="list the characters")
    bench = sub.add_parser("bench", help="measure speed on the embedded model (JSON last line)")
    bench.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    bench.add_argument(
        "--backend",
        choices=("local", "llama-server"),
        default="local",
        help="llama-server: the office role through a llama-server beside in-process",
    )
    bench.add_argument("--url", default="", help="a running llama-server (default: start one)")
    bench.add_argument(
        "--shared",
        action="store_true",
        help="with llama-server: two processes sharing one server, three ways of picking slots",
    )
    bench.add_argument(
        "--flash-attn",
        action="store_true",
        help="with llama-server: flash attention on, on both sides (default: off on both)",
    )
    bench.add_argument(
        "--gpu-layers", type=int, default=0, help="layers of the model on the GPU (-1: all)"
    )
    bench.add_argument(
        "--history",
        type=Path,
        default=None,
        help="a file of earlier runs: guard the core's speed against them, then add this run",
    )
    bench.add_argument(
        "--grammar",
        action="store_true",
        help="tokens/s with the tool-call grammar held against free generation",
    )
    bench.add_argument(
        "--documents",
        action="store_true",
        help="documents: reading a 200-page PDF, searching 10,000 chunks, first token with them",
    )
    prompt = sub.add_parser(
        "prompt", help="print the exact prompt the bot would send, part by part (reads only)"
    )
    source = prompt.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--conversation", metavar="PLATFORM:KEY", help="a stored conversation, e.g. discord:123"
    )
    source.add_argument(
        "--transcript", metavar="PATH", help='JSON: {"mode", "character", "messages": [...]}'
    )
    prompt.add_argument("--mode", choices=("roleplay", "work"), help="override the mode")
    prompt.add_argument("--character", help="override the character (roleplay)")
    prompt.add_argument(
        "--model", metavar="PATH", help="any GGUF file (a vocabulary-only one is enough)"
    )
    prompt.add_argument(
        "--chat-template", metavar="NAME", help="auto (the file's own) or a named format"
    )
    prompt.add_argument("--json", action="store_true", help='print {"ids", "parts", "text"}')
    lore = sub.add_parser("lorebook", help="import a world book for channels to attach")
    lore_sub = lore.add_subparsers(dest="action", required=True)
    lore_imp = lore_sub.add_parser("import", help="import a lorebook JSON (or a card's book)")
    lore_imp.add_argument("path")
    return parser


def _dispatch(
    command: str, settings: Settings, args: argparse.Namespace, shutdown: Shutdown | None = None
) -> int:
    from ai_model.registry import ModelRegistry
    from bot import app
    from bot.secrets import shown_url

    if command == "check":
        from ai_model.memory_plan import available_ram, verdicts

        registry = ModelRegistry(settings.models)
        for line in registry.describe():
            print(line)
        print(f"database: {shown_url(settings.database_url)}")
        plans = registry.memory_plans()
        for plan in plans:
            print(plan.line())
        found = verdicts(plans, available_ram())
        for _fits, line in found:
            print(line)
        return 0 if all(fits for fits, _ in found) else 1
    if command == "bench":
        if args.grammar:
            from bot.bench import grammar as bench_grammar

            return bench_grammar.main(quick=args.quick)
        if args.documents:
            from bot.bench import documents as bench_documents

            return bench_documents.main(quick=args.quick)
        if args.backend == "llama-server":
            from bot.bench import remote as bench_remote

            return bench_remote.main(
                url=args.url, quick=args.quick, shared=args.shared, flash_attn=args.flash_attn
            )
        from bot.bench import figures as bench

        return bench.main(quick=args.quick, gpu_layers=args.gpu_layers, history=args.history)
    if command == "prompt":
        from bot import inspect

        return asyncio.run(inspect.main(settings, args))
    if command in ("character", "lorebook"):
        path = getattr(args, "path", "")
        data = b""
        if args.action == "import":
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                print(f"error: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
                return 2
        name = getattr(args, "name", "")
        replace = bool(getattr(args, "replace", False))
        return asyncio.run(
            app.library_command(settings, command, args.action, name, path, data, replace)
        )
    if command == "console":
        asyncio.run(app.run_console(settings))
    else:
        asyncio.run(app.run_platforms(settings, shutdown))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shutdown = None
    if (args.command or "run") == "run":
        shutdown = Shutdown()
        shutdown.install_early()  # a stop during start-up is a graceful one too
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # one INFO line per HTTP request (Telegram polls, model servers)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    from bot.secrets import redact_logs

    try:
        settings = load_settings(args.config)
        redact_logs(settings)
        command = args.command or "run"
        console = command == "console" or (command == "run" and not settings.chat_platforms)
        if console and not args.verbose:
            # The terminal chat shares the terminal with the log: only warnings and errors
            # come between its lines, unless -v asks for everything.
            logging.getLogger().setLevel(logging.WARNING)
        return _dispatch(command, settings, args, shutdown)
    except SettingsError as exc:
        print(f"error: settings: {exc}", file=sys.stderr)
        return 2
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
