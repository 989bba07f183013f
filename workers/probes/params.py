"""Reading probe hyper-parameters from the request's ``params`` mapping.

Every reader validates one entry and raises :class:`~workers.errors.ProbeError` naming the
parameter and the offending value, so a bad request fails before any layer is read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from workers.errors import ProbeError

COMMON_PARAMS = frozenset({"engine", "val_fraction"})
# Most values one hyper-parameter grid may list. Each value is a fit per layer, so a longer
# grid would hold a worker for hours; a finer search belongs in several requests.
MAX_GRID_VALUES = 100
# Probe kinds whose name starts with a vowel sound: "an adapter", "an mlp" (em-el-pee).
_KINDS_AFTER_AN = frozenset({"adapter", "mlp"})


def format_json(value: Any) -> str:
    """Format a request value as JSON for an error message: null, true, "text", [1, 2].

    Clients send JSON, so a message shows their value as they wrote it rather than as a
    Python repr (None, True, 'text'). Text with a lone surrogate, which UTF-8 cannot encode,
    keeps its \\u escapes. A value that JSON cannot encode is shown by its repr.
    """
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def _with_article(kind: str) -> str:
    return f"an {kind}" if kind in _KINDS_AFTER_AN else f"a {kind}"


def check_known(params: Mapping[str, Any], kind: str, allowed: Collection[str]) -> None:
    """Reject parameter names that the probe kind does not use (typos fail loudly)."""
    known = set(allowed) | COMMON_PARAMS
    for name in params:
        if name not in known:
            raise ProbeError(
                f"unknown parameter {name!r} for {_with_article(kind)} probe; "
                f"use one of {', '.join(sorted(known))}",
                field=name,
                value=params[name],
            )


def _is_number(value: Any) -> bool:
    # bool is an int subclass; True as a learning rate is a caller's mistake, not 1.0.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_float(
    params: Mapping[str, Any],
    name: str,
    default: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Read a finite number within ``[low, high]`` (either end open on request)."""
    value = params.get(name, default)
    _check_float(name, value, low, high, low_open, high_open)
    return float(value)


def _check_float(
    name: str,
    value: Any,
    low: float | None,
    high: float | None,
    low_open: bool,
    high_open: bool,
) -> None:
    if not _is_number(value):
        raise ProbeError(
            f"{name} must be a finite number, got {format_json(value)}", field=name, value=value
        )
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        closing = ")" if high_open or high is None else "]"
        interval = f"{'(' if low_open else '['}{lo}, {hi}{closing}"
        raise ProbeError(
            f"{name}={format_json(value)} is out of range; pass a value in {interval}",
            field=name,
            value=value,
        )


def read_int(
    params: Mapping[str, Any],
    name: str,
    default: int,
    *,
    low: int = 1,
    high: int | None = None,
) -> int:
    """Read an integer within ``[low, high]``, accepting a float with an integral value."""
    return _check_int(name, params.get(name, default), low, high)


def integral_to_int(value: Any) -> Any:
    """Return a float with an integral value below 2**53 as an int, any other value as it is.

    JSON parsers read 2.0 and 1e3 as floats, and JSON Schema's integer includes them. From 2**53
    on every float is integral and its int has up to 309 digits, so those stay floats, which
    the checks then report as the number sent.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _check_int(name: str, value: Any, low: int, high: int | None) -> int:
    """Return ``value`` as an int, raising ProbeError unless it is an integer in range.

    JSON Schema's integer includes 2.0 and 1e3, which JSON parsers read as floats, so a float
    with an integral value is accepted. Booleans, strings, fractions, NaN and infinity are not.
    Integral floats from 2**53 on count as out of range: no count here comes near them, and
    their ints would print with up to 309 digits.
    """
    bound = f"[{low}, {high}]" if high is not None else f">= {low} and below 2**53"
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        integer = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        integer = value
    elif isinstance(value, float) and value.is_integer():
        integer = 2**53
    else:
        raise ProbeError(
            f"{name} must be an integer, got {format_json(value)}", field=name, value=value
        )
    if integer < low or (high is not None and integer > high) or abs(integer) >= 2**53:
        raise ProbeError(
            f"{name}={format_json(value)} is out of range; pass an integer {bound}",
            field=name,
            value=value,
        )
    return integer


def read_choice(params: Mapping[str, Any], name: str, default: str, choices: Sequence[str]) -> str:
    """Read one of a fixed set of strings."""
    value = params.get(name, default)
    if value not in choices:
        raise ProbeError(
            f"{name}={format_json(value)} is not supported; use one of "
            f"{', '.join(map(format_json, choices))}",
            field=name,
            value=value,
        )
    return str(value)


def read_grid(
    params: Mapping[str, Any],
    name: str,
    default: Sequence[float],
    *,
    integer: bool = False,
    low: float = 0.0,
    low_open: bool = True,
) -> tuple[list[Any], bool]:
    """Read a hyper-parameter grid: a single number or a non-empty list of numbers.

    Returns
    -------
    grid
        The distinct values in increasing order.
    explicit
        Whether the caller passed the grid (``False`` when the default was used).
    """
    explicit = name in params
    value = params.get(name, list(default))
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        raise ProbeError(
            f"{name} grid is empty; pass a number or a non-empty list of numbers",
            field=name,
            value=value,
        )
    checked: list[Any] = []
    for item in values:
        if integer:
            checked.append(_check_int(name, item, int(low) + (1 if low_open else 0), None))
        else:
            _check_float(name, item, low, None, low_open, False)
            checked.append(float(item))
    grid = sorted(set(checked))
    if len(grid) > MAX_GRID_VALUES:
        raise ProbeError(
            f"{name} grid has {len(grid)} distinct values, more than the maximum of "
            f"{MAX_GRID_VALUES}; pass at most {MAX_GRID_VALUES}",
            field=name,
            value=value,
        )
    return grid, explicit
