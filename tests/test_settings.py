"""Renamed settings: the old names keep working for one release, with a DeprecationWarning."""

from __future__ import annotations

import pytest

from tokenbridge.settings import RENAMED, Settings


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED.items()))
def test_old_setting_name_still_works_with_a_warning(
    old: str, new: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = 20_000 if old.endswith("_ms") else 4.0
    with pytest.warns(DeprecationWarning, match=f"use {new}"):
        assert getattr(Settings(**{old: value}), new) == value
    monkeypatch.setenv(f"TOKENBRIDGE_{old.upper()}", str(value))
    with pytest.warns(DeprecationWarning, match=f"TOKENBRIDGE_{new.upper()}"):
        assert getattr(Settings(), new) == value


def test_the_new_name_wins_and_new_names_warn_nothing() -> None:
    with pytest.warns(DeprecationWarning):
        settings = Settings(worker_block_ms=100, consumer_block_ms=200)
    assert settings.consumer_block_ms == 200
    assert Settings(consumer_block_ms=300).consumer_block_ms == 300  # filterwarnings=error


@pytest.mark.parametrize(
    "name", ["api_keys", "auth_previous_secrets", "cors_origins", "processors", "processors_extra"]
)
def test_list_settings_are_comma_separated_in_a_variable(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"TOKENBRIDGE_{name.upper()}", " a, b,,c ")
    values = getattr(Settings(), name)
    plain = [v.get_secret_value() if hasattr(v, "get_secret_value") else v for v in values]
    assert plain == ["a", "b", "c"]
