"""Specifications that determine stored numbers, and the ids derived from them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from store.ids import content_id

# Bump when the meaning of stored numbers changes for an unchanged spec, so old ids are not reused.
LAYOUT_VERSION = 1

StoredDtype = Literal["float32", "float16"]


class FeatureSetSpec(BaseModel):
    """Everything that determines the numbers of a feature set.

    Two requests that resolve to the same spec share one feature set. The model is identified by
    its resolved revision (hub commit or weight-file hash), the dataset by its content fingerprint.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    model_revision: str
    model_family: str
    processor: dict[str, Any] = Field(default_factory=dict)
    dataset: str
    dataset_fingerprint: str
    split: str
    limit: int | None = None
    seed: int = 0
    image_column: str | None = None
    label_column: str | None = None
    layers: list[int]
    pooling: str
    dtype: StoredDtype = "float32"
    token_layers: list[int] = Field(default_factory=list)
    layout_version: int = LAYOUT_VERSION

    def featureset_id(self) -> str:
        """Return the content-addressed id of this spec."""
        data = self.model_dump()
        if not data["token_layers"]:
            # Specs without token-level features keep the ids they had before the field existed.
            del data["token_layers"]
        return content_id({"kind": "featureset", **data})


class ProbeSpec(BaseModel):
    """Everything that determines the numbers of a probe result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train_featureset: str
    test_featureset: str
    layers: list[int]
    kinds: list[str]
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    layout_version: int = LAYOUT_VERSION

    def probe_id(self) -> str:
        """Return the content-addressed id of this spec."""
        return content_id({"kind": "probe", **self.model_dump()})


# "adapter" trains Houlsby adapters on the images and model behind the feature sets
# (workers.adapters); the other kinds read the stored features.
PROBE_KINDS = ("logistic", "knn", "mlp", "adapter")
