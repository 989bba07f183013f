"""Images and labels stored as arrays in a numpy ``.npz`` file.

Array names: ``images`` (or ``x``) and ``labels`` (or ``y``) form the split ``"all"``; the same
names with a ``<split>_`` prefix (``train_images``, ``test_y``, ...) form that split. An
optional ``class_names`` array of strings names the label values.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from workers.datasets.images import normalise_images
from workers.datasets.paths import FileStamp, stamp_files
from workers.datasets.source import SourceSplit
from workers.errors import DatasetError

__all__ = ["NpzSource"]

_IMAGE_NAMES = ("images", "x")
_LABEL_NAMES = ("labels", "y")
_UNPREFIXED_SPLIT = "all"
_HOW_TO_WRITE = (
    "write it with numpy.savez(path, images=images, labels=labels), where images has shape "
    "(n_items, H, W) or (n_items, H, W, C) with C = 1, 3 or 4 and labels contains one integer "
    "per image"
)


class NpzSource:
    """Splits of one ``.npz`` file."""

    kind = "npz"

    def __init__(self, reference: str, path: Path) -> None:
        self.reference = reference
        self.path = path
        self._check_archive()
        try:
            with np.load(path, allow_pickle=False) as archive:
                self.array_names = list(archive.files)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise self._error(f"{path} cannot be read ({exc}); {_HOW_TO_WRITE}") from exc
        self.image_arrays = self._find_image_arrays()

    def split_names(self) -> list[str]:
        return list(self.image_arrays)

    def stamp(self) -> tuple[FileStamp, ...]:
        return stamp_files([self.path])

    def read(self, split: str) -> SourceSplit:
        image_name, prefix = self.image_arrays[split]
        label_name = next(
            (prefix + n for n in _LABEL_NAMES if prefix + n in self.array_names), None
        )
        if label_name is None:
            expected_names = " or ".join(repr(prefix + n) for n in _LABEL_NAMES)
            raise self._error(
                f"{self.path} has images in {image_name!r} but no labels: add an array named "
                f"{expected_names} with one integer label per image"
            )

        with np.load(self.path, allow_pickle=False) as archive:
            raw_images = self._array(archive, image_name)
            labels = self._array(archive, label_name)
            class_names = self._class_names(archive)

        if labels.ndim != 1 or len(labels) != len(raw_images):
            raise self._error(
                f"{self.path}: {label_name!r} has shape {labels.shape} but {image_name!r} contains "
                f"{len(raw_images)} images; store one label per image in a 1-D array"
            )
        # Items are named "npz:/x.npz[17]" in unprefixed arrays, else "npz:/x.npz[train_x][17]".
        where = f"{self.reference}[{image_name}]" if prefix else self.reference
        images = normalise_images(raw_images, where=where, item_name=lambda i: f"{where}[{i}]")
        return SourceSplit(
            images=images,
            labels=labels,
            class_names=class_names,
            item_ids=np.arange(len(images), dtype=np.int64),
        )

    def _check_archive(self) -> None:
        """Raise `DatasetError` unless the file is a zip archive, as numpy.savez writes."""
        # np.load reads anything that is neither a zip archive nor a .npy file as a pickle,
        # and its error for that points at allow_pickle, which would load untrusted code.
        try:
            with self.path.open("rb") as handle:
                is_archive = zipfile.is_zipfile(handle)
        except OSError as exc:
            raise self._error(f"{self.path} cannot be read ({exc.strerror})") from exc
        if not is_archive:
            raise self._error(f"{self.path} is not a valid .npz (zip) archive; {_HOW_TO_WRITE}")

    def _find_image_arrays(self) -> dict[str, tuple[str, str]]:
        """Split name -> (name of its image array, prefix of its array names)."""
        found: dict[str, tuple[str, str]] = {}
        # "images" is looked at last so that it wins over "x" when a split has both.
        for image_name in reversed(_IMAGE_NAMES):
            for name in self.array_names:
                if name == image_name:
                    found[_UNPREFIXED_SPLIT] = (name, "")
                elif name.endswith(f"_{image_name}") and len(name) > len(image_name) + 1:
                    prefix = name[: -len(image_name)]
                    found[prefix[:-1]] = (name, prefix)
        if not found:
            raise self._error(
                f"{self.path} contains the arrays {self.array_names} but no images: name the image "
                "array 'images' or 'x' (or 'train_images', 'test_images', ... for splits)"
            )
        return found

    def _array(self, archive: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
        try:
            return archive[name]
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise self._error(
                f"{self.path}: array {name!r} cannot be read ({exc}); store plain numeric "
                "arrays (no object arrays) with numpy.savez"
            ) from exc

    def _class_names(self, archive: np.lib.npyio.NpzFile) -> list[str] | None:
        if "class_names" not in self.array_names:
            return None
        names = self._array(archive, "class_names")
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise self._error(
                f"{self.path}: 'class_names' has dtype {names.dtype} and shape {names.shape}; "
                "store it as a 1-D array of strings"
            )
        return [str(name) for name in names.tolist()]

    def _error(self, message: str) -> DatasetError:
        return DatasetError(
            f"dataset {self.reference!r}: {message}", field="dataset", value=self.reference
        )
