"""CIFAR-10 and CIFAR-100 in their original python-pickle directories.

CIFAR-10 (``cifar-10-batches-py``): ``data_batch_1`` to ``data_batch_5``, ``test_batch`` and
``batches.meta`` (``label_names``). CIFAR-100 (``cifar-100-python``): ``train``, ``test`` and
``meta`` (``fine_label_names``, ``coarse_label_names``); labels are the fine ones unless
``label_column="coarse_labels"``. Each batch is a pickled dict whose ``data`` is a uint8 array
of shape (n_items, 3072), each row the red, green and blue 32x32 planes in turn.

The pickles are read with an unpickler that only builds plain containers and numpy arrays,
so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workers.datasets.paths import FileStamp, check_allowed, stamp_files
from workers.datasets.source import SourceSplit
from workers.errors import DatasetError

__all__ = ["CifarSource"]

_CIFAR10_FILES = {
    "train": [f"data_batch_{number}" for number in range(1, 6)],
    "test": ["test_batch"],
}
_CIFAR100_FILES = {"train": ["train"], "test": ["test"]}
_DOWNLOAD_FOLDERS = ("cifar-10-batches-py", "cifar-100-python")
_SIDE = 32

# The globals that pickled bytes (protocol 2 builds them with _codecs.encode) and numpy arrays
# (numpy 1 and 2 module names) need; nothing else loads.
_SAFE_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


class CifarSource:
    """The train and test splits of a CIFAR-10 or CIFAR-100 directory."""

    kind = "cifar"

    def __init__(
        self,
        reference: str,
        root: Path,
        *,
        label_column: str | None,
        allowed_roots: Sequence[Path] | None,
    ) -> None:
        self.reference = reference
        self.root = _find_batches_folder(root)
        if (self.root / "batches.meta").is_file():
            self.files, meta_name = _CIFAR10_FILES, "batches.meta"
            label_keys = {"labels": "label_names"}
        elif (self.root / "meta").is_file():
            self.files, meta_name = _CIFAR100_FILES, "meta"
            label_keys = {"fine_labels": "fine_label_names", "coarse_labels": "coarse_label_names"}
        else:
            raise self._error(
                f"{root} is not a CIFAR python directory: it needs batches.meta, data_batch_1..5 "
                "and test_batch (CIFAR-10) or meta, train and test (CIFAR-100), as unpacked "
                "from cifar-10-python.tar.gz or cifar-100-python.tar.gz"
            )
        self.meta_path = self.root / meta_name

        self.label_key = label_column or next(iter(label_keys))
        if self.label_key not in label_keys:
            raise DatasetError(
                f"label_column {label_column!r} does not exist in {reference!r}; use one of "
                f"{sorted(label_keys)} or leave it unset",
                field="label_column",
                value=label_column,
            )
        self.names_key = label_keys[self.label_key]
        self.paths = [self.meta_path]
        self.paths += [self.root / name for names in self.files.values() for name in names]
        missing = [path.name for path in self.paths if not path.is_file()]
        if missing:
            raise self._error(f"{self.root} lacks the files {missing}; unpack the archive again")
        for path in self.paths:
            check_allowed(path, reference=reference, allowed_roots=allowed_roots)

    def split_names(self) -> list[str]:
        return list(self.files)

    def stamp(self) -> tuple[FileStamp, ...]:
        return stamp_files(self.paths)

    def read(self, split: str) -> SourceSplit:
        meta = self._load(self.meta_path)
        class_names = [_text(name) for name in self._entry(meta, self.meta_path, self.names_key)]

        pixels, labels = [], []
        for name in self.files[split]:
            path = self.root / name
            batch = self._load(path)
            data = np.asarray(self._entry(batch, path, "data"))
            batch_labels = np.asarray(self._entry(batch, path, self.label_key))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _SIDE * _SIDE:
                raise self._error(
                    f"{path}: 'data' has dtype {data.dtype} and shape {data.shape}, not uint8 "
                    f"(n, {3 * _SIDE * _SIDE}); the file is not a CIFAR batch"
                )
            if batch_labels.shape != (len(data),):
                raise self._error(
                    f"{path}: {len(data)} images but {self.label_key!r} has shape "
                    f"{batch_labels.shape}; the file is damaged"
                )
            pixels.append(data)
            labels.append(batch_labels)

        # Rows hold three colour planes: (n, 3, 32, 32) channels-first to (n, 32, 32, 3).
        planes = np.concatenate(pixels).reshape(-1, 3, _SIDE, _SIDE)
        images = np.ascontiguousarray(planes.transpose(0, 2, 3, 1))
        return SourceSplit(
            images=images,
            labels=np.concatenate(labels),
            class_names=class_names,
            item_ids=np.arange(len(images), dtype=np.int64),
        )

    def _load(self, path: Path) -> dict[str, Any]:
        try:
            # latin1 reads the original Python 2 pickles; the keys are bytes or str.
            content = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as exc:
            raise self._error(
                f"{path} cannot be read as a CIFAR pickle ({exc}); unpack the archive again"
            ) from exc
        if not isinstance(content, dict):
            raise self._error(f"{path} contains a {type(content).__name__}, not a CIFAR batch dict")
        return {_text(key): value for key, value in content.items()}

    def _entry(self, content: dict[str, Any], path: Path, key: str) -> Any:
        if key not in content:
            raise self._error(f"{path} has no {key!r} entry (it has {sorted(content)})")
        return content[key]

    def _error(self, message: str) -> DatasetError:
        return DatasetError(
            f"dataset {self.reference!r}: {message}", field="dataset", value=self.reference
        )


def _find_batches_folder(root: Path) -> Path:
    """``root`` itself, or the folder the CIFAR archive unpacks to when it sits inside."""
    if (root / "batches.meta").is_file() or (root / "meta").is_file():
        return root
    for name in _DOWNLOAD_FOLDERS:
        if (root / name).is_dir():
            return root / name
    return root


def _text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)
