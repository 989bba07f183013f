"""Tests of the dataset sources: references, splits, normalisation, fingerprints and the cache.

The builders at the top write tiny datasets in each source's real on-disk format.
"""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from workers.datasets import (
    DatasetError,
    DatasetSplit,
    PathNotAllowedError,
    clear_cache,
    list_datasets,
    load_split,
    to_rgb_uint8,
)
from workers.datasets.digits import find_digits_csv
from workers.datasets.split import select_stratified
from workers.errors import ModelError, ProbeError, WorkersError

REPO_ROOT = Path(__file__).resolve().parents[2]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]


# ---- builders of test data ------------------------------------------------------------------


def random_images(n: int, size: int = 6, seed: int = 0) -> np.ndarray:
    """Array of shape (n, size, size, 3) uint8 with seeded random pixels."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def balanced_labels(n: int, n_classes: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % n_classes


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_image_folder(
    root: Path, classes: dict[str, int], *, size: int = 6, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write ``count`` PNG files per class under ``root/<class>/``; return pixels by file name."""
    written = {}
    rng = np.random.default_rng(seed)
    for class_name, count in classes.items():
        for index in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            relative = f"{class_name}/{index:03d}.png"
            write_png(root / relative, pixels)
            written[relative] = pixels
    return written


def dump_pickle(path: Path, content: dict[bytes, Any]) -> None:
    path.write_bytes(pickle.dumps(content, protocol=2))


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) images as CIFAR rows: (n, 3072), the R, G and B planes in turn."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def write_cifar10(root: Path, per_batch: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A CIFAR-10 python directory with 5 training batches and a test batch of ``per_batch``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(10)
    dump_pickle(
        root / "batches.meta",
        {b"label_names": [name.encode() for name in CIFAR10_CLASSES], b"num_vis": 3072},
    )
    expected: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    names = [f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]
    for name in names:
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = balanced_labels(per_batch, len(CIFAR10_CLASSES))
        dump_pickle(
            root / name,
            {
                b"batch_label": name.encode(),
                b"data": cifar_rows(images),
                b"labels": labels.tolist(),
            },
        )
        expected["test" if name == "test_batch" else "train"].append((images, labels))
    return {
        split: (np.concatenate([i for i, _ in parts]), np.concatenate([y for _, y in parts]))
        for split, parts in expected.items()
    }


def write_cifar100(root: Path, n_items: int = 12) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(100)
    dump_pickle(
        root / "meta",
        {
            b"fine_label_names": [b"apple", b"bee", b"cup", b"dolphin"],
            b"coarse_label_names": [b"food", b"animal"],
        },
    )
    fine = balanced_labels(n_items, 4)
    coarse = np.array([0, 1, 0, 1])[fine]
    images = rng.integers(0, 256, (n_items, 32, 32, 3), dtype=np.uint8)
    for name in ("train", "test"):
        dump_pickle(
            root / name,
            {
                b"data": cifar_rows(images),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": coarse.tolist(),
            },
        )
    return {"images": images, "fine": fine, "coarse": coarse}


def save_hf_dataset(path: Path, splits: dict[str, int] | None, *, seed: int = 0) -> Any:
    """A save_to_disk folder: a DatasetDict of the given split sizes, or one Dataset (None)."""
    datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets package is absent")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["cat", "dog", "emu"]),
        }
    )

    def table(n: int, offset: int) -> Any:
        images = random_images(n, size=5, seed=seed + offset)
        return datasets.Dataset.from_dict(
            {
                "image": [Image.fromarray(image) for image in images],
                "caption": [f"item {i}" for i in range(n)],
                "label": balanced_labels(n, 3).tolist(),
            },
            features=features,
        )

    datasets.disable_progress_bars()
    if splits is None:
        loaded = table(9, 0)
    else:
        loaded = datasets.DatasetDict(
            {name: table(n, offset) for offset, (name, n) in enumerate(splits.items())}
        )
    loaded.save_to_disk(str(path))
    return loaded


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    clear_cache()


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    return write_npz(tmp_path / "tiny.npz", images=random_images(12), labels=balanced_labels(12, 3))


# ---- errors ---------------------------------------------------------------------------------


def test_workers_error_carries_field_and_value() -> None:
    error = DatasetError("split 'val' does not exist", field="split", value="val")
    assert error.message == "split 'val' does not exist"
    assert error.field == "split"
    assert error.value == "val"
    assert str(error) == "split 'val' does not exist"


def test_workers_error_subclasses_share_the_base() -> None:
    for error_class in (DatasetError, ModelError, ProbeError, PathNotAllowedError):
        assert issubclass(error_class, WorkersError)
    assert WorkersError("x").field is None


# ---- the package stays light ----------------------------------------------------------------


