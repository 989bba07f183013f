"""Local dataset paths: the allowed-roots rule and the file stamps that key the cache."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from store.ids import has_control_characters
from workers.errors import DatasetError, PathNotAllowedError, absolute_path_hint

__all__ = ["FileStamp", "check_allowed", "resolve_dataset_path", "stamp_files", "stamp_tree"]

# (path, modification time in ns, size in bytes) of one file.
FileStamp = tuple[str, int, int]


def resolve_dataset_path(raw: str, *, reference: str, allowed_roots: Sequence[Path] | None) -> Path:
    """Resolve the path of a dataset reference, following symlinks, and check it.

    Parameters
    ----------
    raw
        The path part of the reference (after ``"npz:"`` and the like).
    reference
        The whole reference, for messages.
    allowed_roots
        Directories the path must lie under, or None to allow any path.

    Raises
    ------
    PathNotAllowedError
        When the resolved path lies outside every allowed root. This is checked before
        existence, so a caller learns nothing about files outside the roots.
    DatasetError
        When the reference has no path or the path does not exist.
    """
    if has_control_characters(raw):
        raise DatasetError(
            f"dataset {reference!r} contains control characters or a lone surrogate in its "
            "path; write the path without them",
            field="dataset",
            value=reference,
        )
    if not raw:
        raise DatasetError(
            f"dataset {reference!r} has no path after the prefix; write it as "
            f"{reference.rstrip(':')}:/path/to/data",
            field="dataset",
            value=reference,
        )
    if allowed_roots is not None and not Path(raw).is_absolute():
        # It would be resolved against the service's working directory, which a client cannot
        # know and which the error message would then reveal.
        hint = absolute_path_hint("dataset", allowed_roots, "LAYERBANK_DATA_ROOTS")
        raise PathNotAllowedError(
            f"dataset {reference!r} has a relative path; {hint}",
            field="dataset",
            value=reference,
        )
    path = _resolve(Path(raw), reference)
    check_allowed(path, reference=reference, allowed_roots=allowed_roots)
    if not path.exists():
        raise DatasetError(
            f"dataset {reference!r}: {path} does not exist; check the path",
            field="dataset",
            value=reference,
        )
    # Path.resolve() removes "missing/.." as text, while the system's lookup fails on it. Such a
    # path would load the file under a second spelling and give it a second feature-set id.
    if not os.path.exists(raw):
        raise DatasetError(
            f"dataset {reference!r}: {raw} does not exist (a folder in it is missing, "
            f"although {path} exists); write the path as {path}",
            field="dataset",
            value=reference,
        )
    return path


def check_allowed(path: Path, *, reference: str, allowed_roots: Sequence[Path] | None) -> None:
    """Raise PathNotAllowedError when the resolved ``path`` lies outside all roots."""
    if allowed_roots is None:
        return
    roots = [_resolve(Path(root), reference) for root in allowed_roots]
    resolved = _resolve(path, reference)
    if any(resolved == root or resolved.is_relative_to(root) for root in roots):
        return
    listed = ", ".join(str(root) for root in roots) or "none are configured"
    raise PathNotAllowedError(
        f"dataset {reference!r} resolves to {resolved}, outside the allowed dataset roots "
        f"({listed}); put the data under one of them or ask an administrator to add a root",
        field="dataset",
        value=reference,
    )


def stamp_files(paths: Iterable[Path]) -> tuple[FileStamp, ...]:
    """Modification time and size of each file, to tell a changed dataset from a cached one."""
    stamps = []
    for path in paths:
        try:
            status = path.stat()
        except OSError:  # a broken link: loading will report it
            stamps.append((str(path), -1, -1))
            continue
        stamps.append((str(path), status.st_mtime_ns, status.st_size))
    return tuple(stamps)


def stamp_tree(root: Path) -> tuple[FileStamp, ...]:
    """Stamps of every file under ``root``, in a stable order."""
    files: list[Path] = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files.extend(Path(folder, name) for name in sorted(filenames))
    return stamp_files(files)


def _resolve(path: Path, reference: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop before Python 3.13
        raise DatasetError(
            f"dataset {reference!r}: {path} cannot be resolved ({exc}); check the path",
            field="dataset",
            value=reference,
        ) from exc
