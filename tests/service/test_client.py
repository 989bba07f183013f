"""The Python client's .npy reader: any split of the body into pieces, and bodies that end
early or run long."""

from __future__ import annotations

import io

import numpy as np
import pytest

from service.client import IncompleteBodyError, _read_npy


def _npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    return buffer.getvalue()


def _split(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [1, 7, 64, 1000, 10**6])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_read_npy_any_piece_size(size: int, version: tuple[int, int]) -> None:
    array = np.random.default_rng(0).standard_normal((37, 5)).astype(np.float16)
    got = _read_npy(_split(_npy(array, version), size))
    assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)


def test_read_npy_empty_array() -> None:
    array = np.zeros((0, 4), dtype=np.float32)
    assert _read_npy([_npy(array)]).shape == (0, 4)


def test_read_npy_short_body_raises() -> None:
    body = _npy(np.ones((10, 4), dtype=np.float32))
    with pytest.raises(IncompleteBodyError, match="received 120 of the array's 160 bytes"):
        _read_npy(_split(body[:-40], 16))


def test_read_npy_body_ends_in_header() -> None:
    body = _npy(np.ones((10, 4), dtype=np.float32))
    with pytest.raises(IncompleteBodyError, match="ended in the .npy header"):
        _read_npy([body[:30]])


def test_read_npy_long_body_raises() -> None:
    body = _npy(np.ones((10, 4), dtype=np.float32))
    with pytest.raises(IncompleteBodyError, match="longer than its 160-byte array"):
        _read_npy(_split(body + b"extra", 50))


def test_read_npy_not_npy_raises() -> None:
    with pytest.raises(ValueError, match="not an .npy array"):
        _read_npy([b'{"detail": "not an array"}'])


@pytest.mark.parametrize("bad_id", ["../../etc", "a b", "ABC"])
def test_client_rejects_invalid_path_ids(bad_id: str) -> None:
    """An id that is not one is a 422 naming the field, before httpx resolves ``..`` in it."""
    from service.client import Client, ClientError

    # Nothing listens on this address: the check must fail before any request is sent.
    client = Client("http://127.0.0.1:9", retries=0)
    for call, field in (
        (client.cancel, "job_id"),
        (client.featureset, "featureset_id"),
        (client.curve, "probe_id"),
        (client.projection_result, "projection_id"),
    ):
        with pytest.raises(ClientError) as caught:
            call(bad_id)
        assert caught.value.status_code == 422
        assert caught.value.detail["field"] == field
        assert repr(bad_id) in str(caught.value)
