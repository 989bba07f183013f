"""Every setting has a valid range: a value outside it stops the command at start."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from store.settings import (
    DEVICE_PATTERN,
    Settings,
    SettingsError,
    allowed_values,
    env_var_name,
    load_settings,
)
from tests.factories import one_error_line

ROOT = Path(__file__).resolve().parents[2]

INVALID_VALUES = [
    ("LAYERBANK_BLOCK_TIMEOUT", "0"),
    ("LAYERBANK_BLOCK_TIMEOUT", "-1"),
    ("LAYERBANK_PROBE_TIMEOUT", "-5"),
    ("LAYERBANK_PRETRAIN_TIMEOUT", "0"),
    ("LAYERBANK_DEVICE", "tpu"),
    ("LAYERBANK_DEVICE", "CUDA"),
    ("LAYERBANK_DEVICE", "cuda:01"),
    ("LAYERBANK_DEVICE", "cuda:-1"),
    ("LAYERBANK_DEVICE", " cpu"),
    ("LAYERBANK_DEVICE", ""),
    ("LAYERBANK_MAX_JSON_ROWS", "-1"),
    ("LAYERBANK_MAX_JSON_ROWS", "0"),
    ("LAYERBANK_MAX_ROWS_PER_FETCH", "0"),
    ("LAYERBANK_MAX_TOKEN_BYTES", "-1"),
    ("LAYERBANK_QUEUE", ""),
    ("LAYERBANK_QUEUE", "my queue"),
    ("LAYERBANK_HOST", ""),
    ("LAYERBANK_STORE", ""),
    ("LAYERBANK_STORE", " "),
    ("LAYERBANK_STORE", "\t\n"),
    ("LAYERBANK_HOST", "127.0.0.1:80"),
    ("LAYERBANK_HOST", "localhost:8000"),
    ("LAYERBANK_HOST", "[::1]"),
    ("LAYERBANK_HOST", "http://127.0.0.1"),
    ("LAYERBANK_HOST", "api_host!"),
    ("LAYERBANK_HOST", "a..b"),
    ("LAYERBANK_HOST", "-api"),
    ("LAYERBANK_PRETRAIN_MEMORY_GIB", "inf"),
    ("LAYERBANK_PRETRAIN_MEMORY_GIB", "0"),
    ("LAYERBANK_ADAPTER_FIT_GIB", "nan"),
    ("LAYERBANK_ADAPTER_FIT_GIB", "-1"),
    ("LAYERBANK_HEARTBEAT_INTERVAL", "inf"),
    ("LAYERBANK_HEARTBEAT_INTERVAL", "0"),
    ("LAYERBANK_JOB_RETENTION_DAYS", "-1"),
    ("LAYERBANK_JOB_RETENTION_DAYS", "nan"),
    ("LAYERBANK_PORT", "0"),
    ("LAYERBANK_PORT", "abc"),
    ("LAYERBANK_MAX_BODY_BYTES", "0"),
    ("LAYERBANK_MAX_LAYERS_PER_EXTRACTION", "0"),
    ("LAYERBANK_MAX_ITEMS_PER_EXTRACTION", "0"),
    ("LAYERBANK_MAX_BLOCKS_PER_EXTRACTION", "0"),
    ("LAYERBANK_MAX_JOBS_PER_KEY", "0"),
    ("LAYERBANK_AUTH", "maybe"),
    ("LAYERBANK_ALLOW_HUB", "2"),
    ("LAYERBANK_CPU_BF16", "maybe"),
    ("REDIS_URL", "foo://x"),
    ("LAYERBANK_HEARTBEAT_INTERVAL", "1e10"),
    ("LAYERBANK_HEARTBEAT_INTERVAL", "1e308"),
    ("LAYERBANK_BLOCK_TIMEOUT", "99999999999"),
    ("LAYERBANK_PROBE_TIMEOUT", "99999999999"),
    ("LAYERBANK_PRETRAIN_TIMEOUT", "99999999999"),
    ("LAYERBANK_JOB_RETENTION_DAYS", "1e9"),
    ("LAYERBANK_ADAPTER_FIT_GIB", "1e300"),
    ("LAYERBANK_PRETRAIN_MEMORY_GIB", "1e300"),
    ("LAYERBANK_MAX_TOKEN_BYTES", str(2**70)),
    ("LAYERBANK_MAX_BODY_BYTES", str(2**62)),
    ("LAYERBANK_MAX_ROWS_PER_FETCH", str(2**62)),
    ("LAYERBANK_MAX_JSON_ROWS", str(2**62)),
]


def _field(variable: str) -> str:
    return next(field for field in Settings.model_fields if env_var_name(field) == variable)


@pytest.mark.parametrize(("variable", "value"), INVALID_VALUES)
def test_invalid_value_names_range(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid {variable}={value!r}: "), message
    assert allowed_values(_field(variable)) in message
    assert "\n" not in message


def test_every_setting_states_its_range() -> None:
    """A number has a bound, and every other setting a description of the values it accepts."""
    for field in Settings.model_fields:
        description = allowed_values(field)
        assert description not in ("", "an integer", "a finite number"), field


NUMERIC_FIELDS = [
    field for field, info in Settings.model_fields.items() if info.annotation in (int, float)
]


def _upper_bound(field: str) -> int | float | None:
    bounds = [item.le for item in Settings.model_fields[field].metadata if hasattr(item, "le")]
    return bounds[0] if bounds else None


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_numeric_setting_has_upper_bound(field: str) -> None:
    """Every duration, size and count has a maximum, and the error message states it."""
    highest = _upper_bound(field)
    assert highest is not None, field
    assert str(highest) in allowed_values(field)


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_numeric_setting_maximum_accepted(monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    highest = _upper_bound(field)
    assert highest is not None, field
    monkeypatch.setenv(env_var_name(field), str(highest))
    assert getattr(load_settings(), field) == highest


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_numeric_setting_above_maximum_rejected(
    monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    highest = _upper_bound(field)
    assert highest is not None, field
    variable = env_var_name(field)
    value = str(highest + 1)
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid {variable}={value!r}: expected "), message
    assert allowed_values(field) in message


@pytest.mark.parametrize(
    "field", [field for field, info in Settings.model_fields.items() if info.annotation is float]
)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_float_setting_rejects_non_finite(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str
) -> None:
    monkeypatch.setenv(env_var_name(field), value)
    with pytest.raises(SettingsError, match="expected a finite number"):
        load_settings()


@pytest.mark.parametrize(
    "value", ["127.0.0.1", "0.0.0.0", "localhost", "::1", "::", "layerbank-api", "api.internal."]
)
def test_valid_hosts_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LAYERBANK_HOST", value)
    assert load_settings().host == value


def test_host_with_port_names_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERBANK_HOST", "127.0.0.1:80")
    with pytest.raises(SettingsError, match="port"):
        load_settings()


def test_store_with_spaces_inside_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERBANK_STORE", "/data/my store")
    assert load_settings().store == "/data/my store"


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_documented_devices_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LAYERBANK_DEVICE", value)
    assert load_settings().device == value


@pytest.mark.parametrize(
    "value", ["cpu", "cuda", "cuda:0", "cuda:7", "cuda:01", "cuda:-1", "cuda:", "CUDA", "tpu"]
)
def test_device_pattern_subset_of_torch(value: str) -> None:
    """Each device the settings accept is one torch.device parses, as a CPU or CUDA device."""
    torch = pytest.importorskip("torch")
    if re.fullmatch(DEVICE_PATTERN, value) is None:
        return
    device = torch.device(value)
    assert device.type in ("cpu", "cuda")


@pytest.mark.parametrize("host", ["127.0.0.1:80", "not a host"])
def test_up_host_option_checked(tmp_path: Path, host: str) -> None:
    """`layerbank up --host` is checked as LAYERBANK_HOST is, before anything starts."""
    env = {key: val for key, val in os.environ.items() if not key.startswith("LAYERBANK_")}
    env.pop("REDIS_URL", None)
    line = one_error_line(["-m", "service.cli", "up", "--host", host, "--port", "1"], env)
    assert line.startswith(f"error: invalid host={host!r}: "), line
    assert "cannot listen" not in line
    assert allowed_values("host") in line


def test_deployment_table_lists_ranges() -> None:
    """docs/deployment.md gives each setting's valid values, as the error message states them."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    for field in Settings.model_fields:
        variable = env_var_name(field)
        rows = [line for line in text.splitlines() if line.startswith(f"| `{variable}` |")]
        assert len(rows) == 1, variable
        assert allowed_values(field) in rows[0], variable


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        (["-m", "workers.main", "--burst"], "LAYERBANK_DEVICE", "tpu"),
        (["-m", "service.serve"], "LAYERBANK_MAX_JSON_ROWS", "-1"),
        (["-m", "service.cli", "up", "--port", "1"], "LAYERBANK_BLOCK_TIMEOUT", "0"),
        (["-m", "workers.main", "--burst"], "LAYERBANK_HEARTBEAT_INTERVAL", "1e10"),
        (["-m", "workers.main", "--burst"], "LAYERBANK_HEARTBEAT_INTERVAL", "1e308"),
        (["-m", "service.cli", "up", "--port", "1"], "LAYERBANK_HEARTBEAT_INTERVAL", "1e10"),
    ],
)
def test_command_stops_at_start(
    tmp_path: Path, command: list[str], variable: str, value: str
) -> None:
    """The worker, the API and `layerbank up` end with one error line and start nothing."""
    env = {key: val for key, val in os.environ.items() if not key.startswith("LAYERBANK_")}
    env.pop("REDIS_URL", None)
    env[variable] = value
    env["LAYERBANK_STORE"] = str(tmp_path / "store")
    line = one_error_line(command, env)
    assert re.match(rf"error: invalid {variable}='{re.escape(value)}': expected ", line)
    assert not (tmp_path / "redis").exists()
