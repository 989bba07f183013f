"""Settings read from the environment: invalid values give one-line errors naming the variable."""

from __future__ import annotations

import pytest

from store.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("LAYERBANK_PORT", "70000", "an integer from 1 to 65535"),
        ("LAYERBANK_PORT", "0", "an integer from 1 to 65535"),
        ("REDIS_URL", "foo://x", "redis://, rediss://, unix://"),
        ("REDIS_URL", "redis://127.0.0.1:notaport/0", "Port could not be cast"),
        ("REDIS_URL", "", "redis://, rediss://, unix://"),
        ("LAYERBANK_CPU_BF16", "maybe", "expected true or false"),
        ("LAYERBANK_ALLOW_HUB", "2", "expected true or false"),
    ],
)
def test_settings_invalid_value_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert f"invalid {variable}={value!r}" in message
    assert expected in message
    assert "\n" not in message


def test_settings_unix_socket_redis_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "unix:///tmp/redis.sock")
    assert load_settings().redis_url == "unix:///tmp/redis.sock"