def test_import_skips_torch_sklearn_datasets() -> None:
    code = (
        "import sys\n"
        "from workers.datasets import load_split, list_datasets\n"
        "load_split('digits', 'test'); list_datasets()\n"
        "print(sorted(m for m in ('torch', 'sklearn', 'datasets', 'scipy') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# ---- digits ---------------------------------------------------------------------------------


def test_digits_split_sizes_are_pinned() -> None:
    assert load_split("digits", "train").n_items == 1297
    assert load_split("digits", "test").n_items == 500
    assert load_split("digits", "all").n_items == 1797


def test_digits_test_split_is_pinned() -> None:
    test = load_split("digits", "test")
    assert test.item_ids[:10].tolist() == [1, 2, 3, 11, 13, 15, 20, 21, 32, 46]
    assert test.item_ids[-3:].tolist() == [1790, 1794, 1795]
    assert np.bincount(test.labels).tolist() == [50, 51, 49, 51, 50, 51, 50, 50, 48, 50]
    assert test.fingerprint == "1b92f4c9ad2509109cea71fb1f95e5d110685514aa79c379376890c04f89ad4a"


def test_digits_train_split_is_pinned() -> None:
    train = load_split("digits", "train")
    assert train.item_ids[:10].tolist() == [0, 4, 5, 6, 7, 8, 9, 10, 12, 14]
    assert train.fingerprint == "556305e374cba1adddc94fe30710bdb05e04eae6a787d1936ef1201eb315745d"


def test_digits_train_and_test_partition_all() -> None:
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert np.intersect1d(train.item_ids, test.item_ids).size == 0
    assert np.union1d(train.item_ids, test.item_ids).tolist() == list(range(1797))


def test_digits_pixels_are_scaled_from_the_csv() -> None:
    path = find_digits_csv()
    assert path is not None
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    everything = load_split("digits", "all")
    expected = np.floor(table[:, :64] * 255 / 16 + 0.5).astype(np.uint8).reshape(-1, 8, 8)
    assert everything.images.shape == (1797, 8, 8, 3)
    assert np.array_equal(everything.images[..., 0], expected)
    assert np.array_equal(everything.images[..., 2], expected)
    assert np.array_equal(everything.labels, table[:, 64])
    assert everything.item_ids.tolist() == list(range(1797))


def test_digits_pixel_value_eight_rounds_half_up() -> None:
    images = load_split("digits", "all").images
    assert set(np.unique(images).tolist()) == {round(v * 255 / 16 + 1e-9) for v in range(17)}
    assert 128 in np.unique(images)


def test_digits_split_has_the_declared_types() -> None:
    test = load_split("digits", "test")
    assert isinstance(test, DatasetSplit)
    assert test.dataset == "digits"
    assert test.split == "test"
    assert test.images.dtype == np.uint8
    assert test.images.flags.c_contiguous
    assert test.labels.dtype == np.int64
    assert test.item_ids.dtype == np.int64
    assert test.class_names == [str(digit) for digit in range(10)]
    assert len(test.fingerprint) == 64


def test_digits_rejects_columns() -> None:
    with pytest.raises(DatasetError, match="does not apply") as caught:
        load_split("digits", "train", label_column="label")
    assert caught.value.field == "label_column"


# ---- subsets --------------------------------------------------------------------------------


def test_limit_takes_a_stratified_sorted_subset() -> None:
    subset = load_split("digits", "train", limit=100, seed=3)
    assert subset.n_items == 100
    assert np.bincount(subset.labels).tolist() == [10] * 10
    assert np.all(np.diff(subset.item_ids) > 0)


def test_limit_subset_is_repeatable_and_seeded() -> None:
    first = load_split("digits", "train", limit=50, seed=1)
    clear_cache()
    again = load_split("digits", "train", limit=50, seed=1)
    other = load_split("digits", "train", limit=50, seed=2)
    assert np.array_equal(first.item_ids, again.item_ids)
    assert first.fingerprint == again.fingerprint
    assert not np.array_equal(first.item_ids, other.item_ids)
    assert first.fingerprint != other.fingerprint


def test_limit_subset_items_match_the_whole_split() -> None:
    whole = load_split("digits", "test")
    subset = load_split("digits", "test", limit=40, seed=0)
    positions = np.searchsorted(whole.item_ids, subset.item_ids)
    assert np.array_equal(whole.images[positions], subset.images)
    assert np.array_equal(whole.labels[positions], subset.labels)


def test_limit_above_size_gives_whole_split() -> None:
    whole = load_split("digits", "test")
    assert load_split("digits", "test", limit=500, seed=7).fingerprint == whole.fingerprint
    assert load_split("digits", "test", limit=10_000).fingerprint == whole.fingerprint


def test_seed_does_not_change_a_whole_split() -> None:
    assert (
        load_split("digits", "test", seed=5).fingerprint == load_split("digits", "test").fingerprint
    )


@pytest.mark.parametrize("limit", [0, -3, True, 2.5, "10"])
def test_limit_must_be_a_positive_integer(limit: object) -> None:
    with pytest.raises(DatasetError, match="limit must be") as caught:
        load_split("digits", "test", limit=limit)  # type: ignore[arg-type]
    assert caught.value.field == "limit"
    assert caught.value.value == limit


def test_seed_must_be_a_non_negative_integer() -> None:
    with pytest.raises(DatasetError, match="seed must be") as caught:
        load_split("digits", "test", limit=10, seed=-1)
    assert caught.value.field == "seed"


def test_limit_of_one_item_is_one_class_only() -> None:
    with pytest.raises(DatasetError, match="one class only.*raise the limit") as caught:
        load_split("digits", "test", limit=1)
    assert caught.value.field == "limit"


def test_select_stratified_gives_every_class_one_item_first() -> None:
    labels = np.array([0] * 98 + [1, 2])
    chosen = select_stratified(labels, 4, seed=0)
    assert sorted(labels[chosen].tolist()) == [0, 0, 1, 2]


def test_select_stratified_fewer_than_classes() -> None:
    labels = np.array([0] * 5 + [1] * 9 + [2] * 7)
    chosen = select_stratified(labels, 2, seed=0)
    assert sorted(labels[chosen].tolist()) == [1, 2]


def test_select_stratified_keeps_the_class_balance() -> None:
    labels = np.array([0] * 300 + [1] * 100)
    chosen = select_stratified(labels, 40, seed=4)
    assert np.bincount(labels[chosen]).tolist() == [30, 10]


# ---- npz ------------------------------------------------------------------------------------


def test_npz_unprefixed_arrays_are_the_split_all(tmp_path: Path) -> None:
    images, labels = random_images(12), balanced_labels(12, 3)
    path = write_npz(tmp_path / "d.npz", images=images, labels=labels)
    loaded = load_split(f"npz:{path}", "all")
    assert np.array_equal(loaded.images, images)
    assert np.array_equal(loaded.labels, labels)
    assert loaded.class_names == ["0", "1", "2"]
    assert loaded.item_ids.tolist() == list(range(12))


def test_npz_prefixed_arrays_are_splits(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "d.npz",
        train_x=random_images(8, seed=1),
        train_y=balanced_labels(8, 2),
        test_images=random_images(4, seed=2),
        test_labels=balanced_labels(4, 2),
    )
    assert load_split(f"npz:{path}", "train").n_items == 8
    assert np.array_equal(load_split(f"npz:{path}", "test").images, random_images(4, seed=2))


def test_npz_class_names_array_names_the_labels(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "d.npz",
        x=random_images(4),
        y=balanced_labels(4, 2),
        class_names=np.array(["circle", "square"]),
    )
    assert load_split(f"npz:{path}", "all").class_names == ["circle", "square"]


def test_npz_greyscale_float_images_become_rgb(tmp_path: Path) -> None:
    grey = random_images(6)[..., 0]
    path = write_npz(tmp_path / "d.npz", images=grey / 255.0, labels=balanced_labels(6, 2))
    loaded = load_split(f"npz:{path}", "all")
    assert loaded.images.shape == (6, 6, 6, 3)
    assert np.array_equal(loaded.images[..., 1], grey)


def test_npz_nan_pixel_is_rejected_naming_the_item(tmp_path: Path) -> None:
    images = random_images(20) / 255.0
    images[17, 2, 3, 1] = np.nan
    path = write_npz(tmp_path / "d.npz", images=images, labels=balanced_labels(20, 2))
    with pytest.raises(DatasetError, match=rf"npz:{path}\[17\] contains NaN or infinite"):
        load_split(f"npz:{path}", "all")


def test_npz_infinite_pixel_names_array_and_item(tmp_path: Path) -> None:
    images = random_images(5) / 255.0
    images[3, 0, 0, 0] = np.inf
    path = write_npz(tmp_path / "d.npz", train_images=images, train_labels=balanced_labels(5, 2))
    with pytest.raises(DatasetError, match=r"\[train_images\]\[3\] contains NaN or infinite"):
        load_split(f"npz:{path}", "train")


def test_npz_without_labels_is_rejected(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", images=random_images(4))
    with pytest.raises(DatasetError, match="no labels: add an array named 'labels' or 'y'"):
        load_split(f"npz:{path}", "all")


def test_npz_without_images_lists_its_arrays(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", pixels=random_images(4), labels=balanced_labels(4, 2))
    with pytest.raises(DatasetError, match=r"arrays \['pixels', 'labels'\] but no images"):
        load_split(f"npz:{path}", "all")


def test_npz_missing_split_lists_the_available_ones(tmp_path: Path, tiny_npz: Path) -> None:
    with pytest.raises(DatasetError, match="available splits: all") as caught:
        load_split(f"npz:{tiny_npz}", "train")
    assert caught.value.field == "split"
    assert caught.value.value == "train"


def test_npz_label_count_must_match(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", images=random_images(4), labels=balanced_labels(3, 2))
    with pytest.raises(DatasetError, match="one label per image"):
        load_split(f"npz:{path}", "all")


def test_npz_file_not_a_zip_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(DatasetError, match=r"not a valid \.npz \(zip\) archive") as caught:
        load_split(f"npz:{path}", "all")
    assert "numpy.savez(path, images=images, labels=labels)" in caught.value.message
    assert "pickle" not in caught.value.message
    assert caught.value.field == "dataset"


def test_npz_named_npy_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "single.npz"
    with path.open("wb") as handle:
        np.save(handle, random_images(4))
    with pytest.raises(DatasetError, match=r"not a valid \.npz \(zip\) archive"):
        load_split(f"npz:{path}", "all")


def test_npz_directory_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "folder.npz"
    path.mkdir()
    with pytest.raises(DatasetError, match="cannot be read"):
        load_split(f"npz:{path}", "all")


def test_npz_object_arrays_are_rejected(tmp_path: Path) -> None:
    images = np.empty(4, dtype=object)
    images[:] = [random_images(1)[0]] * 4
    path = write_npz(tmp_path / "d.npz", images=images, labels=balanced_labels(4, 2))
    with pytest.raises(DatasetError, match="no object arrays"):
        load_split(f"npz:{path}", "all")


def test_npz_empty_dataset_is_rejected(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "d.npz", images=np.zeros((0, 4, 4, 3), np.uint8), labels=np.zeros(0, np.int64)
    )
    with pytest.raises(DatasetError, match="has no items"):
        load_split(f"npz:{path}", "all")


def test_npz_one_class_only_is_rejected(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", images=random_images(4), labels=np.zeros(4, np.int64))
    with pytest.raises(DatasetError, match=r"one class only \('0'\)"):
        load_split(f"npz:{path}", "all")


def test_npz_negative_label_is_rejected_as_unlabelled(tmp_path: Path) -> None:
    labels = balanced_labels(4, 2)
    labels[2] = -1
    path = write_npz(tmp_path / "d.npz", images=random_images(4), labels=labels)
    with pytest.raises(DatasetError, match="item 2 .* has the label -1 \\(unlabelled\\)"):
        load_split(f"npz:{path}", "all")


def test_npz_label_far_above_class_count_rejected(tmp_path: Path) -> None:
    labels = balanced_labels(4, 2)
    labels[1] = 10**12
    path = write_npz(tmp_path / "d.npz", images=random_images(4), labels=labels)
    with pytest.raises(
        DatasetError, match=r"item 1 .* has the label 1000000000000, but the largest allowed"
    ):
        load_split(f"npz:{path}", "all")


def test_npz_uint64_label_above_int64_rejected(tmp_path: Path) -> None:
    labels = balanced_labels(4, 2).astype(np.uint64)
    labels[2] = 2**63 + 5
    path = write_npz(tmp_path / "d.npz", images=random_images(4), labels=labels)
    with pytest.raises(
        DatasetError, match=r"item 2 .* has the label 9223372036854775813, too large"
    ):
        load_split(f"npz:{path}", "all")


def test_npz_fractional_label_is_rejected(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", images=random_images(3), labels=np.array([0.0, 1.0, 1.5]))
    with pytest.raises(DatasetError, match="item 2 .* not an integer"):
        load_split(f"npz:{path}", "all")


@pytest.mark.parametrize(("label", "shown"), [(0.5, "0.5"), (np.nan, "nan"), (np.inf, "inf")])
def test_npz_non_integer_label_shown_plainly(tmp_path: Path, label: float, shown: str) -> None:
    labels = np.array([0.0, 1.0, label])
    path = write_npz(tmp_path / "d.npz", images=random_images(3), labels=labels)
    with pytest.raises(DatasetError) as caught:
        load_split(f"npz:{path}", "all")
    assert caught.value.message.startswith("item 2 of split 'all'")
    assert f"has the label {shown}, not an integer" in caught.value.message
    assert "np." not in caught.value.message


def test_npz_label_at_class_limit_names_largest(tmp_path: Path) -> None:
    labels = balanced_labels(4, 2)
    labels[3] = 100_000
    path = write_npz(tmp_path / "d.npz", images=random_images(4), labels=labels)
    with pytest.raises(DatasetError) as caught:
        load_split(f"npz:{path}", "all")
    assert "item 3 " in caught.value.message
    assert "has the label 100000" in caught.value.message
    assert "the largest allowed label is 99999" in caught.value.message
    assert "above the limit" not in caught.value.message


def test_npz_label_below_class_limit_accepted(tmp_path: Path) -> None:
    labels = balanced_labels(4, 2)
    labels[3] = 99_999
    path = write_npz(tmp_path / "d.npz", images=random_images(4), labels=labels)
    loaded = load_split(f"npz:{path}", "all")
    assert loaded.labels.max() == 99_999
    assert len(loaded.class_names) == 100_000


@pytest.mark.parametrize(("field", "value"), [("limit", np.int64(0)), ("seed", np.int64(-1))])
def test_numpy_limit_or_seed_shown_plainly(field: str, value: np.int64) -> None:
    with pytest.raises(DatasetError) as caught:
        load_split("digits", "train", **{field: value})
    assert caught.value.field == field
    assert caught.value.message.endswith(f"got {int(value)}")
    assert "np." not in caught.value.message


def test_npz_label_beyond_the_class_names_is_rejected(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "d.npz",
        images=random_images(3),
        labels=np.array([0, 1, 2]),
        class_names=np.array(["a", "b"]),
    )
    with pytest.raises(DatasetError, match="item 2 .* label 2 but there are 2 class names"):
        load_split(f"npz:{path}", "all")


def test_npz_rejects_column_arguments(tiny_npz: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        load_split(f"npz:{tiny_npz}", "all", image_column="img")
    assert caught.value.field == "image_column"


# ---- image folders --------------------------------------------------------------------------


def test_imagefolder_reads_classes_from_sorted_folder_names(tmp_path: Path) -> None:
    written = write_image_folder(tmp_path / "pets", {"dog": 2, "cat": 3})
    loaded = load_split(f"imagefolder:{tmp_path / 'pets'}", "all")
    assert loaded.class_names == ["cat", "dog"]
    assert loaded.labels.tolist() == [0, 0, 0, 1, 1]
    assert loaded.item_ids.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(loaded.images[0], written["cat/000.png"])
    assert np.array_equal(loaded.images[4], written["dog/001.png"])


def test_imagefolder_train_and_test_folders_are_splits(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets" / "train", {"cat": 2, "dog": 2, "emu": 1})
    write_image_folder(tmp_path / "pets" / "test", {"cat": 1, "emu": 1}, seed=1)
    reference = f"imagefolder:{tmp_path / 'pets'}"
    test = load_split(reference, "test")
    assert test.class_names == ["cat", "dog", "emu"]
    assert test.labels.tolist() == [0, 2]
    assert load_split(reference, "train").n_items == 5
    with pytest.raises(DatasetError, match="available splits: train, test"):
        load_split(reference, "all")


def test_imagefolder_skips_hidden_and_non_image_files(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    write_image_folder(root, {"cat": 1, "dog": 1})
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".cache").mkdir()
    assert load_split(f"imagefolder:{root}", "all").n_items == 2


def test_imagefolder_reads_nested_folders_and_other_formats(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    write_image_folder(root, {"cat": 1, "dog": 1})
    grey = np.full((6, 6), 90, dtype=np.uint8)
    Image.fromarray(grey).save(root / "dog" / "grey.bmp")
    (root / "cat" / "more").mkdir()
    rgba = np.zeros((6, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(root / "cat" / "more" / "clear.png")
    loaded = load_split(f"imagefolder:{root}", "all")
    assert loaded.n_items == 4
    assert np.all(loaded.images[1] == 255)  # cat/more/clear.png: transparent becomes white
    assert np.all(loaded.images[3] == 90)  # dog/grey.bmp


def test_imagefolder_corrupt_file_is_named(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    write_image_folder(root, {"cat": 2, "dog": 2})
    (root / "dog" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match="dog/001.png cannot be decoded"):
        load_split(f"imagefolder:{root}", "all")


def test_imagefolder_truncated_file_is_named(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    write_image_folder(root, {"cat": 2, "dog": 1}, size=64)
    path = root / "cat" / "001.png"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DatasetError, match="cat/001.png cannot be decoded"):
        load_split(f"imagefolder:{root}", "all")


def test_imagefolder_mixed_sizes_are_rejected_with_both_sizes(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    write_image_folder(root, {"cat": 2})
    write_png(root / "dog" / "big.png", np.zeros((8, 10, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"cat/000.png is 6x6 but dog/big.png is 10x8") as caught:
        load_split(f"imagefolder:{root}", "all")
    assert "resize them all to one size" in caught.value.message


def test_imagefolder_without_class_folders_is_rejected(tmp_path: Path) -> None:
    write_png(tmp_path / "flat" / "a.png", random_images(1)[0])
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_split(f"imagefolder:{tmp_path / 'flat'}", "all")


def test_imagefolder_with_no_images_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "pets" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no image files"):
        load_split(f"imagefolder:{tmp_path / 'pets'}", "all")


# ---- CIFAR ----------------------------------------------------------------------------------


def test_cifar10_directory_gives_train_and_test(tmp_path: Path) -> None:
    expected = write_cifar10(tmp_path / "cifar-10-batches-py")
    reference = f"cifar:{tmp_path / 'cifar-10-batches-py'}"
    train, test = load_split(reference, "train"), load_split(reference, "test")
    assert train.n_items == 100
    assert test.n_items == 20
    assert train.class_names == CIFAR10_CLASSES
    assert np.array_equal(train.images, expected["train"][0])
    assert np.array_equal(train.labels, expected["train"][1])
    assert train.item_ids.tolist() == list(range(100))
    assert np.array_equal(test.images, expected["test"][0])


def test_cifar_rows_are_read_as_colour_planes(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "c10")
    with open(tmp_path / "c10" / "data_batch_1", "rb") as handle:
        row = pickle.load(handle)[b"data"][0]
    image = load_split(f"cifar:{tmp_path / 'c10'}", "train").images[0]
    assert image[0, 1, 0] == row[1]  # red plane, row 0, column 1
    assert image[2, 0, 1] == row[1024 + 64]  # green plane, row 2, column 0
    assert image[31, 31, 2] == row[3071]  # blue plane, last pixel


def test_cifar_parent_of_the_unpacked_folder_is_accepted(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py")
    assert load_split(f"cifar:{tmp_path}", "test").n_items == 20


def test_cifar100_uses_fine_labels_and_names(tmp_path: Path) -> None:
    expected = write_cifar100(tmp_path / "cifar-100-python")
    loaded = load_split(f"cifar:{tmp_path / 'cifar-100-python'}", "train")
    assert loaded.class_names == ["apple", "bee", "cup", "dolphin"]
    assert np.array_equal(loaded.labels, expected["fine"])
    assert np.array_equal(loaded.images, expected["images"])


def test_cifar100_coarse_labels_on_request(tmp_path: Path) -> None:
    expected = write_cifar100(tmp_path / "c100")
    loaded = load_split(f"cifar:{tmp_path / 'c100'}", "test", label_column="coarse_labels")
    assert loaded.class_names == ["food", "animal"]
    assert np.array_equal(loaded.labels, expected["coarse"])


def test_cifar_unknown_label_column_lists_the_choices(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "c10")
    with pytest.raises(DatasetError, match=r"use one of \['labels'\]") as caught:
        load_split(f"cifar:{tmp_path / 'c10'}", "train", label_column="fine_labels")
    assert caught.value.field == "label_column"


def test_cifar_missing_batch_is_named(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "c10")
    (tmp_path / "c10" / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match=r"lacks the files \['data_batch_4'\]"):
        load_split(f"cifar:{tmp_path / 'c10'}", "test")


def test_cifar_folder_of_something_else_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="not a CIFAR python directory"):
        load_split(f"cifar:{tmp_path / 'other'}", "train")


class _RunsCode:
    """Pickles to a call of os.system: a crafted batch file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "c10")
    marker = tmp_path / "ran"
    (tmp_path / "c10" / "test_batch").write_bytes(pickle.dumps({b"data": _RunsCode(marker)}))
    with pytest.raises(DatasetError, match="cannot be read as a CIFAR pickle"):
        load_split(f"cifar:{tmp_path / 'c10'}", "test")
    assert not marker.exists()


# ---- Hugging Face ---------------------------------------------------------------------------


def test_hf_disk_dataset_dict_detects_columns(tmp_path: Path) -> None:
    saved = save_hf_dataset(tmp_path / "hf", {"train": 9, "test": 6})
    loaded = load_split(f"hf-disk:{tmp_path / 'hf'}", "test")
    assert loaded.class_names == ["cat", "dog", "emu"]
    assert loaded.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert np.array_equal(loaded.images[4], np.asarray(saved["test"][4]["image"]))
    assert loaded.images.shape == (6, 5, 5, 3)


def test_hf_disk_missing_split_lists_the_saved_ones(tmp_path: Path) -> None:
    save_hf_dataset(tmp_path / "hf", {"train": 9, "validation": 3})
    with pytest.raises(DatasetError, match="available splits: train, validation"):
        load_split(f"hf-disk:{tmp_path / 'hf'}", "test")


def test_hf_disk_single_dataset_is_the_split_all(tmp_path: Path) -> None:
    save_hf_dataset(tmp_path / "hf", None)
    assert load_split(f"hf-disk:{tmp_path / 'hf'}", "all").n_items == 9


def test_hf_disk_columns_by_name(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets package is absent")
    images = random_images(4, size=3)
    table = datasets.Dataset.from_dict(
        {"img": images.tolist(), "target": [0, 1, 1, 3], "label": [5, 5, 5, 5]}
    )
    table.save_to_disk(str(tmp_path / "hf"))
    loaded = load_split(f"hf-disk:{tmp_path / 'hf'}", "all", label_column="target")
    assert np.array_equal(loaded.images, images)
    assert loaded.class_names == ["0", "1", "2", "3"]


def test_hf_disk_unknown_column_lists_the_columns(tmp_path: Path) -> None:
    save_hf_dataset(tmp_path / "hf", None)
    with pytest.raises(
        DatasetError, match=r"columns are \['image', 'caption', 'label'\]"
    ) as caught:
        load_split(f"hf-disk:{tmp_path / 'hf'}", "all", image_column="picture")
    assert caught.value.field == "image_column"
    assert caught.value.value == "picture"


def test_hf_disk_without_labels_asks_for_label_column(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets package is absent")
    datasets.Dataset.from_dict({"image": random_images(3).tolist()}).save_to_disk(
        str(tmp_path / "hf")
    )
    with pytest.raises(DatasetError, match="pass label_column") as caught:
        load_split(f"hf-disk:{tmp_path / 'hf'}", "all")
    assert caught.value.field == "label_column"


def test_hf_disk_without_datasets_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetError, match="pip install datasets"):
        load_split(f"hf-disk:{tmp_path / 'hf'}", "all")


def test_hf_disk_folder_of_something_else_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not a folder written by save_to_disk"):
        load_split(f"hf-disk:{tmp_path / 'plain'}", "all")


@pytest.mark.parametrize(
    ("reference", "name", "config"),
    [
        ("hf:cifar10", "cifar10", None),
        ("hf:uoft-cs/cifar10", "uoft-cs/cifar10", None),
        ("hf:ylecun/mnist/mnist", "ylecun/mnist", "mnist"),
    ],
)
def test_hf_name_is_loaded_with_load_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: str, name: str, config: str | None
) -> None:
    datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets package is absent")
    saved = save_hf_dataset(tmp_path / "hf", {"train": 9})
    calls = []

    def load_dataset(path: str, config_name: str | None, *, split: str) -> Any:
        calls.append((path, config_name, split))
        return saved[split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    from_hub = load_split(reference, "train")
    assert calls == [(name, config, "train")]
    assert from_hub.fingerprint == load_split(f"hf-disk:{tmp_path / 'hf'}", "train").fingerprint


def test_hf_name_that_is_a_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="use hf-disk:/path"):
        load_split(f"hf:{tmp_path}", "train")


# ---- references and allowed roots -----------------------------------------------------------


def test_unknown_reference_lists_the_accepted_forms() -> None:
    with pytest.raises(DatasetError, match="not a known dataset") as caught:
        load_split("mnist:/data", "train")
    assert caught.value.field == "dataset"
    assert caught.value.value == "mnist:/data"
    for form in ("digits", "npz:/path/file.npz", "hf:<name>[/<config>]", "hf-disk:/path/folder"):
        assert form in caught.value.message


def test_empty_reference_is_rejected() -> None:
    with pytest.raises(DatasetError, match="non-empty reference"):
        load_split("", "train")


def test_reference_without_a_path_is_rejected() -> None:
    with pytest.raises(DatasetError, match="has no path after the prefix"):
        load_split("npz:", "all")


def test_missing_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_split(f"npz:{tmp_path / 'absent.npz'}", "all")


def test_missing_folder_before_dotdot_is_rejected(tiny_npz: Path) -> None:
    """The system cannot open a path through a missing folder, so neither does the loader,
    which would otherwise give one file a second feature-set id."""
    reference = f"npz:{tiny_npz.parent}/missing/../{tiny_npz.name}"
    with pytest.raises(DatasetError, match="does not exist") as caught:
        load_split(reference, "all")
    assert caught.value.field == "dataset"
    assert caught.value.value == reference


def test_dotdot_through_a_folder_loads(tiny_npz: Path) -> None:
    (tiny_npz.parent / "sub").mkdir()
    split = load_split(f"npz:{tiny_npz.parent}/sub/../{tiny_npz.name}", "all")
    assert split.n_items == load_split(f"npz:{tiny_npz}", "all").n_items


def test_relative_path_under_roots_rejected(tmp_path: Path, tiny_npz: Path) -> None:
    """With allowed roots, a relative path is rejected without showing the folder the service
    runs in, which it would be resolved against."""
    import os

    reference = "npz:data/tiny.npz"
    with pytest.raises(PathNotAllowedError) as caught:
        load_split(reference, "all", allowed_roots=[tiny_npz.parent])
    assert caught.value.field == "dataset"
    assert caught.value.value == reference
    assert "absolute path" in caught.value.message
    assert os.getcwd() not in caught.value.message


def test_path_outside_the_roots_is_not_allowed(tmp_path: Path, tiny_npz: Path) -> None:
    root = tmp_path / "allowed"
    root.mkdir()
    with pytest.raises(
        PathNotAllowedError, match=f"outside the allowed dataset roots \\({root}\\)"
    ) as caught:
        load_split(f"npz:{tiny_npz}", "all", allowed_roots=[root])
    assert caught.value.field == "dataset"
    assert caught.value.value == f"npz:{tiny_npz}"


def test_path_inside_the_roots_is_allowed(tmp_path: Path, tiny_npz: Path) -> None:
    assert load_split(f"npz:{tiny_npz}", "all", allowed_roots=[tmp_path]).n_items == 12


def test_missing_path_outside_the_roots_says_not_allowed(tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowedError):
        load_split("npz:/nowhere/secret.npz", "all", allowed_roots=[tmp_path])


def test_symlink_out_of_the_roots_is_not_allowed(tmp_path: Path, tiny_npz: Path) -> None:
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "link.npz").symlink_to(tiny_npz)
    with pytest.raises(PathNotAllowedError):
        load_split(f"npz:{root / 'link.npz'}", "all", allowed_roots=[root])


def test_dotdot_out_of_the_roots_is_not_allowed(tmp_path: Path, tiny_npz: Path) -> None:
    root = tmp_path / "allowed"
    root.mkdir()
    with pytest.raises(PathNotAllowedError):
        load_split(f"npz:{root}/../{tiny_npz.name}", "all", allowed_roots=[root])


def test_imagefolder_linked_file_outside_roots(tmp_path: Path) -> None:
    root = tmp_path / "allowed" / "pets"
    write_image_folder(root, {"cat": 1, "dog": 1})
    outside = write_png(tmp_path / "secret.png", random_images(1)[0])
    (root / "dog" / "linked.png").symlink_to(outside)
    with pytest.raises(PathNotAllowedError, match="secret.png"):
        load_split(f"imagefolder:{root}", "all", allowed_roots=[tmp_path / "allowed"])


def test_no_roots_configured_allows_no_path(tiny_npz: Path) -> None:
    with pytest.raises(PathNotAllowedError, match="none are configured"):
        load_split(f"npz:{tiny_npz}", "all", allowed_roots=[])


# ---- fingerprints and the cache -------------------------------------------------------------


def test_fingerprint_ignores_where_the_file_is(tmp_path: Path) -> None:
    images, labels = random_images(6), balanced_labels(6, 2)
    first = write_npz(tmp_path / "a.npz", images=images, labels=labels)
    (tmp_path / "copy").mkdir()
    second = write_npz(tmp_path / "copy" / "b.npz", images=images, labels=labels)
    assert (
        load_split(f"npz:{first}", "all").fingerprint
        == load_split(f"npz:{second}", "all").fingerprint
    )


def test_fingerprint_changes_with_one_pixel(tmp_path: Path) -> None:
    images, labels = random_images(6), balanced_labels(6, 2)
    first = write_npz(tmp_path / "a.npz", images=images, labels=labels)
    changed = images.copy()
    changed[5, 5, 5, 2] ^= 1
    second = write_npz(tmp_path / "b.npz", images=changed, labels=labels)
    assert (
        load_split(f"npz:{first}", "all").fingerprint
        != load_split(f"npz:{second}", "all").fingerprint
    )


def test_fingerprint_changes_with_one_label(tmp_path: Path) -> None:
    images, labels = random_images(6), balanced_labels(6, 2)
    first = write_npz(tmp_path / "a.npz", images=images, labels=labels)
    changed = labels.copy()
    changed[0] = 1
    second = write_npz(tmp_path / "b.npz", images=images, labels=changed)
    assert (
        load_split(f"npz:{first}", "all").fingerprint
        != load_split(f"npz:{second}", "all").fingerprint
    )


def test_fingerprint_changes_with_the_split_name(tmp_path: Path) -> None:
    images, labels = random_images(6), balanced_labels(6, 2)
    path = write_npz(
        tmp_path / "a.npz", train_x=images, train_y=labels, test_x=images, test_y=labels
    )
    assert (
        load_split(f"npz:{path}", "train").fingerprint
        != load_split(f"npz:{path}", "test").fingerprint
    )


def test_repeated_load_reads_the_files_once(
    tiny_npz: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.datasets.npz import NpzSource

    reads = []
    original = NpzSource.read

    def counted_read(self: NpzSource, split: str) -> Any:
        reads.append(split)
        return original(self, split)

    monkeypatch.setattr(NpzSource, "read", counted_read)
    first = load_split(f"npz:{tiny_npz}", "all")
    second = load_split(f"npz:{tiny_npz}", "all")
    assert reads == ["all"]
    assert first.fingerprint == second.fingerprint


def test_hub_failure_suggests_hf_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets package is absent")

    def load_dataset(path: str, config_name: str | None, *, split: str) -> Any:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DatasetError, match="offline.*use hf-disk:/path") as caught:
        load_split("hf:uoft-cs/cifar10", "train")
    assert caught.value.field == "dataset"


def test_hub_failure_remembered_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.datasets.huggingface as hub

    datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets package is absent")
    calls = []

    def load_dataset(path: str, config_name: str | None, *, split: str) -> Any:
        calls.append(split)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    reference = f"hf:layerbank-tests/missing-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        with pytest.raises(DatasetError, match="fail at once for 60 s"):
            load_split(reference, "train")
    assert calls == ["train"]
    # Another split is another load. A failure older than the window is tried again.
    with pytest.raises(DatasetError):
        load_split(reference, "test")
    assert calls == ["train", "test"]
    monkeypatch.setattr(hub, "HUB_FAILURE_SECONDS", 0.0)
    with pytest.raises(DatasetError):
        load_split(reference, "train")
    assert calls == ["train", "test", "train"]


def test_hub_loads_bounded_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from workers.errors import BusyError

    datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets package is absent")
    started = threading.Semaphore(0)
    release = threading.Event()

    def load_dataset(path: str, config_name: str | None, *, split: str) -> Any:
        started.release()
        release.wait(30)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    reference = f"hf:layerbank-tests/slow-{uuid.uuid4().hex[:8]}"
    errors: list[Exception] = []

    def load(split: str) -> None:
        try:
            load_split(reference, split)
        except DatasetError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(split,)) for split in ("train", "test")]
    for thread in threads:
        thread.start()
        assert started.acquire(timeout=30)
    try:
        with pytest.raises(BusyError, match="already loading this split"):
            load_split(reference, "train")
        with pytest.raises(BusyError, match="already loading 2 Hub datasets"):
            load_split(reference, "validation")
    finally:
        release.set()
        for thread in threads:
            thread.join(30)
    assert len(errors) == 2
    assert all(not isinstance(error, BusyError) for error in errors)


def test_changed_file_is_read_again(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", images=random_images(6), labels=balanced_labels(6, 2))
    before = load_split(f"npz:{path}", "all")
    write_npz(path, images=random_images(6, seed=9), labels=balanced_labels(6, 2))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    after = load_split(f"npz:{path}", "all")
    assert before.fingerprint != after.fingerprint
    assert np.array_equal(after.images, random_images(6, seed=9))


def test_caller_changes_do_not_reach_the_cache() -> None:
    first = load_split("digits", "test")
    original_image, original_label = first.images[0].copy(), int(first.labels[0])
    first.images[0] = 7
    first.labels[0] = original_label + 1
    again = load_split("digits", "test")
    assert np.array_equal(again.images[0], original_image)
    assert again.labels[0] == original_label


# ---- list_datasets --------------------------------------------------------------------------


def test_list_datasets_sizes_match_the_digits_splits() -> None:
    digits = next(entry for entry in list_datasets() if entry["reference"] == "digits")
    assert digits["available"] is True
    for split, size in digits["sizes"].items():
        assert load_split("digits", split).n_items == size


def test_list_datasets_describes_every_reference_form() -> None:
    kinds = {entry["kind"] for entry in list_datasets()}
    assert kinds == {"builtin", "npz", "imagefolder", "cifar", "hf", "hf-disk"}
    for entry in list_datasets():
        assert entry["description"]
        assert entry["example"]


# ---- normalisation rules --------------------------------------------------------------------


def test_rgba_is_composited_on_white() -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 0, 128)  # half transparent
    rgba[0, 1] = (10, 20, 30, 255)  # opaque
    rgba[1, 0] = (10, 20, 30, 0)  # fully transparent
    out = to_rgb_uint8(rgba, item="rgba")
    assert out[0, 0].tolist() == [227, 177, 127]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert out[1, 0].tolist() == [255, 255, 255]


def test_rgba_pil_image_is_composited_on_white() -> None:
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.all(to_rgb_uint8(image, item="clear.png") == 255)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 1)])
def test_greyscale_arrays_become_rgb(shape: tuple[int, ...]) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(shape)
    out = to_rgb_uint8(grey, item="grey")
    assert out.shape == (3, 4, 3)
    assert np.array_equal(out[..., 0], grey.reshape(3, 4))
    assert np.array_equal(out[..., 2], grey.reshape(3, 4))


def test_greyscale_pil_image_becomes_rgb() -> None:
    out = to_rgb_uint8(Image.new("L", (3, 2), 77), item="grey.png")
    assert out.shape == (2, 3, 3)
    assert np.all(out == 77)


def test_palette_image_becomes_rgb() -> None:
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    assert to_rgb_uint8(image, item="p.png")[1, 1].tolist() == [12, 34, 56]


def test_palette_transparency_composited_on_white() -> None:
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.info["transparency"] = 0
    out = to_rgb_uint8(image, item="p.png")
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [12, 34, 56]


def test_la_image_is_composited_on_white() -> None:
    image = Image.new("LA", (2, 2), (50, 255))
    image.putpixel((0, 0), (50, 0))
    out = to_rgb_uint8(image, item="la.png")
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [50, 50, 50]


SIXTEEN_BIT = np.array([[0, 128, 129], [257, 32767, 65535]], dtype=np.uint16)
SIXTEEN_BIT_AS_8 = [[0, 0, 1], [1, 127, 255]]


def test_uint16_array_is_scaled_with_rounding() -> None:
    assert to_rgb_uint8(SIXTEEN_BIT, item="x")[..., 0].tolist() == SIXTEEN_BIT_AS_8


def test_sixteen_bit_pil_image_is_scaled_with_rounding() -> None:
    image = Image.fromarray(SIXTEEN_BIT)
    assert image.mode == "I;16"
    assert to_rgb_uint8(image, item="x.png")[..., 1].tolist() == SIXTEEN_BIT_AS_8


def test_pil_mode_i_read_as_sixteen_bit() -> None:
    image = Image.fromarray(SIXTEEN_BIT.astype(np.int32))
    assert image.mode == "I"
    assert to_rgb_uint8(image, item="x.png")[..., 2].tolist() == SIXTEEN_BIT_AS_8


def test_pil_mode_i_beyond_sixteen_bits() -> None:
    image = Image.fromarray(np.full((2, 2), 70_000, dtype=np.int32))
    with pytest.raises(DatasetError, match="big.png is a 32-bit integer image"):
        to_rgb_uint8(image, item="big.png")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_image_round_trips_every_uint8_value(dtype: type) -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    floats = (values / 255).astype(dtype)
    assert np.array_equal(to_rgb_uint8(floats, item="x")[..., 0], values)


def test_float_image_within_the_tolerance_is_clipped() -> None:
    floats = np.array([[-1e-7, 0.5], [1 + 1e-7, 1.0]])
    assert to_rgb_uint8(floats, item="x")[..., 0].tolist() == [[0, 128], [255, 255]]


@pytest.mark.parametrize("value", [1.01, -0.5, 255.0])
def test_float_image_outside_zero_one_is_rejected(value: float) -> None:
    floats = np.full((4, 4, 3), 0.5)
    floats[1, 1, 1] = value
    with pytest.raises(
        DatasetError, match=r"train/cat/3.png contains float values .* must lie in \[0, 1\]"
    ):
        to_rgb_uint8(floats, item="train/cat/3.png")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_float_image_is_rejected(value: float) -> None:
    floats = np.full((4, 4), 0.5)
    floats[0, 3] = value
    with pytest.raises(DatasetError, match=r"npz:/x.npz\[17\] contains NaN or infinite") as caught:
        to_rgb_uint8(floats, item="npz:/x.npz[17]")
    assert caught.value.value == "npz:/x.npz[17]"


@pytest.mark.parametrize("shape", [(1, 1000, 3), (1000, 1), (2, 129, 3), (1, 1)])
def test_strips_are_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(DatasetError, match="strip.png is .* aspect ratio of at most 64:1"):
        to_rgb_uint8(np.zeros(shape, dtype=np.uint8), item="strip.png")


def test_aspect_ratio_of_64_is_accepted() -> None:
    assert to_rgb_uint8(np.zeros((2, 128), dtype=np.uint8), item="x").shape == (2, 128, 3)


@pytest.mark.parametrize("channels", [2, 5, 6])
def test_other_channel_counts_are_rejected(channels: int) -> None:
    with pytest.raises(DatasetError, match=f"item-9 has {channels} channels"):
        to_rgb_uint8(np.zeros((4, 4, channels), dtype=np.uint8), item="item-9")


def test_channels_first_array_gets_a_hint(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "chw.npz", images=np.zeros((4, 3, 8, 8), np.uint8), labels=balanced_labels(4, 2)
    )
    with pytest.raises(DatasetError, match="looks channels-first"):
        load_split(f"npz:{path}", "all")


def test_integer_array_with_eight_bit_values_is_accepted() -> None:
    values = np.arange(256, dtype=np.int64).reshape(16, 16)
    assert np.array_equal(to_rgb_uint8(values, item="x")[..., 0], values)


def test_integer_array_beyond_eight_bits_is_rejected() -> None:
    with pytest.raises(DatasetError, match="x contains int64 values from 0 to 300"):
        to_rgb_uint8(np.array([[0, 300], [1, 2]], dtype=np.int64), item="x")


def test_unsupported_dtype_is_rejected() -> None:
    with pytest.raises(DatasetError, match="has dtype bool"):
        to_rgb_uint8(np.zeros((4, 4), dtype=bool), item="x")


def test_array_of_the_wrong_rank_is_rejected() -> None:
    with pytest.raises(DatasetError, match=r"x has shape \(2, 2, 2, 2\)"):
        to_rgb_uint8(np.zeros((2, 2, 2, 2), dtype=np.uint8), item="x")


def test_cmyk_image_becomes_rgb() -> None:
    out = to_rgb_uint8(Image.new("CMYK", (2, 2), (0, 0, 0, 0)), item="c.jpg")
    assert np.all(out == 255)


def test_undecodable_pil_image_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(random_images(1, size=64)[0]).save(path)
    path.write_bytes(path.read_bytes()[:-300])
    with Image.open(path) as image, pytest.raises(DatasetError, match="cut.png cannot be decoded"):
        to_rgb_uint8(image, item="cut.png")


@pytest.mark.parametrize(
    ("reference", "canonical"),
    [
        ("npz:/data//./x.npz", "npz:/data/x.npz"),
        ("imagefolder:data/./pets/", "imagefolder:data/pets"),
        ("npz:/data/../x.npz", "npz:/data/../x.npz"),
        ("digits", "digits"),
        ("hf:user/name", "hf:user/name"),
        ("cifar:/", "cifar:/"),
    ],
)
def test_canonical_reference_one_spelling(reference: str, canonical: str) -> None:
    from workers.datasets import canonical_reference

    assert canonical_reference(reference) == canonical
