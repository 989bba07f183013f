"""Upper bounds of probe parameters, divergence checks and the adapter memory estimate."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from store.settings import Settings
from workers.errors import ProbeError
from workers.probes import settings as probe_settings

READERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "mlp": probe_settings.read_mlp_settings,
    "adapter": probe_settings.read_adapter_settings,
    "logistic": probe_settings.read_logistic_settings,
}

# The default of LAYERBANK_ADAPTER_FIT_GIB, in bytes.
LIMIT = int(Settings().adapter_fit_gib * 2**30)


@pytest.mark.parametrize(
    ("kind", "params", "field"),
    [
        ("mlp", {"lr": 1e300}, "lr"),
        ("mlp", {"lr": 1e30}, "lr"),
        ("mlp", {"weight_decay": 1e300}, "weight_decay"),
        ("mlp", {"batch_size": 65536}, "batch_size"),
        ("adapter", {"weight_decay": 1e300}, "weight_decay"),
        ("adapter", {"bottleneck": 65536}, "bottleneck"),
        ("adapter", {"batch_size": 65536}, "batch_size"),
        ("logistic", {"engine": "torch", "history_size": 10**9}, "history_size"),
        ("logistic", {"engine": "torch", "layer_batch": 10**9}, "layer_batch"),
        ("logistic", {"engine": "torch", "c_batch": 10**9}, "c_batch"),
        ("logistic", {"max_iter": 1e12}, "max_iter"),
        ("logistic", {"engine": "torch", "max_iter": 100_001}, "max_iter"),
    ],
)
def test_reader_rejects_huge_value(kind: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(ProbeError) as info:
        READERS[kind](params)

    assert info.value.field == field
    assert info.value.value == params[field]
    assert f"{field}={params[field]!r}" in info.value.message
    assert "pass" in info.value.message


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("mlp", {"lr": 1.0, "weight_decay": 1.0, "batch_size": 8192}),
        ("adapter", {"lr": 1.0, "weight_decay": 1.0, "bottleneck": 4096, "batch_size": 4096}),
        (
            "logistic",
            {
                "engine": "torch",
                "history_size": 100,
                "layer_batch": 128,
                "c_batch": 100,
                "max_iter": 100_000,
            },
        ),
        ("logistic", {"max_iter": 100_000}),
    ],
)
def test_reader_accepts_values_at_bounds(kind: str, params: dict[str, Any]) -> None:
    READERS[kind](params)


@pytest.mark.parametrize("engine", ["sklearn", "torch"])
@pytest.mark.parametrize("c", [0.0, -1.0, 5e-324, 1e-300, 9.9e-13])
def test_logistic_c_below_the_floor_rejected(engine: str, c: float) -> None:
    """Every C below the floor is rejected before fitting. A C whose penalty overflows
    (5e-324) made every fit stop after 0 iterations."""
    with pytest.raises(ProbeError) as info:
        probe_settings.read_logistic_settings({"engine": engine, "C": [c, 1.0]})

    assert info.value.field == "C"
    assert info.value.value == c
    assert f"C={c!r}" in info.value.message
    assert "pass C >= 1e-12" in info.value.message
    assert "(0, inf)" not in info.value.message  # the range C=1e-13 would fail too


def test_logistic_c_at_the_floor_accepted() -> None:
    settings = probe_settings.read_logistic_settings({"C": [1e-12, 1.0]})

    assert settings.c_grid == [1e-12, 1.0]


def _digits_features() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = torch.from_numpy((data.data[:600] / 16.0).astype(np.float32))
    labels = torch.from_numpy(data.target[:600].astype(np.int64))
    return {
        "x_fit": pixels[:500],
        "y_fit": labels[:500],
        "x_val": pixels[500:],
        "y_val": labels[500:],
    }


def test_mlp_divergence_names_lr() -> None:
    """A learning rate stored before the bound existed makes the loss overflow. The fit must
    stop with an error naming lr instead of keeping chance-level scores."""
    from workers.probes.mlp import _train
    from workers.probes.settings import MlpSettings
    from workers.probes.task import prepare_task

    digits = _digits_features()
    features = digits["x_fit"].numpy()[None]
    labels = digits["y_fit"].numpy()
    task = prepare_task(
        "mlp",
        features,
        labels,
        features,
        labels,
        layers=[0],
        params={},
        seed=0,
        class_names=None,
        device="cpu",
        progress=None,
    )
    settings = MlpSettings(
        hidden=32, dropout=0.0, lr=1e30, weight_decay=0.0, max_epochs=3, patience=3, batch_size=64
    )

    with pytest.raises(ProbeError) as info:
        _train(
            task,
            settings,
            torch.device("cpu"),
            digits["x_fit"],
            digits["y_fit"],
            digits["x_val"],
            digits["y_val"].numpy(),
        )

    assert info.value.field == "lr"
    assert info.value.value == 1e30
    assert "diverged at epoch 1" in info.value.message
    assert "lower lr" in info.value.message


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny ImageGPT (width 32, 2 blocks, 8x8 images) and digits train inputs."""
    from tests.factories import tiny_imagegpt
    from workers.datasets import load_split
    from workers.imagegpt import build_input_ids
    from workers.modelref import resolve_model
    from workers.models import ImageGPTAdapter

    path = tiny_imagegpt(tmp_path_factory.mktemp("bounds") / "tiny-igpt")
    model = ImageGPTAdapter(
        resolve_model(str(path), models_dir=None), device="cpu", input_policy="plain"
    )
    data = load_split("digits", "train")
    ids = build_input_ids(
        model.tokens(data.images[:200]), policy="plain", sos_token=model.sos_token
    )
    return {"path": path, "transformer": model.model, "ids": ids, "labels": data.labels[:200]}


