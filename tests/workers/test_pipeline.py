"""Prefetching loader, background block writer, and the pipelined extraction that uses them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from store import FeatureSet, Store
from store.featureset import create_featureset
from store.settings import Settings
from store.spec import FeatureSetSpec
from tests.factories import tiny_imagegpt
from workers.pipeline import BlockWriter, Prefetcher

N_ITEMS, BLOCK_ROWS = 40, 16


class LoaderFailure(RuntimeError):
    """Raised by a test loader."""


class WriterFailure(OSError):
    """Raised by a test write function."""


def test_prefetcher_yields_items_in_order() -> None:
    loader = Prefetcher(iter(range(10)), depth=2)
    items = list(loader)
    loader.close()
    assert items == list(range(10))


def test_prefetcher_reraises_loader_error() -> None:
    def items() -> Iterator[int]:
        yield 1
        raise LoaderFailure("batch 2 unreadable")

    loader = Prefetcher(items(), depth=2)
    assert next(loader) == 1
    with pytest.raises(LoaderFailure, match="batch 2 unreadable"):
        next(loader)
    loader.close()


def test_prefetcher_close_stops_a_blocked_loader() -> None:
    loader = Prefetcher(iter(range(1_000_000)), depth=1)
    assert next(loader) == 0
    loader.close()
    assert not loader._thread.is_alive()


def test_prefetcher_rejects_zero_depth() -> None:
    with pytest.raises(ValueError, match="depth must be at least 1"):
        Prefetcher(iter(()), depth=0)


def test_block_writer_writes_in_submission_order() -> None:
    written: list[int] = []
    writer = BlockWriter(lambda block, features, tokens: written.append(block), depth=1)
    for block in (3, 0, 2, 1):
        writer.submit(block, np.zeros((1, 2, 2), np.float32))
    writer.close()
    assert written == [3, 0, 2, 1]
    assert writer.stats.blocks == [3, 0, 2, 1]


def test_block_writer_error_stops_later_blocks() -> None:
    written: list[int] = []

    def write(block: int, features: np.ndarray, tokens: np.ndarray | None) -> None:
        if block == 1:
            raise WriterFailure("disk unplugged")
        written.append(block)

    writer = BlockWriter(write, depth=4)
    for block in range(4):
        writer.submit(block, np.zeros((1, 2, 2), np.float32))
    with pytest.raises(WriterFailure, match="disk unplugged"):
        writer.close()
    assert written == [0]


def test_block_writer_submit_raises_after_failure() -> None:
    def write(block: int, features: np.ndarray, tokens: np.ndarray | None) -> None:
        raise WriterFailure("disk unplugged")

    writer = BlockWriter(write, depth=1)
    writer.submit(0, np.zeros((1, 2, 2), np.float32))
    with pytest.raises(WriterFailure):
        for block in range(1, 100):
            writer.submit(block, np.zeros((1, 2, 2), np.float32))
    writer.abandon()
    assert writer.stats.blocks == []


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_imagegpt(tmp_path_factory.mktemp("models") / "tiny-igpt")


def _featureset(store: Store, model_path: Path) -> FeatureSet:
    from workers.datasets import load_split
    from workers.modelref import processor_spec, resolve_model

    ref = resolve_model(str(model_path), models_dir=None, allow_hub=False)
    split = load_split("digits", "test", limit=N_ITEMS, seed=0)
    spec = FeatureSetSpec(
        model=str(model_path),
        model_revision=ref.revision,
        model_family=ref.family,
        processor=processor_spec(ref, "plain"),
        dataset="digits",
        dataset_fingerprint=split.fingerprint,
        split="test",
        limit=N_ITEMS,
        seed=0,
        layers=[0, 1, 2],
        pooling="mean",
    )
    return create_featureset(
        store,
        spec,
        layer_map=ref.layer_map(spec.layers, spec.pooling),
        dim=ref.dim,
        labels=split.labels,
        item_ids=split.item_ids,
        class_names=split.class_names,
        block_rows=BLOCK_ROWS,
    )


@pytest.fixture()
def pipeline_setup(tmp_path: Path, model_path: Path) -> dict[str, Any]:
    store = Store(tmp_path / "store")
    settings = Settings(
        store=str(tmp_path / "store"),
        device="cpu",
        allow_hub=False,
        model_roots=[model_path.parent],
    )
    return {"store": store, "settings": settings, "featureset": _featureset(store, model_path)}


def test_extract_blocks_matches_one_block_jobs(
    pipeline_setup: dict[str, Any], tmp_path: Path, model_path: Path
) -> None:
    from workers.extract import extract_block, extract_blocks

    featureset = pipeline_setup["featureset"]
    results = extract_blocks(
        pipeline_setup["store"],
        featureset.id,
        [0, 1, 2],
        settings=pipeline_setup["settings"],
        batch_size=5,
    )
    other = Store(tmp_path / "other")
    reference = _featureset(other, model_path)
    for block in range(3):
        extract_block(other, reference.id, block, settings=pipeline_setup["settings"], batch_size=7)
    assert [result.rows for result in results] == [16, 16, 8]
    assert featureset.done_blocks().all()
    np.testing.assert_allclose(featureset.features[:], reference.features[:], rtol=1e-5, atol=1e-6)


def test_extract_blocks_skips_written_blocks(pipeline_setup: dict[str, Any]) -> None:
    from workers.extract import extract_blocks

    featureset = pipeline_setup["featureset"]
    settings = pipeline_setup["settings"]
    extract_blocks(pipeline_setup["store"], featureset.id, [1], settings=settings)
    results = extract_blocks(pipeline_setup["store"], featureset.id, [0, 1], settings=settings)
    assert [result.skipped for result in results] == [False, True]


def test_extract_writer_error_fails_job(
    pipeline_setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.extract import extract_blocks

    # The handle that extraction gets from the store, so the patched write is the one it calls.
    featureset = pipeline_setup["store"].featureset(pipeline_setup["featureset"].id)

    def failing_write(block: int, features: np.ndarray, tokens: np.ndarray | None) -> None:
        if block == 1:
            raise WriterFailure(28, "No space left on device")
        FeatureSet.write_block(featureset, block, features, tokens)

    monkeypatch.setattr(featureset, "write_block", failing_write)
    with pytest.raises(WriterFailure, match="No space left"):
        extract_blocks(
            pipeline_setup["store"],
            featureset.id,
            [0, 1, 2],
            settings=pipeline_setup["settings"],
            batch_size=4,
        )
    done = featureset.done_blocks()
    assert done[0]
    assert not done[1]
    assert not done[2]
    assert np.isnan(featureset.features[:, BLOCK_ROWS:]).all()


def test_extract_loader_error_fails_job(
    pipeline_setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.extract
    from workers.extract import extract_blocks

    real_inputs = workers.extract._batch_inputs

    def failing_inputs(tokens: np.ndarray | None, images: np.ndarray, start: int, stop: int) -> Any:
        if start == BLOCK_ROWS + 8:
            raise LoaderFailure(f"rows {start}..{stop} could not be read")
        return real_inputs(tokens, images, start, stop)

    monkeypatch.setattr(workers.extract, "_batch_inputs", failing_inputs)
    featureset = pipeline_setup["featureset"]
    with pytest.raises(LoaderFailure, match="rows 24..32"):
        extract_blocks(
            pipeline_setup["store"],
            featureset.id,
            [0, 1],
            settings=pipeline_setup["settings"],
            batch_size=8,
        )
    done = featureset.done_blocks()
    assert done[0]
    assert not done[1]


def test_batch_size_for_memory_cpu_rule() -> None:
    from workers.models import MAX_CPU_BATCH, batch_size_for_memory

    # 1 GiB available, 1/8 of it is 128 MiB, 3 MiB per image fits 42, rounded down to 32.
    assert batch_size_for_memory(3 * 2**20, 2**30, device_type="cpu") == 32
    assert batch_size_for_memory(1, 2**40, device_type="cpu") == MAX_CPU_BATCH
    assert batch_size_for_memory(2**30, 2**20, device_type="cpu") == 1


def test_batch_size_for_memory_cuda_rule() -> None:
    from workers.models import MAX_CUDA_BATCH, batch_size_for_memory

    # 80 GiB free, half of it is 40 GiB, 100 MiB per image fits 409, rounded down to 256.
    assert batch_size_for_memory(100 * 2**20, 80 * 2**30, device_type="cuda") == 256
    assert batch_size_for_memory(1, 2**40, device_type="cuda") == MAX_CUDA_BATCH


def test_batch_size_for_memory_rejects_zero() -> None:
    from workers.models import batch_size_for_memory

    with pytest.raises(ValueError, match="per_image_bytes must be positive"):
        batch_size_for_memory(0, 2**30, device_type="cpu")


def test_default_batch_size_tiny_imagegpt(model_path: Path) -> None:
    from workers.modelref import resolve_model
    from workers.models import (
        _LIVE_STATES_PER_BLOCK,
        MAX_CPU_BATCH,
        activation_bytes_per_image,
        default_batch_size,
        load_model,
    )

    model = load_model(resolve_model(str(model_path), models_dir=None, allow_hub=False))
    # The tiny model: 64 positions of width 32, float32.
    assert activation_bytes_per_image(model) == _LIVE_STATES_PER_BLOCK * 64 * 32 * 4
    assert default_batch_size(model, "cpu") == MAX_CPU_BATCH
