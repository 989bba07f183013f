"""Configuration shared by the API, the workers and the CLI, read from environment variables."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
from pydantic import Field, JsonValue, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from store.errors import StoreError

ENV_PREFIX = "LAYERBANK_"

# The device forms the workers support. torch.device parses each of them, and it rejects a
# leading zero in the index ("cuda:01") and spaces, as this pattern does.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:(0|[1-9][0-9]*))?)$"

# A name without whitespace, e.g. the queue name, which becomes part of rq's Redis keys.
NAME_PATTERN = r"^\S+$"

# One DNS label of a host name (RFC 1123): letters, digits and inner hyphens, 1 to 63 characters.
HOST_LABEL_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

# Upper bounds of the durations, sizes and counts. A larger value is almost always a unit
# mistake, and some would fail only later: with a heartbeat interval of 1e10 s the worker
# crashes with "OverflowError: timestamp too large" on its first heartbeat.
HOUR = 3600
DAY = 86400
WEEK = 7 * DAY
GIB = 2**30
MAX_MEMORY_GIB = 4096


def allowed(text: str) -> dict[str, JsonValue]:
    """Return the ``json_schema_extra`` that states a setting's valid values in an error message.

    Settings without it get a description derived from their type and bounds (see
    `allowed_values`).
    """
    return {"allowed": text}


class SettingsError(StoreError):
    """Raised when an environment variable contains a value its setting does not accept."""


class Settings(BaseSettings):
    """Every setting, with its environment variable (prefix ``LAYERBANK_`` unless noted)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)

    store: str = Field(
        "./data/store",
        pattern=r"\S",
        description="Store root: a directory or an fsspec URL.",
        json_schema_extra=allowed("a directory path or fsspec URL, not empty or only whitespace"),
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias="REDIS_URL",
        description="Redis used as the job queue (REDIS_URL, no prefix).",
        json_schema_extra=allowed(
            "a redis://, rediss:// or unix:// URL, e.g. redis://127.0.0.1:6379/0"
        ),
    )
    queue: str = Field(
        "layerbank",
        pattern=NAME_PATTERN,
        description="Name of the rq queue jobs go to.",
        json_schema_extra=allowed("a non-empty name without whitespace"),
    )
    host: str = Field(
        "127.0.0.1",
        description="Address the API binds to.",
        json_schema_extra=allowed(
            "a host name, IPv4 address or IPv6 address without brackets or port, e.g. 127.0.0.1"
        ),
    )
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on (1-65535).")
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="Worker device: auto, cpu, cuda or cuda:N.",
        json_schema_extra=allowed("auto, cpu, cuda or cuda:N (N a GPU index such as 0 or 1)"),
    )
    cpu_bf16: bool = Field(
        False,
        description="Worker on a CPU: run ImageGPT extraction under bfloat16 autocast, as on "
        "CUDA. Faster on CPUs with AMX; features then differ from float32 ones by about 0.5% "
        "(relative norm per layer).",
    )
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories local datasets may be read from (comma-separated); "
        "empty allows none.",
        json_schema_extra=allowed("comma-separated directories, or empty"),
    )
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories local checkpoints may be read from (comma-separated); "
        "empty allows none.",
        json_schema_extra=allowed("comma-separated directories, or empty"),
    )
    allow_hub: bool = Field(True, description="Resolve Hugging Face Hub ids.")
    block_timeout: int = Field(
        3600, ge=1, le=DAY, description="Seconds one extraction block job may run."
    )
    heartbeat_interval: float = Field(
        default=30.0,
        ge=0.1,
        le=HOUR,
        allow_inf_nan=False,
        description="Seconds between a worker's heartbeats, idle or busy. A running job whose "
        "worker misses three in a row is taken as dead, and the job is retried or marked failed. "
        "An idle worker drops out of /healthz three intervals plus 60 s after its last one.",
    )
    probe_timeout: int = Field(3600, ge=1, le=WEEK, description="Seconds one probe job may run.")
    adapter_fit_gib: float = Field(
        4.0,
        gt=0,
        le=MAX_MEMORY_GIB,
        allow_inf_nan=False,
        description="GiB of memory one adapter probe fit may use, as estimated from its sizes "
        "before it is queued; set it to what one fit may take on the workers' device.",
    )
    job_retention_days: float = Field(
        30.0,
        ge=0,
        le=3650,
        allow_inf_nan=False,
        description="Days after its creation that the record of an ended job (finished, failed "
        "or canceled) is deleted; 0 keeps every record.",
    )
    pretrain_timeout: int = Field(
        7200, ge=1, le=WEEK, description="Seconds one pretraining job may run."
    )
    pretrain_memory_gib: float = Field(
        8.0,
        gt=0,
        le=MAX_MEMORY_GIB,
        allow_inf_nan=False,
        description="GiB of memory one pretraining run may use, as estimated from its model "
        "size, batch_size and image size; checked before the job is queued and again before it "
        "trains. Set it to what one run may take on the workers' device.",
    )
    max_rows_per_fetch: int = Field(
        1_000_000, ge=1, le=100_000_000, description="Rows one layer fetch may return."
    )
    max_json_rows: int = Field(
        1000, ge=1, le=100_000, description="Rows a JSON layer fetch may return."
    )
    max_token_bytes: int = Field(
        2 * GIB,
        ge=0,
        le=1024 * GIB,
        description="Bytes of token-level (unpooled) features one extraction may store.",
    )
    auth: Literal["auto", "required", "off"] = Field(
        "auto",
        description="API keys: auto requires them once a key exists or when binding to a "
        "non-loopback host; required always; off never.",
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1, le=GIB, description="Bytes a request body may have."
    )
    max_layers_per_extraction: int = Field(
        256, ge=1, le=4096, description="Layers one extraction may store."
    )
    max_items_per_extraction: int = Field(
        2_000_000, ge=1, le=100_000_000, description="Dataset items one extraction may store."
    )
    max_blocks_per_extraction: int = Field(
        4096,
        ge=1,
        le=1_000_000,
        description="Blocks one extraction may have; each block is one rq job, so a smaller "
        "block_rows is rejected and the default block size grows to fit.",
    )
    max_jobs_per_key: int = Field(
        8, ge=1, le=100_000, description="Queued or running jobs one API key may have at once."
    )
    model_allow_list: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Model references the service accepts (comma-separated, plus pixels); "
        "unset accepts any.",
        json_schema_extra=allowed("comma-separated model references, or unset"),
    )

    @field_validator("data_roots", "model_roots", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(part).expanduser() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        from redis.connection import parse_url

        try:
            parse_url(value)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        return check_host(value)

    @field_validator("model_allow_list", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            names = [part.strip() for part in value.split(",") if part.strip()]
            return names or None
        return value

    def resolved_device(self) -> str:
        """Return the torch device string; "auto" picks CUDA when a GPU is visible."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def check_host(host: str) -> str:
    """Return ``host`` if it is an IP address or a valid host name, else raise ValueError.

    A host is an IPv4 or IPv6 address or a host name of RFC 1123 labels. `layerbank up --host`
    and LAYERBANK_HOST both go through this check, so a port written into the host is reported
    as such rather than as a failed name lookup.
    """
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if host.startswith("[") and host.endswith("]"):
        raise ValueError(f"write the IPv6 address without brackets, e.g. {host[1:-1]}")
    if "://" in host:
        raise ValueError("the host must be an address or a name, not a URL")
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit():
        raise ValueError(
            f"the host must not contain a port; set the host {name} and the port {port} "
            "separately (LAYERBANK_PORT, or --port of layerbank up)"
        )
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(HOST_LABEL_PATTERN.fullmatch(label) for label in labels):
        raise ValueError(
            "a host name may contain only letters, digits, hyphens (not first or last in a "
            "label) and dots between labels"
        )
    return host


def env_var_name(field: str) -> str:
    """Return the environment variable a setting is read from, e.g. ``LAYERBANK_PORT``."""
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, str):
        return info.validation_alias
    if info is None:
        return field  # already an alias such as REDIS_URL
    return f"{ENV_PREFIX}{field.upper()}"


def allowed_values(field: str) -> str:
    """Describe the values a setting accepts, e.g. "an integer from 1 to 65535".

    The description comes from the field's ``allowed`` entry when it has one, else from its
    type and its ge, gt and le bounds. Error messages and docs/deployment.md use it.
    """
    info = Settings.model_fields[field]
    extra = info.json_schema_extra
    if isinstance(extra, dict):
        description = extra.get("allowed")
        if isinstance(description, str):
            return description
    annotation = info.annotation
    if annotation is bool:
        return "true or false"
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(annotation))
    bounds = {type(item): item for item in info.metadata}
    lowest = bounds.get(annotated_types.Ge)
    above = bounds.get(annotated_types.Gt)
    highest = bounds.get(annotated_types.Le)
    kind = "an integer" if annotation is int else "a finite number"
    if lowest is not None and highest is not None:
        return f"{kind} from {lowest.ge} to {highest.le}"
    if above is not None and highest is not None:
        return f"{kind} greater than {above.gt} and at most {highest.le}"
    if lowest is not None:
        return f"{kind} of at least {lowest.ge}"
    if above is not None:
        return f"{kind} greater than {above.gt}"
    if highest is not None:
        return f"{kind} of at most {highest.le}"
    return kind


def _field_name(loc: str) -> str | None:
    """Return the field an error location names: a field name or an alias such as REDIS_URL."""
    if loc in Settings.model_fields:
        return loc
    for field, info in Settings.model_fields.items():
        if info.validation_alias == loc:
            return field
    return None


def _describe_error(error: Any, name: str, loc: str) -> str:
    """Return one invalid value's message: the variable, the value and what is allowed."""
    field = _field_name(loc)
    expected = f"expected {allowed_values(field)}" if field is not None else ""
    if error["type"] == "value_error":
        # A field validator's own reason, e.g. the URL scheme redis-py rejected.
        reason = str(error["msg"]).removeprefix("Value error, ")
        expected = f"{reason}; {expected}" if expected else reason
    return f"invalid {name}={error['input']!r}: {expected or error['msg']}"


def load_settings(**values: Any) -> Settings:
    """Read the settings from the environment, with ``values`` taking precedence.

    Raises SettingsError with a one-line message in place of pydantic's multi-line
    ValidationError: for each invalid value, its environment variable (or keyword), the value
    and the values the setting accepts.
    """
    try:
        return Settings(**values)
    except ValidationError as exc:
        errors = exc.errors()
        problems = []
        for error in errors:
            field = ".".join(str(part) for part in error["loc"])
            name = field if field in values else env_var_name(field)
            problems.append(_describe_error(error, name, field))
        first_field = ".".join(str(part) for part in errors[0]["loc"]) if errors else None
        raise SettingsError("; ".join(problems), field=first_field) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment (see load_settings)."""
    return load_settings()
