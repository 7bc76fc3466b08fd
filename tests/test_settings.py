"""Settings: TOML plus environment, defaults, the shipped profiles and clear errors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from chat.settings import SettingsError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_use_the_embedded_model_with_the_documented_parameters() -> None:
    settings = parse_settings({}, env={})
    for role in ("character", "office"):
        model = settings.models[role]
        assert model.path == ""  # embedded SmolLM2
        assert (model.n_ctx, model.n_batch, model.kv_cache_type) == (8191, 2048, "f16")
        assert (model.sampling.temperature, model.sampling.top_p) == (0.6, 0.9)
        assert model.chat_template == "auto"
    assert settings.platform("discord").dm_mode == "work"
    assert settings.platform("telegram").token is None


def test_environment_supplies_secrets_database_and_api_urls() -> None:
    env = {
        "DISCORD_TOKEN": "d-secret",
        "TELEGRAM_BOT_TOKEN": "t-secret",
        "BOT_DATABASE_URL": "sqlite+aiosqlite:///elsewhere.db",
        "TELEGRAM_BASE_URL": "http://127.0.0.1:8081/bot",
    }
    raw = {"bot": {"database_url": "sqlite+aiosqlite:///file.db"}}
    settings = parse_settings(raw, env=env)
    assert settings.platform("discord").token == "d-secret"
    assert settings.platform("telegram").token == "t-secret"
    assert settings.database_url == "sqlite+aiosqlite:///elsewhere.db"
    assert settings.platform("telegram").api_base_url == "http://127.0.0.1:8081/bot"
    assert "d-secret" not in repr(settings)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"platforms": {"discord": {"token": "x"}}}, "environment only"),
        ({"models": {"office": {"n_ctxx": 4096}}}, "n_ctxx"),
        ({"models": {"writer": {}}}, "unknown model role"),
        ({"platforms": {"telegram": {"default_mode": "party"}}}, "roleplay' or 'work'"),
        ({"models": {"office": {"kv_cache_type": "f8"}}}, "kv_cache_type"),
        ({"models": {"office": {"batch_wait_ms": 5000}}}, "batch_wait_ms must be between"),
        ({"bot": {"default_character": "Nobody"}}, "Nobody"),
        ({"bot": {"recover_window": "soon"}}, "recover_window"),
        ({"bot": {"offline_notice": "yes"}}, "offline_notice"),
        ({"bot": {"catch_up_limit": -1}}, "catch_up_limit"),
        ({"platforms": {"discord": {"shard_ids": [0]}}}, "needs shard_count"),
        ({"platforms": {"discord": {"shard_count": 2, "shard_ids": [2]}}}, "from 0 to 1"),
        # Values of the wrong type: named, with what was given and what is expected.
        (
            {"platforms": {"discord": {"roleplay_reply_all": "false"}}},
            r"\[platforms.discord\] roleplay_reply_all = 'false': input should be a valid bool",
        ),
        (
            {"platforms": {"discord": {"guild_id": "abc"}}},
            r"guild_id = 'abc': input should be a valid integer",
        ),
        (
            {"models": {"office": {"n_ctx": "8191"}}},
            r"\[models.office\] n_ctx = '8191': input should be a valid integer",
        ),
        (
            {"platforms": {"discord": {"admin_role_ids": ["x"]}}},
            r"admin_role_ids\[0\] = 'x': input should be a valid integer",
        ),
        (
            {"models": {"office": {"sampling": {"temperature": "hot"}}}},
            r"\[models.office.sampling\] temperature = 'hot'",
        ),
        ({"models": {"office": {"flash_attn": 1}}}, "flash_attn = 1: input should be a valid bool"),
        ({"tools": {"format": "xml"}}, r'\[tools\]: format must be "auto", "all" or "native"'),
        ({"tools": {"choice": "always"}}, r'\[tools\]: choice must be "auto" or "required"'),
    ],
)
def test_invalid_settings_are_reported_clearly(raw: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        parse_settings(raw, env={})


def test_recover_window_takes_seconds_or_a_duration() -> None:
    assert parse_settings({}, env={}).recover_window == 3600  # an hour by default
    for value, seconds in (("30m", 1800), ("2h", 7200), ("90s", 90), ("1d", 86400), (600, 600)):
        assert parse_settings({"bot": {"recover_window": value}}, env={}).recover_window == seconds


def test_shipped_example_parses_to_the_defaults() -> None:
    settings = load_settings(ROOT / "config" / "example.toml", env={})
    assert settings.models["character"] == parse_settings({}, env={}).models["character"]
    assert settings.models["office"].load_key() == settings.models["character"].load_key()


def test_seed_profile_matches_the_seed_deployment() -> None:
    settings = load_settings(ROOT / "config" / "seed-llama31-8b-claude.toml", env={})
    char, office = settings.models["character"], settings.models["office"]
    assert char.path.endswith("QuantFactory/Meta-Llama-3.1-8B-Claude.Q4_0.gguf")
    assert office.path.endswith("QuantFactory/Meta-Llama-3.1-8B-Claude.Q4_1.gguf")
    assert (char.main_gpu, char.n_gpu_layers) == (0, 50)
    assert (office.main_gpu, office.n_gpu_layers) == (1, -1)
    for model in (char, office):
        assert (model.n_ctx, model.n_batch, model.kv_cache_type) == (8191, 2048, "f16")
        assert model.flash_attn and model.split_mode == "none"
        assert (model.rope_scaling_type, model.rope_scaling_factor) == ("linear", 2.0)
        assert model.download_url.startswith("https://huggingface.co/QuantFactory/")


def test_config_file_is_chosen_by_argument_then_bot_config(tmp_path: Path) -> None:
    first = tmp_path / "a.toml"
    first.write_text('[bot]\nsystem_prompt = "from a"\n')
    second = tmp_path / "b.toml"
    second.write_text('[bot]\nsystem_prompt = "from b"\n')
    assert load_settings(first, env={"BOT_CONFIG": str(second)}).system_prompt == "from a"
    assert load_settings(None, env={"BOT_CONFIG": str(second)}).system_prompt == "from b"
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.toml", env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[bot\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(broken, env={})


def test_example_documents_every_model_setting() -> None:
    from dataclasses import fields

    from ai_model.config import ModelSettings, SamplingSettings

    raw = tomllib.loads((ROOT / "config" / "example.toml").read_text())
    character = raw["models"]["character"]
    documented = set(character) | {"sampling"}
    assert {f.name for f in fields(ModelSettings)} <= documented
    assert {f.name for f in fields(SamplingSettings)} <= set(character["sampling"])


def test_a_settings_file_of_the_wrong_type_stops_with_one_line(tmp_path: Path) -> None:
    from tests.test_cli import run_bot

    config = tmp_path / "bot.toml"
    config.write_text('[models.office]\nn_ctx = "8191"\n', encoding="utf-8")
    done = run_bot(["--config", str(config), "check"], tmp_path)
    assert done.returncode != 0
    assert "n_ctx = '8191': input should be a valid integer" in done.stderr
    assert "Traceback" not in done.stderr


def test_secrets_stay_out_of_output_and_logs(tmp_path: Path) -> None:
    import io
    import logging

    from bot.secrets import redact_logs, shown_url
    from tests.test_cli import run_bot

    url = "postgresql+asyncpg://bot:s3cret-pw@db.example:5432/bot"
    assert shown_url(url) == "postgresql+asyncpg://bot:***@db.example:5432/bot"
    done = run_bot(["check"], tmp_path, BOT_DATABASE_URL=url)
    assert done.returncode == 0, done.stderr
    assert "db.example" in done.stdout and "s3cret-pw" not in done.stdout + done.stderr

    env = {"TELEGRAM_BOT_TOKEN": "123456:SECRET-token", "BOT_OFFICE_API_KEY": "sk-office-1"}
    settings = parse_settings({}, env=env)
    assert settings.models["office"].api_key == "sk-office-1"  # from the environment
    assert "sk-office-1" not in repr(settings)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        redact_logs(settings)
        log = logging.getLogger("httpx")
        log.warning(
            "HTTP Request: POST %s", "https://api.telegram.org/bot123456:SECRET-token/getMe"
        )
        log.warning("Authorization: Bearer sk-office-1")
    finally:
        root.removeHandler(handler)
    assert "SECRET-token" not in out.getvalue() and "sk-office-1" not in out.getvalue()
    assert "https://api.telegram.org/bot***/getMe" in out.getvalue()


def _documented_example() -> dict[str, Any]:
    """config/example.toml with every commented-out ``# key = value`` and ``# [table]`` line
    taken in: all that it documents."""
    lines = []
    for line in (ROOT / "config" / "example.toml").read_text().splitlines():
        found = re.match(r"# ?(\[[\w.]+\](?:\s+#.*)?|\w+ = .*)$", line)
        lines.append(found.group(1) if found else line)
    return tomllib.loads("\n".join(lines))


def _leaves(table: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = []
    for key, value in table.items():
        if isinstance(value, dict):
            found += _leaves(value, (*path, key))
        else:
            found.append(((*path, key), value))
    return found


def _wrong(value: Any) -> Any:
    """A value of another TOML type than ``value``."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, int | float):
        return "many"
    if isinstance(value, str):
        return [value]
    return "a string"


WEBHOOK_ENV = {"TELEGRAM_WEBHOOK_SECRET": "s3cret"}


def test_every_documented_key_exists() -> None:
    settings = parse_settings(_documented_example(), env=WEBHOOK_ENV)
    assert settings.metrics_listen == "127.0.0.1:9464"
    assert settings.platform("telegram").webhook_url == "https://bot.example.org/telegram"
    assert "ada" in settings.characters


@pytest.mark.parametrize(
    "path", [p for p, _ in _leaves(_documented_example())], ids=lambda p: ".".join(p)
)
def test_a_wrong_type_for_any_key_is_one_line_naming_it(path: tuple[str, ...]) -> None:
    raw = _documented_example()
    table = raw
    for part in path[:-1]:
        table = table[part]
    given = _wrong(table[path[-1]])
    table[path[-1]] = given
    with pytest.raises(SettingsError) as caught:
        parse_settings(raw, env=WEBHOOK_ENV)
    message = str(caught.value)
    assert "\n" not in message
    assert path[-1] in message or ".".join(path[-2:]) in message, message
