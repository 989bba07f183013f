"""The data model of layerbank: specs, ids, the Zarr layout and stored results.

Imports numpy, zarr and pydantic only, never torch, so the API process stays light.
"""

from store.errors import (
    DamagedChunkError,
    DamagedCreationArrayError,
    DamagedMetadataError,
    IncompleteFeatureSetError,
    InvalidIdError,
    LayoutError,
    NonFiniteFeaturesError,
    NotFoundError,
    NotReadyError,
    StoreError,
)
from store.featureset import FeatureSet, Progress, create_featureset, default_block_rows
from store.ids import check_id, check_name, content_id
from store.root import Store
from store.spec import FeatureSetSpec, ProbeSpec

__all__ = [
    "DamagedChunkError",
    "DamagedCreationArrayError",
    "DamagedMetadataError",
    "FeatureSet",
    "FeatureSetSpec",
    "IncompleteFeatureSetError",
    "InvalidIdError",
    "LayoutError",
    "NonFiniteFeaturesError",
    "NotFoundError",
    "NotReadyError",
    "ProbeSpec",
    "Progress",
    "Store",
    "StoreError",
    "check_id",
    "check_name",
    "content_id",
    "create_featureset",
    "default_block_rows",
]
