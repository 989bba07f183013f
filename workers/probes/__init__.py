"""Probe engines: how well does each layer's representation separate the classes?

:func:`fit_probes` fits one kind of probe on several stored layers of a train feature set and
scores it on a test feature set. Every kind follows the same protocol: a stratified, seeded
validation part of train (``params["val_fraction"]``, default 0.2) chooses the
hyper-parameter, the probe is refitted on all of train with that value (the MLP keeps its
best-validation weights instead), and the test items give the metrics.

Parameters per kind (all optional; unknown names are rejected):

- ``logistic``: ``engine`` ("sklearn" reference, or "torch" batched L-BFGS), ``C`` (number or
  list, default [0.01, 0.1, 1, 10, 100]), ``max_iter`` (5000 sklearn, 1000 torch), ``tol``
  (1e-5 sklearn, 1e-6 torch), and for the torch engine ``dtype`` (float64), ``layer_batch``,
  ``c_batch``, ``history_size``.
  See :mod:`workers.probes.logistic`.
- ``knn``: ``k`` (number or list, default [1, 5, 10, 20, 50, 100, 200]), ``temperature``
  (0.07), ``chunk_size``, ``train_eval_items``. See :mod:`workers.probes.knn`.
- ``mlp``: ``hidden`` (256), ``dropout`` (0.2), ``lr`` (1e-3), ``weight_decay`` (0.01),
  ``max_epochs`` (200), ``patience`` (20), ``batch_size`` (256). See :mod:`workers.probes.mlp`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from workers.errors import ProbeError
from workers.probes.task import LayerArray, ProbeTask, prepare_task

__all__ = ["PROBE_KINDS", "fit_probes"]

logger = logging.getLogger(__name__)

PROBE_KINDS = ("logistic", "knn", "mlp")


def _engine(kind: str) -> Callable[[ProbeTask, dict[str, Any]], list[dict[str, Any]]]:
    # Imported here: the engines import torch, and the API imports this package for
    # workers.probes.settings without ever loading torch.
    from workers.probes.knn import fit_knn
    from workers.probes.logistic import fit_logistic
    from workers.probes.mlp import fit_mlp

    return {"logistic": fit_logistic, "knn": fit_knn, "mlp": fit_mlp}[kind]


def fit_probes(
    kind: str,
    train: LayerArray,
    y_train: np.ndarray,
    test: LayerArray,
    y_test: np.ndarray,
    *,
    layers: list[int],
    params: Mapping[str, Any],
    seed: int = 0,
    class_names: list[str] | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    check: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Fit probes of one kind on several layers and score them on the test items.

    Parameters
    ----------
    kind
        One of :data:`PROBE_KINDS`.
    train, test
        Features, numpy or zarr arrays of shape (n_layers_stored, n_items, dim), float16 or
        float32; only the requested layers are read, one at a time (or one batch of layers).
    y_train, y_test
        Integer labels of shapes (n_train,) and (n_test,); every test label must occur in train.
    layers
        Indices into axis 0 of ``train`` and ``test``.
    params
        Hyper-parameters of the kind (module docstring); a list value is a grid searched on
        the validation part.
    seed
        Seeds the validation split, the bootstrap and every random draw of the engines.
    class_names
        Names indexed by label value, copied into each result for the classes present.
    device
        Torch device of the torch engines ("cpu", "cuda", "cuda:1"); the sklearn engine runs
        on the CPU.
    progress
        Called as ``progress(done, total)`` after each layer or batch of layers.
    check
        Called without arguments between the iterations of a fit (the torch logistic engine)
        or between fits; it stops the run by raising, for instance when its job was canceled.

    Returns
    -------
    list of dict
        One JSON-ready dict per requested layer, in request order: ``kind``, ``layer``,
        ``engine``, ``train_accuracy``, ``val_accuracy``, ``test_accuracy``,
        ``test_accuracy_ci95`` ([lo, hi], 1000 seeded bootstrap resamples of the test items),
        ``macro_f1``, ``per_class_accuracy``, ``confusion_matrix`` (rows = true class, in the
        order of ``classes``), ``params`` (the chosen values), ``grid`` (validation accuracy of
        each grid value), ``converged``, ``n_iter``, ``fit_seconds``, ``warnings``,
        ``classes``, ``class_names``, ``n_train``, ``n_val``, ``n_test`` and ``seed``.

    Raises
    ------
    ProbeError
        For an unknown kind or parameter, an invalid parameter value, mismatched shapes,
        labels or layers, or features that contain NaN (an incomplete feature set). Its
        ``field`` names the culprit.
    """
    if kind not in PROBE_KINDS:
        raise ProbeError(
            f"unknown probe kind {kind!r}; use one of {', '.join(PROBE_KINDS)}",
            field="kind",
            value=kind,
        )
    if not isinstance(params, Mapping):
        raise ProbeError(
            f"params must be a mapping of names to values, got {params!r}",
            field="params",
            value=params,
        )
    from workers.probes.device import resolve_device

    resolve_device(device)
    task = prepare_task(
        kind,
        train,
        y_train,
        test,
        y_test,
        layers=layers,
        params=params,
        seed=seed,
        class_names=class_names,
        device=device,
        progress=progress,
        check=check,
    )

    start = time.perf_counter()
    logger.info(
        "%s probe: %d layers, %d train / %d test items, %d classes",
        kind,
        len(task.layers),
        len(task.y_train),
        len(task.y_test),
        task.n_classes,
    )
    results = _engine(kind)(task, dict(params))
    logger.info("%s probe: finished in %.1f s", kind, time.perf_counter() - start)
    return results
