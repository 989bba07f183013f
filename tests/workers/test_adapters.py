"""Houlsby adapters on a frozen tiny ImageGPT, trained on digits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from tests.factories import tiny_imagegpt
from workers.adapters import (
    AdaptedImageGPT,
    BottleneckAdapter,
    adapter_parameter_count,
    fit_adapter,
)
from workers.imagegpt import build_input_ids, pooled_hidden_states


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: the tiny model is faster without thread hand-offs on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_inputs(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    """The tiny model and its plain-policy inputs for the digits train and test splits."""
    from workers.datasets import load_split
    from workers.modelref import resolve_model
    from workers.models import ImageGPTAdapter

    path = tiny_imagegpt(tmp_path_factory.mktemp("adapter") / "tiny-igpt")
    model = ImageGPTAdapter(
        resolve_model(str(path), models_dir=None), device="cpu", input_policy="plain"
    )
    out: dict[str, Any] = {"transformer": model.model}
    for split in ("train", "test"):
        data = load_split("digits", split)
        out[f"{split}_ids"] = build_input_ids(
            model.tokens(data.images), policy="plain", sos_token=model.sos_token
        )
        out[f"{split}_labels"] = data.labels
    return out


def test_adapter_parameter_count_formula() -> None:
    adapter_params = sum(p.numel() for p in BottleneckAdapter(48, 6).parameters())
    assert adapter_parameter_count(48, 6) == 2 * 48 * 6 + 48 + 6
    assert adapter_params == adapter_parameter_count(48, 6)


def test_adapted_model_counts_trainable_parts(digits_inputs: dict[str, Any]) -> None:
    model = AdaptedImageGPT(
        digits_inputs["transformer"], layer=2, bottleneck=8, n_classes=10, pooling="mean"
    )
    counts = model.parameter_counts()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # 2 blocks x 2 adapters; ln_1 and ln_2 per block plus ln_f (layer 2 is the last); head.
    assert counts["n_adapters"] == 4
    assert counts["adapters"] == 4 * (2 * 32 * 8 + 32 + 8)
    assert counts["layer_norms"] == 5 * 32
    assert counts["head"] == 32 * 10 + 10
    assert counts["total"] == trainable


@pytest.mark.parametrize(
    ("layer", "pooling"), [(1, "mean"), (2, "mean"), (1, "mean_ln_f"), (2, "last_token")]
)
def test_adapted_model_identity_at_init(
    digits_inputs: dict[str, Any], layer: int, pooling: str
) -> None:
    transformer = digits_inputs["transformer"]
    ids = digits_inputs["train_ids"][:32]
    model = AdaptedImageGPT(transformer, layer=layer, bottleneck=8, n_classes=10, pooling=pooling)
    with torch.no_grad():
        adapted = model.features(ids)
    frozen = pooled_hidden_states(transformer, ids, [layer], pooling)[0]
    torch.testing.assert_close(adapted, frozen, rtol=0, atol=0)


def test_adapted_model_leaves_backbone_unchanged(digits_inputs: dict[str, Any]) -> None:
    transformer = digits_inputs["transformer"]
    before = {name: p.detach().clone() for name, p in transformer.named_parameters()}
    fit_adapter(
        transformer,
        digits_inputs["train_ids"][:200],
        digits_inputs["train_labels"][:200],
        digits_inputs["test_ids"][:50],
        digits_inputs["test_labels"][:50],
        layer=1,
        pooling="mean",
        params={"bottleneck": 4, "epochs": 1, "lr": 0.01},
        seed=0,
    )
    for name, parameter in transformer.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_fit_adapter_beats_chance_on_digits(digits_inputs: dict[str, Any]) -> None:
    row = fit_adapter(
        digits_inputs["transformer"],
        digits_inputs["train_ids"],
        digits_inputs["train_labels"],
        digits_inputs["test_ids"],
        digits_inputs["test_labels"],
        layer=2,
        pooling="mean",
        params={"bottleneck": 8, "epochs": 3, "lr": 0.005},
        seed=0,
        class_names=[str(d) for d in range(10)],
    )
    assert row["kind"] == "adapter"
    assert row["test_accuracy"] > 0.3  # chance is 0.1 on ten balanced classes
    assert row["trainable_parameters"]["per_adapter"] == 2 * 32 * 8 + 32 + 8
    assert len(row["grid"]) == 3
    assert np.asarray(row["confusion_matrix"]).sum() == 500
