"""Extraction of one block of rows: dataset rows in, pooled hidden states of every layer out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from store import FeatureSet, Store
from store.settings import Settings
from workers.datasets import DatasetSplit, load_split
from workers.errors import DatasetError, ModelError
from workers.modelref import ModelRef, processor_spec, resolve_model

if TYPE_CHECKING:
    import torch

    from store.spec import FeatureSetSpec
    from workers.models import PooledModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockResult:
    """Outcome of one block job: rows written, seconds, or skipped."""

    featureset_id: str
    block: int
    rows: int
    seconds: float
    skipped: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "featureset_id": self.featureset_id,
            "block": self.block,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
        }


def resolve_for_featureset(featureset: FeatureSet, settings: Settings, store: Store) -> ModelRef:
    """Resolve the feature set's model and check that its weights did not change since."""
    spec = featureset.spec
    ref = resolve_model(
        spec.model,
        models_dir=store.models_dir() if store.local_root else None,
        allowed_roots=settings.model_roots,
        allow_hub=settings.allow_hub,
        allow_list=settings.model_allow_list,
    )
    if ref.revision != spec.model_revision:
        raise ModelError(
            f"model {spec.model!r} now resolves to revision {ref.revision!r}, but feature set "
            f"{featureset.id!r} was created from {spec.model_revision!r}; request a new "
            "extraction",
            field="model",
            value=spec.model,
        )
    return ref


def load_featureset_split(featureset: FeatureSet, settings: Settings) -> DatasetSplit:
    """Load the dataset split of a feature set and check that its content did not change."""
    spec = featureset.spec
    split = load_split(
        spec.dataset,
        spec.split,
        limit=spec.limit,
        seed=spec.seed,
        image_column=spec.image_column,
        label_column=spec.label_column,
        allowed_roots=settings.data_roots,
    )
    if split.fingerprint != spec.dataset_fingerprint:
        raise DatasetError(
            f"dataset {spec.dataset!r} split {spec.split!r} changed since feature set "
            f"{featureset.id!r} was created (fingerprint {split.fingerprint[:12]} != "
            f"{spec.dataset_fingerprint[:12]}); request a new extraction",
            field="dataset",
            value=spec.dataset,
        )
    return split


def _palette_tokens(
    store: Store, model: PooledModel, split: DatasetSplit, dataset: str, split_name: str
) -> np.ndarray | None:
    """Return the cached palette tokens (n_items, seq) of the split for ImageGPT, else None."""
    from workers.models import ImageGPTAdapter
    from workers.tokens import cached_tokens

    if not isinstance(model, ImageGPTAdapter):
        return None
    processor = processor_spec(model.ref, model.input_policy)

    def quantize(images: np.ndarray) -> np.ndarray:
        return model.tokens(images).cpu().numpy()  # (rows, seq)

    return cached_tokens(
        store,
        split.images,
        dataset_fingerprint=split.fingerprint,
        palette_sha256=processor["palette_sha256"],
        size=model.size,
        quantize=quantize,
        description={"dataset": dataset, "split": split_name},
    )


@dataclass(frozen=True)
class _Batch:
    """One batch prepared by the loader thread: model inputs for rows [start, stop) of a block."""

    block: int
    block_start: int
    block_stop: int
    start: int
    stop: int
    inputs: object


