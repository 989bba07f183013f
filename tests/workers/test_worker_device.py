"""A worker whose LAYERBANK_DEVICE names a CUDA device this machine lacks does not start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.factories import one_error_line


def _cuda_count() -> int:
    torch = pytest.importorskip("torch")
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("index", [None, 0, 3])
def test_missing_cuda_device_stops_worker(
    tmp_path: Path, redis_server: object, index: int | None
) -> None:
    count = _cuda_count()
    if index is None and count > 0 or index is not None and index < count:
        pytest.skip("this machine has the CUDA device")
    value = "cuda" if index is None else f"cuda:{index}"
    env = {key: val for key, val in os.environ.items() if not key.startswith("LAYERBANK_")}
    env["REDIS_URL"] = redis_server.url  # type: ignore[attr-defined]
    env["LAYERBANK_STORE"] = str(tmp_path / "store")
    env["LAYERBANK_DEVICE"] = value
    line = one_error_line(["-m", "workers.main", "--burst"], env)
    assert line.startswith(f"error: invalid LAYERBANK_DEVICE='{value}': "), line
    assert "LAYERBANK_DEVICE=auto" in line
    assert "cpu" in line


def test_cuda_index_beyond_count_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with two GPUs, cuda:2 is rejected and cuda:1 accepted."""
    torch = pytest.importorskip("torch")
    from store.settings import SettingsError
    from workers.main import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SettingsError) as caught:
        check_device("cuda:2")
    message = str(caught.value)
    assert message.startswith("invalid LAYERBANK_DEVICE='cuda:2': ")
    assert "cuda:0 to cuda:1" in message
    check_device("cuda:1")
    check_device("cuda")
    check_device("cpu")
