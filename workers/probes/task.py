"""A validated probe request: features, encoded labels, layers and the validation split."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from workers.errors import ProbeError
from workers.probes.metrics import classification_metrics
from workers.probes.settings import (
    read_val_fraction,
    require_validation_items,
    validation_count,
)

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class LayerArray(Protocol):
    """A numpy or zarr array of shape (n_layers_stored, n_items, dim), indexed per layer."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any) -> Any: ...


@dataclass(frozen=True)
class ProbeTask:
    """Everything an engine needs to fit one kind of probe on several layers.

    Labels are encoded as class indices ``0..n_classes-1`` in the order of ``classes`` (the
    sorted distinct train labels); metrics and confusion matrices use that order.
    """

    kind: str
    train: LayerArray
    test: LayerArray
    y_train: np.ndarray  # (n_train,) class indices
    y_test: np.ndarray  # (n_test,) class indices
    classes: np.ndarray  # (n_classes,) original label values
    class_names: list[str] | None
    layers: list[int]
    seed: int
    device: str
    fit_part: np.ndarray  # indices into train: the part that is fitted during validation
    val_part: np.ndarray  # indices into train: the part that scores each grid value
    progress: Progress | None = None
    # Called often while a fit runs (between iterations); it raises to stop the fit.
    check: Callable[[], None] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def dim(self) -> int:
        return int(self.train.shape[2])

    def read_layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Train and test features of one stored layer as float32 arrays of shape (n, dim)."""
        return _read(self.train, layer, "train"), _read(self.test, layer, "test")

    def check_running(self) -> None:
        """Call ``check``, which raises when the fit must stop (its job was canceled)."""
        if self.check is not None:
            self.check()

    def report_progress(self, done: int) -> None:
        """Tell the caller that ``done`` of the requested layers are finished."""
        logger.debug("%s probe: %d/%d layers done", self.kind, done, len(self.layers))
        if self.progress is not None:
            self.progress(done, len(self.layers))

    def layer_result(
        self,
        layer: int,
        *,
        engine: str,
        test_pred: np.ndarray,
        train_accuracy: float,
        val_accuracy: float,
        params: dict[str, Any],
        grid: list[dict[str, Any]],
        converged: bool,
        n_iter: int | None,
        fit_seconds: float,
        warnings: list[str],
    ) -> dict[str, Any]:
        """Build the JSON-ready result of one layer and compute its test metrics."""
        metrics = classification_metrics(self.y_test, test_pred, self.n_classes, seed=self.seed)
        return {
            "kind": self.kind,
            "layer": int(layer),
            "engine": engine,
            "train_accuracy": float(train_accuracy),
            "val_accuracy": float(val_accuracy),
            **metrics,
            "params": params,
            "grid": grid,
            "converged": bool(converged),
            "n_iter": None if n_iter is None else int(n_iter),
            "fit_seconds": float(fit_seconds),
            "warnings": list(warnings),
            "classes": self.classes.tolist(),
            "class_names": self.class_names,
            "n_train": len(self.y_train),
            "n_val": len(self.val_part),
            "n_test": len(self.y_test),
            "seed": self.seed,
        }


def _read(features: LayerArray, layer: int, name: str) -> np.ndarray:
    values = np.asarray(features[layer], dtype=np.float32)  # (n_items, dim)
    if np.isnan(values).any():
        rows = int(np.isnan(values).any(axis=1).sum())
        raise ProbeError(
            f"{name} features of layer {layer} contain NaN in {rows} of {len(values)} rows; "
            "the feature set is probably incomplete (extraction unfinished or a block lost); "
            "wait for the extraction to finish or resume it",
            field=name,
            value=layer,
        )
    if np.isinf(values).any():
        raise ProbeError(
            f"{name} features of layer {layer} contain infinite values; "
            "re-extract the feature set with float32 storage",
            field=name,
            value=layer,
        )
    return values


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split item indices into a fit part and a validation part, class by class.

    Each class sends ``round(fraction * count)`` of its items to validation but keeps at
    least one for fitting. Both index arrays are sorted.
    """
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val.append(idx[: validation_count(len(idx), fraction)])
    val_part = np.sort(np.concatenate(val))
    fit_part = np.setdiff1d(np.arange(len(y)), val_part)
    return fit_part, val_part


