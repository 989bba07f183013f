"""A worker whose LAYERBANK_DEVICE names a CUDA device this machine lacks does not start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
    result = subprocess.run(
        [sys.executable, "-m", "workers.main", "--burst"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: invalid LAYERBANK_DEVICE='{value}': "), lines[0]
    assert "LAYERBANK_DEVICE=auto" in lines[0]
    assert "cpu" in lines[0]


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
