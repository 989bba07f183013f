"""Errors raised by the store package."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by the store package.

    Parameters
    ----------
    message
        A sentence that names the field and the value and states what to do.
    field
        The request field or store key the error is about, if any.
    value
        The offending value, if any.
    """

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value


class InvalidIdError(StoreError):
    """Raised when an id does not have the store's id format."""


class NotFoundError(StoreError):
    """Raised when a feature set, probe result, projection or model is not in the store."""


class NotReadyError(StoreError):
    """Raised when a feature set or result is read before it is complete."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: object = None,
        progress: dict[str, int] | None = None,
    ) -> None:
        super().__init__(message, field=field, value=value)
        self.progress = progress or {}


class LayoutError(StoreError):
    """Raised when a group on disk does not have the layout this version writes."""


class DamagedMetadataError(LayoutError):
    """Raised when a zarr.json metadata file of a feature set is missing, cannot be read, is not
    JSON or is not valid Zarr metadata. ``key`` is the file's store key relative to the feature
    set, such as ``zarr.json`` or ``features/zarr.json``, and ``damage`` the sentence that
    states the damage without the advice. A retry reads the same file, so the worker does not
    retry it."""

    permanent = True

    def __init__(
        self,
        message: str,
        *,
        key: str,
        damage: str,
        field: str | None = None,
        value: object = None,
    ) -> None:
        super().__init__(message, field=field, value=value)
        self.key = key
        self.damage = damage


class DamagedChunkError(StoreError):
    """Raised when a stored object of a complete feature set is missing, truncated or fails
    its checksum."""


class NonFiniteFeaturesError(StoreError):
    """Raised when a block's features contain NaN or infinity, from the model or from the cast
    to the stored dtype. A rerun computes the same values, so the worker does not retry it."""

    permanent = True


class DamagedCreationArrayError(DamagedChunkError):
    """Raised when a stored object of labels or item ids cannot be decoded. These arrays are
    written once when the feature set is created, so neither a resume nor a retry rewrites them."""

    permanent = True


class IncompleteFeatureSetError(NotReadyError):
    """Raised when a feature set's group exists but its creation did not finish: the process
    that created it was killed, or is still writing it. The group contains no usable data, and
    sending the same extraction request again recreates it."""

    permanent = True
