"""Layer and label reads as JSON: the body is strict JSON for every stored value."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.routes.featuresets import _array_response


def test_json_layer_read_writes_null_for_non_finite() -> None:
    """JSON has no NaN or Infinity, so a non-finite value read from an older store is null."""
    array = np.array([[1.5, np.nan], [np.inf, -2.0]], dtype=np.float32)
    response = _array_response(array, "json", {"featureset_id": "x"})
    body = json.loads(response.body, parse_constant=lambda name: pytest.fail(name))
    assert body["data"] == [[1.5, None], [None, -2.0]]
    assert body["shape"] == [2, 2]
