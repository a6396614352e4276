"""Model specs (model_config.py), the config file, its precedence, masked output."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from tokenbridge.exceptions import ConfigurationError
from tokenbridge.model_config import parse_model_flag, parse_model_spec
from tokenbridge.settings import load_settings
from tokenbridge.settings_sources import masked, safe_url

EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "tokenbridge.toml"


@pytest.mark.parametrize(
    ("spec", "entry"),
    [
        ("openai:gpt-4o-mini",
         {"adapter": "openai", "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}),
        ("openai:llama3.1@http://localhost:11434/v1",
         {"adapter": "openai", "model": "llama3.1", "base_url": "http://localhost:11434/v1"}),
        ("anthropic:claude-sonnet-4-5",
         {"adapter": "anthropic", "model": "claude-sonnet-4-5",
          "api_key_env": "ANTHROPIC_API_KEY"}),
        ("demo", {"adapter": "demo"}),
    ],
)  # fmt: skip
def test_model_specs(spec: str, entry: dict[str, str]) -> None:
    assert parse_model_spec(spec) == entry


@pytest.mark.parametrize("spec", ["opnai:gpt", "openai", "openai:x@ftp://h", "demo:x", ""])
def test_bad_model_specs(spec: str) -> None:
    with pytest.raises(ValueError, match=r"ADAPTER:MODEL|demo|http"):
        parse_model_spec(spec)


def test_model_flag_without_a_name_is_named_after_the_model() -> None:
    assert parse_model_flag("openai:gpt-4o")[0] == "gpt-4o"
    with pytest.raises(ConfigurationError, match="--model bad name=demo"):
        parse_model_flag("bad name=demo")


def test_the_documented_example_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENBRIDGE_MODELS", raising=False)
    settings = load_settings(EXAMPLE)
    assert set(settings.models) == {"demo", "gpt", "claude", "llama"}
    assert settings.models["llama"].fallbacks == ["gpt"]
    assert settings.models["gpt"].api_key_env == "OPENAI_API_KEY"


def test_flags_then_variables_then_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    file = tmp_path / "tb.toml"
    file.write_text("port = 1111\nhost = '127.0.0.2'\nshutdown_drain_s = 3\n")
    monkeypatch.setenv("TOKENBRIDGE_PORT", "2222")
    monkeypatch.setenv("TOKENBRIDGE_HOST", "127.0.0.3")
    settings = load_settings(file, host="127.0.0.4")
    assert (settings.host, settings.port, settings.shutdown_drain_s) == ("127.0.0.4", 2222, 3)


def test_variable_table_replaces_the_file_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    file = tmp_path / "tb.toml"
    file.write_text("[models]\ngpt = 'openai:gpt-4o'\n")
    monkeypatch.setenv("TOKENBRIDGE_MODELS", '{"demo": "demo"}')
    assert set(load_settings(file).models) == {"demo"}
    assert set(load_settings(file, ["x=openai:y"]).models) == {"demo", "x"}


def test_masked_keeps_the_redis_host_only() -> None:
    assert masked(SecretStr("redis://u:pw@db:6379/0")) == "redis://***@db:6379/0"
    assert safe_url("rediss://:p@ss@db:6380") == "rediss://***@db:6380"
    assert safe_url("unix:///run/redis.sock") == "unix:///run/redis.sock"
    assert masked([SecretStr("tbk_secret")]) == ["***"]
