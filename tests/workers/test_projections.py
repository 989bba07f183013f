"""2-D projections: method settings, determinism and request checks, without the service."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from store import FeatureSet, FeatureSetSpec, Store, create_featureset
from store.settings import Settings
from tests.factories import MetadataWrites
from workers.projections import (
    MIN_POINTS,
    DegenerateLayerError,
    ProjectionError,
    ProjectionSpec,
    check_request,
    project,
    run_projection,
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
        check_request("tsne", 3, n_items=3, featureset_id="b" * 24)
    assert info.value.field == "featureset"
    assert info.value.value == "b" * 24
    assert "only 3 items" in info.value.message
    assert repr("b" * 24) in info.value.message


def _pixels_featureset(store: Store, data_dir: Path, images: np.ndarray) -> FeatureSet:
    """Extract the "pixels" model's only layer (layer 0) from ``images`` saved as an .npz."""
    from workers.datasets import load_split
    from workers.extract import extract_block
    from workers.modelref import PIXELS, processor_spec, resolve_model

    labels = np.arange(len(images)) % 2
    path = data_dir / "images.npz"
    np.savez(path, images=images, labels=labels)
    split = load_split(f"npz:{path}", "all")
    ref = resolve_model(PIXELS, models_dir=None, allow_hub=False)
    spec = FeatureSetSpec(
        model=ref.ref,
        model_revision=ref.revision,
        model_family=ref.family,
        processor=processor_spec(ref, None),
        dataset=f"npz:{path}",
        dataset_fingerprint=split.fingerprint,
        split="all",
        limit=None,
        seed=0,
        layers=[0],
        pooling="mean",
    )
    featureset = create_featureset(
        store,
        spec,
        layer_map=ref.layer_map(spec.layers, spec.pooling),
        dim=int(split.images[0].size),
        labels=split.labels,
        item_ids=split.item_ids,
        class_names=split.class_names,
    )
    settings = Settings(store=str(store.root), device="cpu", allow_hub=False, data_roots=[data_dir])
    extract_block(store, featureset.id, 0, settings=settings)
    featureset.mark_complete()  # the extraction's finalize job does this in the service
    return store.featureset(featureset.id)


def _submit(store: Store, featureset: FeatureSet, method: str) -> str:
    """Store a pending projection of layer 0 as POST /v1/projections does, and return its id."""
    spec = ProjectionSpec(featureset=featureset.id, layer=0, method=method, n_points=40)
    projection_id = spec.projection_id()
    attrs = {"projection_id": projection_id, "spec": spec.model_dump(), "status": "pending"}
    store.write_result("projections", projection_id, attrs)
    return projection_id


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_run_projection_constant_layer_fails(tmp_path: Path, method: str) -> None:
    store = Store(tmp_path / "store")
    featureset = _pixels_featureset(store, tmp_path, np.zeros((40, 8, 8, 3), np.uint8))
    projection_id = _submit(store, featureset, method)
    with pytest.raises(DegenerateLayerError) as caught:
        run_projection(store, projection_id)
    assert caught.value.field == "layer"
    assert caught.value.value == 0
    assert caught.value.permanent
    assert "layer 0 has the same features for all 40 sampled items" in caught.value.message
    assert "no variance" in caught.value.message
    assert "project another layer" in caught.value.message
    stored = store.read_result("projections", projection_id)
    assert stored is not None
    assert stored["status"] == "pending"
    assert "coords" not in store.result_group("projections", projection_id, mode="r")


def test_run_projection_nan_coords_not_stored(tmp_path: Path) -> None:
    # Rows that differ only by float32 subnormals pass the variance check, but t-SNE divides
    # by a standard deviation that underflows, which gives NaN coordinates.
    store = Store(tmp_path / "store")
    featureset = _pixels_featureset(store, tmp_path, np.zeros((40, 8, 8, 3), np.uint8))
    rng = np.random.default_rng(0)
    tiny = (rng.integers(0, 2, size=(1, 40, 8 * 8 * 3)) * 1e-45).astype(np.float32)
    assert np.any(tiny != 0)
    featureset.write_block(0, tiny)
    projection_id = _submit(store, featureset, "tsne")
    with pytest.raises(DegenerateLayerError) as caught:
        run_projection(store, projection_id)
    assert caught.value.field == "layer"
    assert "coordinates are NaN or infinite" in caught.value.message
    assert "another layer" in caught.value.message
    stored = store.read_result("projections", projection_id)
    assert stored is not None
    assert stored["status"] == "pending"


def test_run_projection_varying_layer_completes(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    featureset = _pixels_featureset(store, tmp_path, images)
    projection_id = _submit(store, featureset, "pca")
    run_projection(store, projection_id)
    stored = store.read_result("projections", projection_id)
    assert stored is not None
    assert stored["status"] == "complete"
    assert np.all(np.isfinite(stored["info"]["explained_variance_ratio"]))


def test_run_projection_writes_attributes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The complete status goes with the coordinates' description in one write, so a killed
    worker cannot leave a projection marked complete without them."""
    store = Store(tmp_path / "store")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    projection_id = _submit(store, _pixels_featureset(store, tmp_path, images), "pca")
    writes = MetadataWrites(store, f"projections/{projection_id}/zarr.json", monkeypatch)

    run_projection(store, projection_id)

    assert len(writes.attribute_keys) == 1
    assert {"status", "n_points", "info", "class_names"} <= writes.attribute_keys[0]
