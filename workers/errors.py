"""Errors raised by the workers package.

Every error carries the request field it concerns and the offending value, so the API can
turn it into a 4xx response that shows the caller what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "DatasetError",
    "JobCanceledError",
    "ModelError",
    "PathNotAllowedError",
    "ProbeError",
    "WorkersError",
]


class WorkersError(Exception):
    """Base class of every error raised by the workers package.

    Parameters
    ----------
    message
        What went wrong and what to do about it, naming the field and the value.
    field
        The request field the error concerns (``"dataset"``, ``"split"``, ``"limit"``, ...),
        or None when no single field is to blame.
    value
        The offending value as the caller gave it.

    Attributes
    ----------
    permanent
        Whether running the same job again must fail the same way (a bad parameter, a path
        outside the allowed roots). A worker does not retry a job that raised such an error.
    """

    permanent = False

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value

    def __str__(self) -> str:
        return self.message


class DatasetError(WorkersError):
    """Raised when a dataset reference, split or item cannot be loaded."""


class ModelError(WorkersError):
    """Raised when a model reference cannot be resolved or loaded."""


class ProbeError(WorkersError):
    """Raised when a probe request cannot be fitted on the given features."""

    permanent = True


class JobCanceledError(WorkersError):
    """Raised inside an rq job whose layerbank job was canceled through the API."""


class PathNotAllowedError(WorkersError):
    """Raised when a path resolves outside the configured roots."""

    permanent = True


def absolute_path_hint(kind: str, roots: Sequence[Path], setting: str) -> str:
    """Return the fix for a relative ``kind`` path ("dataset" or "model") under ``roots``."""
    if not roots:
        return f"this service reads no local {kind}s ({setting} is empty)"
    listed = ", ".join(str(root) for root in roots)
    return f"pass an absolute path under one of the allowed {kind} roots ({listed})"


class BusyError(WorkersError):
    """Raised when a request needs a resource that other requests are using, so the caller
    should retry later."""

    retry_after = 30
