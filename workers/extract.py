"""Extraction of one block of rows: dataset rows in, pooled hidden states of every layer out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from store import FeatureSet, Store
from store.settings import Settings
from workers.datasets import DatasetSplit, load_split
from workers.errors import DatasetError, ModelError
from workers.modelref import ModelRef, processor_spec, resolve_model

if TYPE_CHECKING:
    from workers.models import PooledModel

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class BlockResult:
    """What one block job did."""

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
        spec.dataset, spec.split, limit=spec.limit, seed=spec.seed,
        image_column=spec.image_column, label_column=spec.label_column,
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
        store, split.images, dataset_fingerprint=split.fingerprint,
        palette_sha256=processor["palette_sha256"], size=model.size, quantize=quantize,
        description={"dataset": dataset, "split": split_name},
    )


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
    import torch

    from workers.models import load_model

    started = time.perf_counter()
    featureset = store.featureset(featureset_id)
    if featureset.done_blocks()[block]:
        logger.info("feature set %s: block %d already written, skipped", featureset_id, block)
        return BlockResult(featureset_id, block, 0, 0.0, skipped=True)

    spec = featureset.spec
    split = load_featureset_split(featureset, settings)
    ref = resolve_for_featureset(featureset, settings, store)
    model = load_model(ref, device=settings.resolved_device(),
                       input_policy=spec.processor.get("input_policy"))
    start, stop = featureset.block_range(block)
    batch = batch_size or int(featureset.attrs.get("batch_size") or DEFAULT_BATCH_SIZE)

    features = np.empty((len(spec.layers), stop - start, featureset.features.shape[2]), np.float32)
    token_features = None
    if featureset.token_features is not None:
        _, _, seq, dim = featureset.token_features.shape
        token_features = np.empty((len(spec.token_layers), stop - start, seq, dim), np.float32)
    palette_tokens = _palette_tokens(store, model, split, spec.dataset, spec.split)

    for batch_start in range(start, stop, batch):
        batch_stop = min(batch_start + batch, stop)
        rows = slice(batch_start - start, batch_stop - start)
        if palette_tokens is not None:
            batch_tokens = torch.from_numpy(palette_tokens[batch_start:batch_stop].astype(np.int64))
            pooled, tokens = model.features_from_tokens(batch_tokens, spec.layers, spec.pooling,
                                                        spec.token_layers)
        else:
            pooled, tokens = model.features(split.images[batch_start:batch_stop], spec.layers,
                                            spec.pooling, spec.token_layers)
        features[:, rows] = pooled.cpu().numpy()  # (n_layers, batch, dim)
        if token_features is not None and tokens is not None:
            if tokens.shape[2] != token_features.shape[2]:
                raise ModelError(
                    f"model {spec.model!r} produced {tokens.shape[2]} tokens per image, but "
                    f"feature set {featureset_id!r} expects {token_features.shape[2]}; the "
                    "processor resizes these images differently, so request without token_layers",
                    field="token_layers",
                    value=spec.token_layers,
                )
            token_features[:, rows] = tokens.cpu().numpy()  # (n_token_layers, batch, seq, dim)
        if on_batch is not None:
            on_batch(batch_stop - start, stop - start)

    featureset.write_block(block, features, token_features)
    seconds = time.perf_counter() - started
    logger.info(
        "feature set %s: block %d/%d written, %d rows in %.2fs (%.1f items/s)",
        featureset_id, block + 1, featureset.n_blocks, stop - start, seconds,
        (stop - start) / max(seconds, 1e-9),
    )
    return BlockResult(featureset_id, block, stop - start, seconds, skipped=False)
