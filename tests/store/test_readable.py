"""A feature set written by layerbank reads back with plain zarr and xarray, no layerbank code.

The snippets are the Python blocks of the section "Reading the store without layerbank" in
docs/deployment.md, executed as written, so the documentation cannot drift from what works.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import zarr

from store import Store
from store.featureset import create_featureset
from store.spec import FeatureSetSpec

DOCS = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
SECTION = "## Reading the store without layerbank"
LAYERS, N_ITEMS, DIM = [0, 1, 3], 10, 4


def doc_snippets() -> list[str]:
    """Return the Python code blocks of the documentation section, in order."""
    text = DOCS.read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store root: a directory, or an fsspec URL as a bucket would be."""
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    name = f"layerbank-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    fsspec.filesystem("memory").rm(name, recursive=True)


@pytest.fixture()
def written(root: str) -> dict[str, Any]:
    """A complete feature set written through layerbank's store, and the numbers it holds."""
    spec = FeatureSetSpec(
        model="tiny-igpt",
        model_revision="rev-1",
        model_family="imagegpt",
        dataset="digits",
        dataset_fingerprint="0" * 16,
        split="test",
        layers=LAYERS,
        pooling="mean",
    )
    features = np.random.default_rng(0).standard_normal((len(LAYERS), N_ITEMS, DIM))
    labels = np.arange(N_ITEMS) % 3
    featureset = create_featureset(
        Store(root),
        spec,
        layer_map=[{"layer": layer, "description": f"hidden state {layer}"} for layer in LAYERS],
        dim=DIM,
        labels=labels,
        item_ids=np.arange(N_ITEMS),
        class_names=["a", "b", "c"],
        block_rows=4,
    )
    for block in range(featureset.n_blocks):
        start, stop = featureset.block_range(block)
        featureset.write_block(block, features[:, start:stop])
    assert featureset.mark_complete()
    return {
        "root": root,
        "featureset_id": featureset.id,
        "features": features.astype(np.float32),
        "labels": labels,
    }


def run_snippet(index: int, written: dict[str, Any]) -> dict[str, Any]:
    namespace = {"root": written["root"], "featureset_id": written["featureset_id"]}
    exec(doc_snippets()[index], namespace)  # noqa: S102 - the snippet is this repository's docs
    return namespace


def test_docs_readable_section_has_snippets() -> None:
    snippets = doc_snippets()
    assert len(snippets) == 2
    assert "zarr.open_group(" in snippets[0]
    assert "xr.open_zarr(" in snippets[1]


def test_zarr_snippet_reads_layer(written: dict[str, Any]) -> None:
    namespace = run_snippet(0, written)
    np.testing.assert_array_equal(namespace["layer_1"], written["features"][LAYERS.index(1)])


def test_zarr_snippet_reads_labels(written: dict[str, Any]) -> None:
    namespace = run_snippet(0, written)
    np.testing.assert_array_equal(namespace["labels"], written["labels"])
    assert namespace["layers"] == LAYERS


def test_zarr_snippet_rejects_pending_featureset(written: dict[str, Any]) -> None:
    featureset = Store(written["root"]).featureset(written["featureset_id"])
    group = zarr.open_group(featureset.store.zarr_store, path=featureset.path, mode="r+")
    group.attrs["status"] = "pending"
    with pytest.raises(RuntimeError, match="still being written"):
        run_snippet(0, written)


def test_xarray_snippet_dims_and_coords(written: dict[str, Any]) -> None:
    features = run_snippet(1, written)["features"]
    assert features.dims == ("layer", "item", "dim")
    assert features.shape == (len(LAYERS), N_ITEMS, DIM)
    assert features["layer"].values.tolist() == LAYERS
    np.testing.assert_array_equal(features["label"].values, written["labels"])


def test_xarray_snippet_reads_layer(written: dict[str, Any]) -> None:
    namespace = run_snippet(1, written)
    np.testing.assert_array_equal(namespace["layer_1_xr"], written["features"][LAYERS.index(1)])


def test_xarray_sees_attrs(written: dict[str, Any]) -> None:
    dataset = run_snippet(1, written)["dataset"]
    assert dataset.attrs["status"] == "complete"
    assert dataset.attrs["spec"]["pooling"] == "mean"
