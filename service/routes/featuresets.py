"""Feature sets: list, describe, and fetch layers and labels as .npy or JSON."""

from __future__ import annotations

import io
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Response

from service.deps import SettingsDep, StoreDep
from service.schemas import FeatureSetPublic, FeatureSetsPublic
from store import check_id

router = APIRouter(prefix="/v1/featuresets", tags=["featuresets"])

FormatQuery = Annotated[Literal["npy", "json"], Query(description="npy (default) or json")]
RowQuery = Annotated[int | None, Query(ge=0, description="first row (default 0)")]


@router.get("", response_model=FeatureSetsPublic)
def list_featuresets(store: StoreDep) -> FeatureSetsPublic:
    """All feature sets in the store with their status."""
    data = [FeatureSetPublic.model_validate(store.featureset(i).summary())
            for i in store.featureset_ids()]
    return FeatureSetsPublic(data=data, count=len(data))


@router.get("/{featureset_id}", response_model=FeatureSetPublic)
def read_featureset(featureset_id: str, store: StoreDep) -> FeatureSetPublic:
    """Spec, layer map, shape, dtype, status and progress of a feature set."""
    check_id(featureset_id, field="featureset_id")
    return FeatureSetPublic.model_validate(store.featureset(featureset_id).summary())


@router.get(
    "/{featureset_id}/layers/{layer}",
    responses={200: {"content": {"application/octet-stream": {}, "application/json": {}},
                     "description": "array of shape (rows, dim) as .npy, or JSON rows"}},
)
def read_layer(featureset_id: str, layer: int, store: StoreDep, settings: SettingsDep,
               start: RowQuery = None, stop: RowQuery = None,
               format: FormatQuery = "npy") -> Response:
    """One layer's (rows, dim) array as .npy, or as JSON for small slices."""
    check_id(featureset_id, field="featureset_id")
    featureset = store.featureset(featureset_id)
    featureset.require_complete()
    featureset.layer_position(layer)
    first, last = featureset.check_rows(start, stop)
    _check_row_limit(last - first, format, settings.max_rows_per_fetch, settings.max_json_rows)
    array = featureset.read_layer(layer, first, last)
    return _array_response(array, format, {"featureset_id": featureset_id, "layer": layer,
                                           "start": first, "stop": last})


@router.get("/{featureset_id}/labels")
def read_labels(featureset_id: str, store: StoreDep, settings: SettingsDep,
                start: RowQuery = None, stop: RowQuery = None,
                format: FormatQuery = "npy") -> Response:
    """Integer labels of the items, as .npy or JSON."""
    check_id(featureset_id, field="featureset_id")
    featureset = store.featureset(featureset_id)
    first, last = featureset.check_rows(start, stop)
    _check_row_limit(last - first, format, settings.max_rows_per_fetch, settings.max_json_rows)
    array = featureset.read_labels(first, last)
    return _array_response(array, format, {"featureset_id": featureset_id, "start": first,
                                           "stop": last})


def _check_row_limit(rows: int, format: str, max_rows: int, max_json_rows: int) -> None:
    limit = max_json_rows if format == "json" else max_rows
    if rows > limit:
        hint = "use format=npy or a smaller range" if format == "json" else "fetch in ranges"
        raise HTTPException(
            status_code=413,
            detail={"message": f"{rows} rows requested but at most {limit} rows may be fetched "
                    f"as {format} at once; {hint} with start/stop", "field": "stop",
                    "value": rows},
        )


def _array_response(array: np.ndarray, format: str, meta: dict[str, object]) -> Response:
    if format == "json":
        import json

        body = json.dumps({**meta, "shape": list(array.shape), "dtype": str(array.dtype),
                           "data": array.tolist()})
        return Response(body, media_type="application/json")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    payload = buffer.getvalue()
    return Response(payload, media_type="application/octet-stream",
                    headers={"Content-Length": str(len(payload))})
