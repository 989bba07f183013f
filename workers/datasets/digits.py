"""scikit-learn's 8x8 handwritten digits, read from the CSV file scikit-learn ships.

The file is located through the import system without importing scikit-learn, which would
cost seconds and pull in scipy.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from workers.datasets.paths import FileStamp, stamp_files
from workers.datasets.source import SourceSplit
from workers.datasets.split import select_stratified
from workers.errors import DatasetError

__all__ = ["DIGITS_SPLIT_SIZES", "DigitsSource", "find_digits_csv"]

# The train/test split is part of every digits fingerprint: these numbers must never change.
DIGITS_N_ITEMS = 1797
DIGITS_TEST_SIZE = 500
DIGITS_SPLIT_SEED = 0
DIGITS_SPLIT_SIZES = {
    "train": DIGITS_N_ITEMS - DIGITS_TEST_SIZE,
    "test": DIGITS_TEST_SIZE,
    "all": DIGITS_N_ITEMS,
}
DIGITS_CLASS_NAMES = [str(digit) for digit in range(10)]

# Pixel values in the file count dark cells of a 4x4 block, 0..16; round(v * 255 / 16).
_PIXEL_TABLE = np.floor(np.arange(17) * 255 / 16 + 0.5).astype(np.uint8)


def find_digits_csv() -> Path | None:
    """Path of scikit-learn's ``digits.csv.gz``, or None when scikit-learn is not installed."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location, "datasets", "data", "digits.csv.gz")
        if path.is_file():
            return path
    return None


class DigitsSource:
    """The digits as 8x8 RGB images, with a fixed stratified 1297/500 train/test split."""

    kind = "digits"

    def __init__(self, reference: str) -> None:
        path = find_digits_csv()
        if path is None:
            raise DatasetError(
                f"dataset {reference!r} needs scikit-learn's bundled digits.csv.gz, and "
                "scikit-learn is not installed here; install scikit-learn or use another dataset",
                field="dataset",
                value=reference,
            )
        self.reference = reference
        self.path = path

    def split_names(self) -> list[str]:
        return list(DIGITS_SPLIT_SIZES)

    def stamp(self) -> tuple[FileStamp, ...]:
        return stamp_files([self.path])

    def read(self, split: str) -> SourceSplit:
        with gzip.open(self.path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
        if not _is_digits_table(table):
            raise DatasetError(
                f"dataset {self.reference!r}: {self.path} is not the digits table "
                f"({DIGITS_N_ITEMS} rows of 64 pixel values 0..16 and a label); "
                "reinstall scikit-learn",
                field="dataset",
                value=self.reference,
            )
        pixels, labels = table[:, :64], table[:, 64]
        images = np.repeat(_PIXEL_TABLE[pixels].reshape(-1, 8, 8, 1), 3, axis=-1)

        test_ids = select_stratified(labels, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)
        if split == "test":
            item_ids = test_ids
        elif split == "train":
            item_ids = np.setdiff1d(np.arange(DIGITS_N_ITEMS), test_ids)
        else:
            item_ids = np.arange(DIGITS_N_ITEMS)
        return SourceSplit(
            images=np.ascontiguousarray(images[item_ids]),
            labels=labels[item_ids],
            class_names=list(DIGITS_CLASS_NAMES),
            item_ids=item_ids.astype(np.int64),
            ids_span_splits=True,  # every split is a subset of the one table
        )


def _is_digits_table(table: np.ndarray) -> bool:
    if table.shape != (DIGITS_N_ITEMS, 65):
        return False
    pixels = table[:, :64]
    return bool(pixels.min() >= 0 and pixels.max() <= 16)