def test_adapter_divergence_names_lr(tiny_inputs: dict[str, Any]) -> None:
    from workers.adapters import AdaptedImageGPT, _train_epoch

    torch.manual_seed(0)
    model = AdaptedImageGPT(
        tiny_inputs["transformer"], layer=2, bottleneck=8, n_classes=10, pooling="mean"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e30)
    labels = torch.from_numpy(tiny_inputs["labels"].astype(np.int64))

    with pytest.raises(ProbeError) as info:
        for epoch in (1, 2):
            _train_epoch(model, optimizer, tiny_inputs["ids"], labels, torch.arange(200), 50, epoch)

    assert info.value.field == "lr"
    assert "diverged at epoch" in info.value.message
    assert "lower lr" in info.value.message


def _tiny_shape(**changes: int) -> probe_settings.AdapterFitShape:
    sizes = {"seq_len": 64, "dim": 32, "inner_dim": 128, "layer": 2, "max_batch_items": 1038}
    return probe_settings.AdapterFitShape(**{**sizes, **changes})


def test_adapter_memory_names_bottleneck() -> None:
    """Tiny ImageGPT on digits: a wide bottleneck is what exceeds the limit."""
    settings = probe_settings.read_adapter_settings({"bottleneck": 4096, "batch_size": 4096})

    with pytest.raises(ProbeError) as info:
        probe_settings.check_adapter_memory(settings, _tiny_shape(), LIMIT)

    assert info.value.field == "bottleneck"
    assert info.value.value == 4096
    assert "GiB" in info.value.message
    assert "limit of 4 GiB" in info.value.message
    assert "pass bottleneck <= " in info.value.message


def test_adapter_memory_names_batch_size() -> None:
    """imagegpt-small (1,024 tokens, width 512) at layer 12: the default batch is too large."""
    shape = _tiny_shape(seq_len=1024, dim=512, inner_dim=2048, layer=12, max_batch_items=40000)
    settings = probe_settings.read_adapter_settings({})
    limit = LIMIT

    with pytest.raises(ProbeError) as info:
        probe_settings.check_adapter_memory(settings, shape, LIMIT)

    assert info.value.field == "batch_size"
    largest = int(info.value.message.rsplit("batch_size <= ", 1)[1])
    assert probe_settings.adapter_fit_bytes(shape, largest, 64) <= limit
    assert probe_settings.adapter_fit_bytes(shape, largest + 1, 64) > limit


def test_adapter_memory_defaults_fit() -> None:
    settings = probe_settings.read_adapter_settings({})
    probe_settings.check_adapter_memory(settings, _tiny_shape(), LIMIT)


MEASURE_SCRIPT = """
import json, os, resource, sys
import torch
torch.set_num_threads(1)
from workers.adapters import fit_adapter
from workers.datasets import load_split
from workers.imagegpt import build_input_ids
from workers.modelref import resolve_model
from workers.models import ImageGPTAdapter

model = ImageGPTAdapter(resolve_model(sys.argv[1], models_dir=None), device="cpu",
                        input_policy="plain")
train, test = load_split("digits", "train"), load_split("digits", "test")
ids = [build_input_ids(model.tokens(split.images[:n]), policy="plain",
                       sos_token=model.sos_token) for split, n in ((train, 400), (test, 50))]
page = os.sysconf("SC_PAGE_SIZE")
before = int(open("/proc/self/statm").read().split()[1]) * page
fit_adapter(model.model, ids[0], train.labels[:400], ids[1], test.labels[:50], layer=2,
            pooling="mean", params={"epochs": 1, "batch_size": 320, "bottleneck": 1024})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak}))
"""


def test_adapter_memory_estimate_bounds_measured_peak(tiny_inputs: dict[str, Any]) -> None:
    """Run a real fit in a fresh process and compare its peak RSS growth with the estimate:
    the estimate must cover it without being far above it."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_SCRIPT, str(tiny_inputs["path"])],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )
    sizes = json.loads(result.stdout.strip().splitlines()[-1])
    measured = sizes["peak"] - sizes["before"]
    # 400 train items leave 320 in the fit part, so the whole fit part is one batch.
    estimate = probe_settings.adapter_fit_bytes(_tiny_shape(max_batch_items=320), 320, 1024)

    assert measured <= estimate
    assert estimate <= 2 * measured


def test_adapter_memory_limit_follows_setting() -> None:
    """imagegpt-small at layer 12 with the default batch needs about 50 GiB: over the default
    limit, within a limit raised for a large GPU."""
    shape = _tiny_shape(seq_len=1024, dim=512, inner_dim=2048, layer=12, max_batch_items=40000)
    settings = probe_settings.read_adapter_settings({})

    with pytest.raises(ProbeError) as info:
        probe_settings.check_adapter_memory(settings, shape, LIMIT)
    probe_settings.check_adapter_memory(settings, shape, 64 * 2**30)

    assert "LAYERBANK_ADAPTER_FIT_GIB" in info.value.message
