"""Content-addressed ids for feature sets, probe results and projections."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from store.errors import InvalidIdError

ID_LENGTH = 24
# The forms of ids and store names, as regular expressions (also stated in the OpenAPI document).
ID_REGEX = rf"^[0-9a-f]{{{ID_LENGTH}}}$"
NAME_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_ID_PATTERN = re.compile(ID_REGEX)
_NAME_PATTERN = re.compile(NAME_REGEX)


def canonical_json(payload: Any) -> str:
    """Serialise ``payload`` so that equal content always gives equal text."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_id(payload: Any) -> str:
    """Return the id of ``payload``: the first 24 hex digits of the sha256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:ID_LENGTH]


def check_id(value: str, *, field: str = "id") -> str:
    """Return ``value`` if it has the id format, else raise `InvalidIdError`.

    Ids are checked before any store access, so a value such as ``../x`` never reaches a path.
    """
    if not isinstance(value, str) or not _ID_PATTERN.match(value):
        raise InvalidIdError(
            f"{field} {value!r} is not a valid id; ids are {ID_LENGTH} lowercase hex digits "
            "as returned by the API",
            field=field,
            value=value,
        )
    return value


def check_name(value: str, *, field: str = "name") -> str:
    """Return ``value`` if it is a safe store name (letters, digits, ``._-``), else raise."""
    if not isinstance(value, str) or not _NAME_PATTERN.match(value) or ".." in value:
        raise InvalidIdError(
            f"{field} {value!r} is not a valid name; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field=field,
            value=value,
        )
    return value


def has_control_characters(text: str) -> bool:
    """Return whether ``text`` contains an ASCII control character (NUL, newline, DEL, ...) or a
    lone surrogate, which no file name or UTF-8 text can hold (JSON's escape ``\\ud800``)."""
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def canonical_path(text: str) -> str:
    """Return the local path ``text`` with repeated slashes, ``.`` segments and a trailing
    slash dropped, so that one file or folder has one spelling in ids.

    ``..`` segments are kept: with a symbolic link before them, dropping them could name
    another file. An empty result keeps ``text`` as it is.
    """
    parts = [part for part in text.split("/") if part not in ("", ".")]
    path = "/".join(parts)
    if text.startswith("/"):
        path = "/" + path
    return path or text
