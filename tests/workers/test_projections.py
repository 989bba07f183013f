"""2-D projections: method settings, determinism and request checks, without the service."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from workers.projections import (
    MIN_POINTS,
    ProjectionError,
    ProjectionSpec,
    check_request,
    project,
    tsne_perplexity,
)


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian clusters in 64 dimensions, 40 points each."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    centres = rng.normal(scale=10.0, size=(3, 64))
    return centres[labels] + rng.normal(size=(120, 64)), labels


def test_tsne_perplexity_clamped_to_points() -> None:
    assert tsne_perplexity(10) == 3.0
    assert tsne_perplexity(1000) == 30.0


def test_pca_coords_shape_and_dtype(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    coords, info = project(clustered[0], "pca", seed=0)
    assert coords.shape == (120, 2)
    assert coords.dtype == np.float32
    assert info["explained_variance_ratio"][0] > info["explained_variance_ratio"][1]


def test_tsne_same_seed_same_coords(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    first, info = project(clustered[0], "tsne", seed=3)
    second, _ = project(clustered[0], "tsne", seed=3)
    np.testing.assert_array_equal(first, second)
    assert info["perplexity"] == 30.0
    assert info["pca_dims"] == 50


def test_tsne_separates_clusters(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    features, labels = clustered
    coords, _ = project(features, "tsne", seed=0)
    centres = np.stack([coords[labels == c].mean(axis=0) for c in range(3)])
    spread = max(np.linalg.norm(coords[labels == c] - centres[c], axis=1).mean() for c in range(3))
    nearest_centres = min(
        np.linalg.norm(centres[a] - centres[b]) for a in range(3) for b in range(a + 1, 3)
    )
    assert nearest_centres > 2 * spread


def test_tsne_engine_is_opentsne_when_installed(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    _, info = project(clustered[0][:30], "tsne", seed=0)
    expected = "openTSNE" if importlib.util.find_spec("openTSNE") else "sklearn"
    assert info["engine"] == expected


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_check_request_too_few_points_names_minimum(method: str) -> None:
    needed = MIN_POINTS[method]
    with pytest.raises(ProjectionError, match=f"at least {needed} points") as caught:
        check_request(method, needed - 1)
    assert caught.value.field == "n_points"


@pytest.mark.skipif(importlib.util.find_spec("umap") is not None, reason="umap-learn installed")
def test_check_request_umap_missing_says_not_installed() -> None:
    with pytest.raises(ProjectionError, match="umap-learn package, which is not installed"):
        check_request("umap", 100)


def test_projection_id_depends_on_seed() -> None:
    spec = ProjectionSpec(featureset="a" * 24, layer=1, method="tsne", n_points=100, seed=0)
    same = ProjectionSpec(featureset="a" * 24, layer=1, method="tsne", n_points=100, seed=0)
    other = ProjectionSpec(featureset="a" * 24, layer=1, method="tsne", n_points=100, seed=1)
    assert spec.projection_id() == same.projection_id()
    assert spec.projection_id() != other.projection_id()


def test_check_request_small_featureset_names_its_size() -> None:
    with pytest.raises(ProjectionError) as info:
        check_request("tsne", 3, n_items=3)
    assert info.value.field == "featureset"
    assert "only 3 items" in info.value.message
