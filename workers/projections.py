"""2-D projections of one stored layer: PCA, t-SNE or UMAP of a stratified subsample.

A projection is content-addressed like a probe: the same feature set, layer, method, number of
points and seed give the same id. Its group ``projections/<id>/`` contains

``coords``
    float32 array of shape (n_points, 2).
``item_indices``
    int64 array of shape (n_points,): row positions in the feature set.
``labels``
    int64 array of shape (n_points,): the feature set's labels of those rows.

and attributes with the spec, the engine that ran, its settings and ``status``. The arrays are
written before ``status`` becomes "complete", so a complete status never covers missing data.

This module imports numpy and pydantic only at the top, so the API can validate requests
with it; scikit-learn, openTSNE and umap-learn are imported inside the functions that use them.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from store import Store, content_id
from store.spec import LAYOUT_VERSION
from workers.datasets.split import select_stratified
from workers.errors import WorkersError

__all__ = [
    "METHODS",
    "MIN_POINTS",
    "PCA_DIMS_BEFORE_TSNE",
    "DegenerateLayerError",
    "ProjectionError",
    "ProjectionSpec",
    "method_available",
    "project",
    "run_projection",
    "tsne_perplexity",
]

logger = logging.getLogger(__name__)

Method = Literal["pca", "tsne", "umap"]
METHODS: tuple[str, ...] = ("pca", "tsne", "umap")
# Fewest points each method accepts. t-SNE's perplexity min(30, (n - 1) / 3) must leave each
# point at least three neighbours; UMAP's default of 15 neighbours needs 16 points.
MIN_POINTS = {"pca": 3, "tsne": 10, "umap": 16}
PCA_DIMS_BEFORE_TSNE = 50
MAX_PERPLEXITY = 30.0
UMAP_NEIGHBORS = 15


class ProjectionError(WorkersError):
    """Raised when a projection request cannot be computed (too few points, missing package)."""


class DegenerateLayerError(ProjectionError):
    """Raised when a layer's features give no usable projection: every sampled item has the
    same features, or the method returns NaN or infinite coordinates."""

    permanent = True


class ProjectionSpec(BaseModel):
    """Everything that determines the coordinates of a projection."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    featureset: str
    layer: int
    method: Method
    n_points: int
    seed: int = 0
    layout_version: int = LAYOUT_VERSION

    def projection_id(self) -> str:
        """Return the content-addressed id of this spec."""
        return content_id({"kind": "projection", **self.model_dump()})


def method_available(method: str) -> bool:
    """Return whether the package ``method`` needs is importable (UMAP needs umap-learn)."""
    if method == "umap":
        return importlib.util.find_spec("umap") is not None
    return method in METHODS


def check_request(
    method: str, n_points: int, n_items: int | None = None, featureset_id: str | None = None
) -> None:
    """Raise `ProjectionError` when ``method`` cannot run here or ``n_points`` is too few.

    ``n_items`` is the size of feature set ``featureset_id`` when it, not the request,
    limited ``n_points``.
    """
    if method not in METHODS:
        raise ProjectionError(
            f"method {method!r} is unknown; choose one of {', '.join(METHODS)}",
            field="method",
            value=method,
        )
    if not method_available(method):
        raise ProjectionError(
            f"method {method!r} needs the umap-learn package, which is not installed on this "
            "service; install umap-learn in the workers' and the API's environment, or use "
            '"tsne" or "pca"',
            field="method",
            value=method,
        )
    needed = MIN_POINTS[method]
    if n_points < needed and n_items is not None and n_items == n_points:
        raise ProjectionError(
            f"feature set {featureset_id!r} has only {n_items} items, too few for {method}, "
            f"which needs at least {needed} points; project a feature set with at least "
            f"{needed} items",
            field="featureset",
            value=featureset_id,
        )
    if n_points < needed:
        raise ProjectionError(
            f"n_points {n_points!r} is too few for {method}: it needs at least {needed} points; "
            f"pass n_points >= {needed} (and a feature set with that many items)",
            field="n_points",
            value=n_points,
        )


def tsne_perplexity(n_points: int) -> float:
    """Return the t-SNE perplexity for ``n_points`` points: min(30, (n_points - 1) / 3)."""
    return min(MAX_PERPLEXITY, (n_points - 1) / 3.0)


def tsne_engine() -> str:
    """Return "openTSNE" when that package is installed, else "sklearn"."""
    return "openTSNE" if importlib.util.find_spec("openTSNE") is not None else "sklearn"