def check_classes(
    y_train: np.ndarray, y_test: np.ndarray, train_name: str = "y_train", test_name: str = "y_test"
) -> np.ndarray:
    """Return the sorted classes of ``y_train``.

    Raises ProbeError unless there are at least two and they include every class of
    ``y_test``. ``train_name`` and ``test_name`` name the two label sets in the messages.
    """
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise ProbeError(
            f"{train_name} contains {len(classes)} class(es) {classes.tolist()}; a probe needs "
            "at least 2, so pass labels of two or more classes",
            field=train_name,
            value=classes.tolist(),
        )
    unseen = np.setdiff1d(np.unique(y_test), classes)
    if len(unseen):
        raise ProbeError(
            f"{test_name} contains labels {unseen.tolist()} that are missing from {train_name}; "
            "probe on a train set that covers every test class",
            field=test_name,
            value=unseen.tolist(),
        )
    return classes


def prepare_task(
    kind: str,
    train: LayerArray,
    y_train: np.ndarray,
    test: LayerArray,
    y_test: np.ndarray,
    *,
    layers: Sequence[int],
    params: Mapping[str, Any],
    seed: int,
    class_names: list[str] | None,
    device: str,
    progress: Progress | None,
    check: Callable[[], None] | None = None,
) -> ProbeTask:
    """Validate a probe request and build its :class:`ProbeTask`; reads no features."""
    _check_shapes(train, test)
    y_tr = _labels(y_train, "y_train", int(train.shape[1]))
    y_te = _labels(y_test, "y_test", int(test.shape[1]))
    layer_list = _layers(layers, int(train.shape[0]))
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ProbeError(
            f"seed must be a non-negative integer, got {seed!r}", field="seed", value=seed
        )

    classes = check_classes(y_tr, y_te)
    if class_names is not None and (classes.min() < 0 or classes.max() >= len(class_names)):
        raise ProbeError(
            f"class_names has {len(class_names)} names but the labels span "
            f"{classes.min()}..{classes.max()}; pass one name per label value",
            field="class_names",
            value=len(class_names),
        )

    fraction = read_val_fraction(params)
    fit_part, val_part = stratified_split(y_tr, fraction, seed)
    require_validation_items(len(val_part), fraction, y_tr)
    names = None if class_names is None else [str(class_names[c]) for c in classes]
    return ProbeTask(
        kind=kind,
        train=train,
        test=test,
        y_train=np.searchsorted(classes, y_tr),
        y_test=np.searchsorted(classes, y_te),
        classes=classes,
        class_names=names,
        layers=layer_list,
        seed=int(seed),
        device=device,
        fit_part=fit_part,
        val_part=val_part,
        progress=progress,
        check=check,
    )


def _check_shapes(train: LayerArray, test: LayerArray) -> None:
    for name, features in (("train", train), ("test", test)):
        if len(features.shape) != 3:
            raise ProbeError(
                f"{name} features have shape {tuple(features.shape)}; "
                "expected (n_layers, n_items, dim)",
                field=name,
                value=tuple(features.shape),
            )
    if train.shape[0] != test.shape[0] or train.shape[2] != test.shape[2]:
        raise ProbeError(
            f"test features (n_layers, n_items, dim) = {tuple(test.shape)} do not match train "
            f"{tuple(train.shape)} in n_layers or dim; probe feature sets of the same model, "
            "layers and pooling",
            field="test",
            value=tuple(test.shape),
        )


def _labels(y: np.ndarray, name: str, n_items: int) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ProbeError(
            f"{name} must be a 1-d integer array, got dtype {labels.dtype} and shape "
            f"{labels.shape}",
            field=name,
            value=str(labels.dtype),
        )
    if len(labels) != n_items:
        raise ProbeError(
            f"{name} has {len(labels)} labels but the features have {n_items} items",
            field=name,
            value=len(labels),
        )
    return labels.astype(np.int64)


def _layers(layers: Sequence[int], n_stored: int) -> list[int]:
    if len(layers) == 0:
        raise ProbeError("layers is empty; pass at least one layer index", field="layers", value=[])
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
            raise ProbeError(
                f"layer {layer!r} is not an integer index", field="layers", value=layer
            )
        if not 0 <= layer < n_stored:
            raise ProbeError(
                f"layer {layer} is out of range for a feature set with {n_stored} stored layers "
                f"(0..{n_stored - 1}); pass indices in that range",
                field="layers",
                value=int(layer),
            )
        out.append(int(layer))
    if len(set(out)) != len(out):
        raise ProbeError(
            f"layers {out} repeat an index; pass each layer once", field="layers", value=out
        )
    return out
