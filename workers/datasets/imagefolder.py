"""A folder of image files with one sub-folder per class.

Layouts: ``root/<class>/<file>`` is the split ``"all"``; ``root/train/<class>/<file>`` together
with ``root/test/<class>/<file>`` are the splits ``"train"`` and ``"test"``. Class names are the
sorted names of the class folders (the union over both splits, so a label means the same class
in each). Files may sit in nested folders below their class folder. Hidden files and files
whose extension Pillow cannot open are skipped; every other file must decode.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from workers.datasets.images import stack_images, to_rgb_uint8
from workers.datasets.paths import FileStamp, check_allowed, stamp_files
from workers.datasets.source import SourceSplit
from workers.errors import DatasetError

__all__ = ["ImageFolderSource"]

logger = logging.getLogger(__name__)

_SPLIT_FOLDERS = ("train", "test")
# Decoding threads: Pillow's decoders release the GIL, so threads overlap file reads and decoding.
_DECODE_THREADS = min(8, os.cpu_count() or 1)


class ImageFolderSource:
    """Splits of one image folder."""

    kind = "imagefolder"

    def __init__(self, reference: str, root: Path, *, allowed_roots: Sequence[Path] | None) -> None:
        if not root.is_dir():
            raise DatasetError(
                f"dataset {reference!r}: {root} is not a folder; an image folder contains one "
                "sub-folder of images per class",
                field="dataset",
                value=reference,
            )
        self.reference = reference
        self.root = root
        self.allowed_roots = allowed_roots
        if all((root / name).is_dir() for name in _SPLIT_FOLDERS):
            self.split_roots = {name: root / name for name in _SPLIT_FOLDERS}
        else:
            self.split_roots = {"all": root}
        self.class_names = sorted(
            {path.name for folder in self.split_roots.values() for path in _subfolders(folder)}
        )
        if not self.class_names:
            raise DatasetError(
                f"dataset {reference!r}: {root} has no class sub-folders; put each class's "
                "images in a folder of their own (root/<class>/<image>, optionally under "
                "root/train/ and root/test/)",
                field="dataset",
                value=reference,
            )
        self._files: dict[str, list[tuple[Path, int]]] = {}

    def split_names(self) -> list[str]:
        return list(self.split_roots)

    def stamp(self) -> tuple[FileStamp, ...]:
        return stamp_files(path for split in self.split_roots for path, _ in self.files(split))

    def files(self, split: str) -> list[tuple[Path, int]]:
        """``(path, label)`` of every image file of a split, sorted by class then path."""
        if split not in self._files:
            listed: list[tuple[Path, int]] = []
            split_root = self.split_roots[split]
            for label, class_name in enumerate(self.class_names):
                class_root = split_root / class_name
                if class_root.is_dir():
                    listed.extend((path, label) for path in _image_files(class_root))
            self._files[split] = listed
        return self._files[split]

    def read(self, split: str) -> SourceSplit:
        files = self.files(split)
        if not files:
            raise DatasetError(
                f"dataset {self.reference!r}: split {split!r} has no image files under "
                f"{self.split_roots[split]}; add images in the class folders",
                field="dataset",
                value=self.reference,
            )
        for path, _ in files:
            check_allowed(path, reference=self.reference, allowed_roots=self.allowed_roots)

        with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool:
            decoded = pool.map(self._decode, [path for path, _ in files])
            try:
                images = stack_images(self._named(files, decoded), len(files), where=self.reference)
            finally:
                pool.shutdown(cancel_futures=True)
        return SourceSplit(
            images=images,
            labels=np.array([label for _, label in files], dtype=np.int64),
            class_names=list(self.class_names),
            item_ids=np.arange(len(files), dtype=np.int64),
        )

    def _named(
        self, files: list[tuple[Path, int]], decoded: Iterator[np.ndarray]
    ) -> Iterator[tuple[str, np.ndarray]]:
        for (path, _), image in zip(files, decoded, strict=True):
            yield self._name(path), image

    def _name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _decode(self, path: Path) -> np.ndarray:
        name = self._name(path)
        try:
            with Image.open(path) as image:
                image.load()
                return to_rgb_uint8(image, item=name)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(
                f"dataset {self.reference!r}: {name} cannot be decoded ({exc}); replace or "
                "remove the file",
                field="dataset",
                value=self.reference,
            ) from exc


def _subfolders(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")]


def _image_files(class_root: Path) -> list[Path]:
    """Readable image files below ``class_root``, hidden ones skipped, in sorted order."""
    extensions = _readable_extensions()
    found = []
    skipped = 0
    for folder, dirnames, filenames in os.walk(class_root):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(folder, name))
            else:
                skipped += 1
    if skipped:
        logger.debug("%s: %d files without an image extension skipped", class_root, skipped)
    return found


@functools.cache
def _readable_extensions() -> frozenset[str]:
    """File extensions of the formats Pillow can open (not those it can only write)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