def extract_block(
    store: Store,
    featureset_id: str,
    block: int,
    *,
    settings: Settings,
    batch_size: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> BlockResult:
    """Compute and write the pooled features of one block, unless it is already written.

    Parameters
    ----------
    on_batch
        Called with (rows done, rows in block) after every batch.
    """
    results = extract_blocks(
        store, featureset_id, [block], settings=settings, batch_size=batch_size, on_batch=on_batch
    )
    return results[0]


def extract_blocks(
    store: Store,
    featureset_id: str,
    blocks: Sequence[int],
    *,
    settings: Settings,
    batch_size: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[BlockResult]:
    """Compute and write the pooled features of ``blocks`` in order, skipping written ones.

    A loader thread prepares the next batches while this thread runs the forward pass, and a
    writer thread writes each finished block (features, then its done flag) while the forward
    pass moves on to the next block (see `workers.pipeline`). The call returns after every
    block is written, and raises the first error of any of the three threads. A block whose
    write failed, and every block after it, stays unmarked.

    Parameters
    ----------
    blocks
        Block indices, written in this order.
    batch_size
        Images per forward pass; default: the feature set's ``batch_size`` attribute, else
        `workers.models.default_batch_size` for the model and device.
    on_batch
        Called with (rows done, rows in block) after every batch.

    Returns
    -------
    list[BlockResult]
        One result per entry of ``blocks``, in the same order.
    """

    from workers.models import default_batch_size, load_model
    from workers.pipeline import BlockWriter, Prefetcher

    started = time.perf_counter()
    featureset = store.featureset(featureset_id)
    done = featureset.done_blocks()
    for block in blocks:
        featureset.block_range(block)  # raises on an out-of-range block
    todo = [block for block in blocks if not done[block]]
    for block in blocks:
        if done[block]:
            logger.info("feature set %s: block %d already written, skipped", featureset_id, block)
    results: dict[int, BlockResult] = {
        block: BlockResult(featureset_id, block, 0, 0.0, skipped=True)
        for block in blocks
        if done[block]
    }
    if not todo:
        return [results[block] for block in blocks]

    spec = featureset.spec
    split = load_featureset_split(featureset, settings)
    ref = resolve_for_featureset(featureset, settings, store)
    device = settings.resolved_device()
    model = load_model(
        ref,
        device=device,
        input_policy=spec.processor.get("input_policy"),
        cpu_bf16=settings.cpu_bf16,
    )
    batch = batch_size or int(featureset.attrs.get("batch_size") or 0)
    batch = batch or default_batch_size(model, device)
    dim = featureset.features.shape[2]
    token_shape = None if featureset.token_features is None else featureset.token_features.shape
    palette_tokens = _palette_tokens(store, model, split, spec.dataset, spec.split)

    def batches() -> Iterator[_Batch]:
        # Runs in the loader thread: everything here overlaps the previous forward pass.
        for block in todo:
            block_start, block_stop = featureset.block_range(block)
            for start in range(block_start, block_stop, batch):
                stop = min(start + batch, block_stop)
                inputs = _batch_inputs(palette_tokens, split.images, start, stop)
                yield _Batch(block, block_start, block_stop, start, stop, inputs)

    block_started: dict[int, float] = {}
    loader_waits: dict[int, float] = {}

    def on_written(block: int, seconds: float, submit_wait: float) -> None:
        block_start, block_stop = featureset.block_range(block)
        rows = block_stop - block_start
        total = time.perf_counter() - block_started[block]
        loader_wait = loader_waits[block]
        results[block] = BlockResult(featureset_id, block, rows, total, skipped=False)
        logger.info(
            "feature set %s: block %d/%d written, %d rows in %.2fs (%.1f items/s); "
            "loader wait %.3fs (%.1f%%), writer queue wait %.3fs, write %.3fs",
            featureset_id,
            block + 1,
            featureset.n_blocks,
            rows,
            total,
            rows / max(total, 1e-9),
            loader_wait,
            100 * loader_wait / max(total, 1e-9),
            submit_wait,
            seconds,
        )

    loader = Prefetcher(batches(), depth=2, name=f"prefetch-{featureset_id[:8]}")
    writer = BlockWriter(
        featureset.write_block, depth=1, on_written=on_written, name=f"writer-{featureset_id[:8]}"
    )
    features = token_features = None
    loader_wait_before = 0.0
    try:
        for item in loader:
            rows = slice(item.start - item.block_start, item.stop - item.block_start)
            n_rows = item.block_stop - item.block_start
            if rows.start == 0:
                # A fresh buffer per block: the writer may still be writing the previous one.
                block_started[item.block] = time.perf_counter()
                features = np.empty((len(spec.layers), n_rows, dim), np.float32)
                if token_shape is not None:
                    token_features = np.empty(
                        (len(spec.token_layers), n_rows, token_shape[2], token_shape[3]),
                        np.float32,
                    )
            assert features is not None  # set by the block's first batch
            pooled, tokens = _forward(model, item.inputs, spec, palette_tokens is not None)
            features[:, rows] = pooled.cpu().numpy()  # (n_layers, batch, dim)
            if token_features is not None and tokens is not None:
                _check_token_count(
                    tokens, token_features, spec.model, featureset_id, spec.token_layers
                )
                token_features[:, rows] = tokens.cpu().numpy()  # (n_token_layers, batch, seq, dim)
            if on_batch is not None:
                on_batch(rows.stop, n_rows)
            if item.stop == item.block_stop:
                loader_waits[item.block] = loader.wait_seconds - loader_wait_before
                loader_wait_before = loader.wait_seconds
                writer.submit(item.block, features, token_features)
                features = token_features = None
    except BaseException:
        loader.close()
        writer.abandon()
        raise
    loader.close()
    writer.close()

    seconds = time.perf_counter() - started
    logger.info(
        "feature set %s: %d blocks in %.2fs, loader wait %.3fs (%.1f%%), writer queue wait "
        "%.3fs, writer idle %.3fs, write %.3fs",
        featureset_id,
        len(todo),
        seconds,
        loader.wait_seconds,
        100 * loader.wait_seconds / max(seconds, 1e-9),
        writer.stats.submit_wait,
        writer.stats.idle,
        writer.stats.write,
    )
    return [results[block] for block in blocks]


def _batch_inputs(
    palette_tokens: np.ndarray | None, images: np.ndarray, start: int, stop: int
) -> object:
    """Return the model inputs of rows [start, stop): palette tokens as an int64 tensor of
    shape (rows, seq) when the model takes them, else images of shape (rows, H, W, 3) uint8."""
    if palette_tokens is not None:
        import torch

        return torch.from_numpy(palette_tokens[start:stop].astype(np.int64))
    return np.ascontiguousarray(images[start:stop])


def _forward(
    model: PooledModel, inputs: object, spec: FeatureSetSpec, from_tokens: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one batch: palette tokens (batch, seq) int64 or images (batch, H, W, 3) uint8."""
    if from_tokens:
        from workers.models import ImageGPTAdapter

        tokens = cast("torch.Tensor", inputs)  # (batch, seq) int64
        igpt = cast(ImageGPTAdapter, model)  # only ImageGPT gets palette tokens
        return igpt.features_from_tokens(tokens, spec.layers, spec.pooling, spec.token_layers)
    images = cast(np.ndarray, inputs)  # (batch, H, W, 3) uint8
    return model.features(images, spec.layers, spec.pooling, spec.token_layers)


def _check_token_count(
    tokens: torch.Tensor,
    token_features: np.ndarray,
    model: str,
    featureset_id: str,
    token_layers: Sequence[int],
) -> None:
    if tokens.shape[2] != token_features.shape[2]:
        raise ModelError(
            f"model {model!r} produced {tokens.shape[2]} tokens per image, but "
            f"feature set {featureset_id!r} expects {token_features.shape[2]}; the "
            "processor resizes these images differently, so request without token_layers",
            field="token_layers",
            value=list(token_layers),
        )