def project(features: np.ndarray, method: str, *, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Project features to two dimensions.

    Parameters
    ----------
    features
        float array of shape (n_points, dim).
    method
        ``"pca"``; ``"tsne"`` (PCA to at most 50 dimensions first, perplexity
        min(30, (n_points - 1) / 3), openTSNE when installed, else scikit-learn); or ``"umap"``
        (umap-learn, 15 neighbours or fewer for small sets).
    seed
        Seeds every random draw of the method.

    Returns
    -------
    coords
        float32 array of shape (n_points, 2).
    info
        JSON-ready settings of the run: ``engine`` and the method's parameters.
    """
    n_points = len(features)
    check_request(method, n_points)
    features = np.asarray(features, dtype=np.float64)
    if method == "pca":
        return _pca(features, 2, seed)

    reduced, pca_info = _pca(features, min(PCA_DIMS_BEFORE_TSNE, *features.shape), seed)
    if method == "tsne":
        coords, info = _tsne(reduced, seed)
    else:
        coords, info = _umap(reduced, seed)
    info["pca_dims"] = pca_info["n_components"]
    return coords, info


def _pca(features: np.ndarray, n_components: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    from sklearn.decomposition import PCA

    n_components = min(n_components, *features.shape)
    pca = PCA(n_components=n_components, random_state=seed)
    coords = pca.fit_transform(features)  # (n_points, n_components)
    if coords.shape[1] < 2:
        # One feature dimension: pad so the result keeps its (n_points, 2) shape.
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    info = {
        "engine": "sklearn",
        "n_components": int(n_components),
        "explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio_[:2]],
    }
    return coords.astype(np.float32), info


def _tsne(features: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    perplexity = tsne_perplexity(len(features))
    engine = tsne_engine()
    if engine == "openTSNE":
        from openTSNE import TSNE as OpenTSNE

        embedding = OpenTSNE(
            n_components=2, perplexity=perplexity, random_state=seed, n_jobs=1, verbose=False
        ).fit(features)
        coords = np.asarray(embedding)
    else:
        from sklearn.manifold import TSNE

        coords = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=seed
        ).fit_transform(features)
    return coords.astype(np.float32), {"engine": engine, "perplexity": perplexity}


def _umap(features: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    import umap

    neighbors = min(UMAP_NEIGHBORS, len(features) - 1)
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbors, random_state=seed)
    coords = reducer.fit_transform(features)
    return np.asarray(coords, dtype=np.float32), {"engine": "umap-learn", "n_neighbors": neighbors}


def check_features_vary(features: np.ndarray, layer: int) -> None:
    """Raise `DegenerateLayerError` when all rows of ``features`` (n_points, dim) are equal.

    PCA divides by the total variance and t-SNE scales by a standard deviation, so a layer
    without variance would give NaN coordinates or ratios.
    """
    if len(features) > 0 and not np.any(features != features[0]):
        raise DegenerateLayerError(
            f"layer {layer} has the same features for all {len(features)} sampled items, so "
            "it has no variance to project (for example a dataset whose images are all "
            "identical); project another layer, or extract features from images that differ",
            field="layer",
            value=layer,
        )


def check_result_finite(coords: np.ndarray, info: dict[str, Any], method: str, layer: int) -> None:
    """Raise `DegenerateLayerError` when ``coords`` or PCA's explained variance ratios contain
    NaN or infinity, so that such a result is never stored as complete."""
    n_non_finite = int(np.count_nonzero(~np.isfinite(coords)))
    ratios = np.asarray(info.get("explained_variance_ratio", []), dtype=np.float64)
    if n_non_finite == 0 and np.all(np.isfinite(ratios)):
        return
    found = (
        f"{n_non_finite} of its {coords.size} coordinates are NaN or infinite"
        if n_non_finite
        else "its explained variance ratios are NaN or infinite"
    )
    raise DegenerateLayerError(
        f"the {method} projection of layer {layer} failed: {found}, because the layer's "
        "features vary too little (or are too large) for floating-point arithmetic; project "
        "another layer, or try another method",
        field="layer",
        value=layer,
    )


def run_projection(
    store: Store, projection_id: str, *, check_canceled: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Compute the projection ``projection_id`` from its stored spec and write its arrays.

    ``check_canceled`` is called after the features are read and again before anything is
    written; it raises to stop a canceled job, which then writes nothing.

    Returns
    -------
    dict
        ``projection_id``, ``n_points``, ``engine`` and ``seconds``.
    """
    attrs = store.read_result("projections", projection_id)
    if attrs is None or "spec" not in attrs:
        raise ProjectionError(
            f"projection {projection_id!r} has no stored spec; create it with POST /v1/projections",
            field="projection_id",
            value=projection_id,
        )
    spec = ProjectionSpec.model_validate(attrs["spec"])
    started = time.perf_counter()
    featureset = store.featureset(spec.featureset)
    featureset.require_complete()
    labels = featureset.read_labels()  # (n_items,)
    n_points = min(spec.n_points, len(labels))
    indices = select_stratified(labels, n_points, spec.seed)  # (n_points,) sorted rows
    position = featureset.layer_position(spec.layer)
    # One read of the layer, then the rows: orthogonal indexing of a zarr array row by row is
    # slower than a full read for the layer sizes a projection is meant for.
    features = featureset.read_position(position)[indices]  # (n_points, dim)
    if check_canceled is not None:
        check_canceled()
    check_features_vary(features, spec.layer)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Nearly constant features make the methods divide 0 by 0. The check below turns the
        # resulting NaN into an error naming the layer, so numpy's warning adds nothing.
        coords, info = project(features, spec.method, seed=spec.seed)
    check_result_finite(coords, info, spec.method, spec.layer)
    if check_canceled is not None:
        check_canceled()

    group = store.result_group("projections", projection_id)
    group.create_array("coords", data=coords, overwrite=True)
    group.create_array("item_indices", data=indices.astype(np.int64), overwrite=True)
    group.create_array("labels", data=labels[indices].astype(np.int64), overwrite=True)
    seconds = time.perf_counter() - started
    # One write of the group's metadata: a per-key update could leave "complete" without the
    # keys after it if the worker is killed in between.
    group.update_attributes(
        {
            "status": "complete",
            "n_points": int(n_points),
            "info": info,
            "class_names": list(featureset.attrs.get("class_names") or []),
            "seconds": round(seconds, 3),
        }
    )
    logger.info(
        "projection %s: %s of %d points in %.1fs (%s)",
        projection_id,
        spec.method,
        n_points,
        seconds,
        info["engine"],
    )
    return {
        "projection_id": projection_id,
        "n_points": int(n_points),
        "engine": info["engine"],
        "seconds": round(seconds, 3),
    }
