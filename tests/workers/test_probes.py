"""Probe engines on real data: scikit-learn's 8x8 handwritten digits.

Three "layers" of features are real transformations of the pixels, so their quality differs:
layer 0 = pixels / 16, layer 1 = a seeded random projection + tanh, layer 2 = pixels + heavy
seeded noise. A stratified seeded split keeps 500 digits for test.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.overrides import TorchFunctionMode

from workers.errors import ProbeError
from workers.probes import PROBE_KINDS, fit_probes
from workers.probes.logistic import (
    LogisticSettings,
    _balanced_batches,
    _BatchedLogistic,
    _GradientLows,
    _standardise_parts_,
)
from workers.probes.metrics import CI_DECIMALS, bootstrap_accuracy_ci
from workers.probes.mlp import _unfinished_training_warning
from workers.probes.settings import MlpSettings

N_TEST = 500
LAYERS = [0, 1, 2]
RESULT_FIXTURES = ["sklearn_results", "torch_results", "knn_results", "mlp_results"]

Digits = dict[str, Any]


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Run torch on one thread here, and restore the setting afterwards.

    On a 2-core machine shared with redis, rq workers and other test processes, MKL's
    threaded dot products in L-BFGS wait for a descheduled second thread: the torch logistic
    fixture took minutes instead of seconds. One thread keeps the suite fast; the results
    do not depend on the thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> Digits:
    """Features of shape (3, n, dim) for train and test, labels, and the digit names."""
    data = load_digits()
    pixels = data.data.astype(np.float32) / 16.0  # (1797, 64)
    rng = np.random.default_rng(0)
    projection = rng.standard_normal((64, 64)).astype(np.float32) / 4.0
    layers = np.stack(
        [
            pixels,
            np.tanh(pixels @ projection),
            pixels + rng.normal(0.0, 1.0, pixels.shape).astype(np.float32),
        ]
    )
    train_idx, test_idx = train_test_split(
        np.arange(len(data.target)), test_size=N_TEST, stratify=data.target, random_state=0
    )
    return {
        "train": layers[:, train_idx],
        "test": layers[:, test_idx],
        "y_train": data.target[train_idx],
        "y_test": data.target[test_idx],
        "names": [str(n) for n in data.target_names],
    }


def probe(digits: Digits, kind: str, params: dict[str, Any], **kwargs: Any) -> list[dict]:
    args = {"layers": LAYERS, "params": params, "seed": 0, **kwargs}
    return fit_probes(
        kind, digits["train"], digits["y_train"], digits["test"], digits["y_test"], **args
    )


@pytest.fixture(scope="module")
def sklearn_results(digits: Digits) -> list[dict]:
    return probe(digits, "logistic", {}, class_names=digits["names"])


@pytest.fixture(scope="module")
def torch_results(digits: Digits) -> list[dict]:
    return probe(digits, "logistic", {"engine": "torch"})


@pytest.fixture(scope="module")
def knn_results(digits: Digits) -> list[dict]:
    return probe(digits, "knn", {})


@pytest.fixture(scope="module")
def mlp_results(digits: Digits) -> list[dict]:
    return probe(digits, "mlp", {"hidden": 64, "max_epochs": 60, "patience": 10})


# --- logistic ---------------------------------------------------------------------------------


def test_logistic_engines_agree_within_half_a_point(
    sklearn_results: list[dict], torch_results: list[dict]
) -> None:
    for ref, batched in zip(sklearn_results, torch_results, strict=True):
        assert batched["layer"] == ref["layer"]
        assert abs(batched["test_accuracy"] - ref["test_accuracy"]) <= 0.005, (ref, batched)


def test_logistic_torch_regularisation_path_agrees(
    digits: Digits, sklearn_results: list[dict], torch_results: list[dict]
) -> None:
    path = probe(digits, "logistic", {"engine": "torch", "c_batch": 2})
    for ref, result in zip(sklearn_results, path, strict=True):
        assert abs(result["test_accuracy"] - ref["test_accuracy"]) <= 0.005, (ref, result)
        assert result["params"]["C"] == ref["params"]["C"]
        assert result["converged"] is True
    # Runs (0.01, 0.1), (1, 10), (100): every run after the first starts from the previous
    # run's largest C, so the warm-started fits need fewer iterations than cold ones.
    for cold, warm in zip(torch_results, path, strict=True):
        cold_iterations = sum(g["n_iter"] for g in cold["grid"][2:])
        warm_iterations = sum(g["n_iter"] for g in warm["grid"][2:])
        assert warm_iterations < cold_iterations, (cold["grid"], warm["grid"])


def test_logistic_torch_iterations_per_problem(
    sklearn_results: list[dict], torch_results: list[dict]
) -> None:
    """Each (layer, C) fit has its own L-BFGS: about as many iterations as scikit-learn's."""
    for ref, result in zip(sklearn_results, torch_results, strict=True):
        iterations = [g["n_iter"] for g in result["grid"]]
        # Stronger regularisation converges sooner, and a shared run would report one count.
        assert iterations[0] < iterations[3], iterations
        torch_total = sum(iterations)
        sklearn_total = sum(g["n_iter"] for g in ref["grid"])
        # torch stops at tol 1e-6, scikit-learn at 1e-5; a run shared by the whole grid
        # needed several times scikit-learn's iterations.
        assert torch_total <= 1.5 * sklearn_total, (iterations, ref["grid"])


def test_logistic_default_tol_per_engine(
    sklearn_results: list[dict], torch_results: list[dict]
) -> None:
    assert {r["params"]["tol"] for r in sklearn_results} == {1e-5}
    assert {r["params"]["tol"] for r in torch_results} == {1e-6}


def test_logistic_torch_float32_agrees(digits: Digits, sklearn_results: list[dict]) -> None:
    results = probe(digits, "logistic", {"engine": "torch", "dtype": "float32"})
    for ref, result in zip(sklearn_results, results, strict=True):
        assert result["params"]["dtype"] == "float32"
        assert abs(result["test_accuracy"] - ref["test_accuracy"]) <= 0.005, (ref, result)
        assert result["params"]["C"] == ref["params"]["C"]
        assert result["converged"] is True
        assert result["warnings"] == []


def test_logistic_torch_records_stall_as_warning(digits: Digits) -> None:
    """A tol below the float32 gradient's rounding level stops the fit before max_iter."""
    (result,) = probe(
        digits,
        "logistic",
        {"engine": "torch", "dtype": "float32", "C": 1.0, "tol": 1e-12, "max_iter": 5000},
        layers=[0],
    )
    assert result["converged"] is False
    assert result["n_iter"] < 5000
    assert any("stopped falling" in w for w in result["warnings"])


def test_float64_stall_advice_keeps_dtype(digits: Digits) -> None:
    """A float64 fit stopped at its rounding level is advised a larger tol, not float64."""
    (result,) = probe(
        digits,
        "logistic",
        {"engine": "torch", "dtype": "float64", "C": 1.0, "tol": 1e-300, "max_iter": 5000},
        layers=[0],
    )
    assert result["converged"] is False
    assert len(result["warnings"]) == 2  # validation fit and refit
    for warning in result["warnings"]:
        assert "stopped falling" in warning
        assert "use a larger tol" in warning
        assert "dtype float64" not in warning


def test_stall_rule_needs_flat_gradient_and_loss() -> None:
    """A run whose gradient stays above an early low while its loss falls is still running."""
    noise = 1e-13
    lows = _GradientLows(3, noise)
    # Problem 0 starts at 1e-6 and falls slowly from 1e-3 (a warm start). Problem 1's gradient
    # stops at 1e-4 after an early low of 1e-5 while its loss keeps falling. Problem 2's
    # gradient and loss both stop falling.
    steps = 60
    for step in range(1, steps + 1):
        norms = np.array([1e-3 * 0.99**step, 1e-5 if step == 1 else 1e-4, 1e-4])
        losses = np.array([1.0, 1.0 - 1e-3 * step, 1.0])
        stalled = lows.stalled(norms, losses, np.array([step, step, step]))
    assert not stalled[0]
    assert not stalled[1]
    assert stalled[2]


def test_logistic_engines_report_their_name(
    sklearn_results: list[dict], torch_results: list[dict]
) -> None:
    assert {r["engine"] for r in sklearn_results} == {"sklearn"}
    assert {r["engine"] for r in torch_results} == {"torch"}


def test_logistic_layers_differ_in_quality(sklearn_results: list[dict]) -> None:
    raw, projected, noisy = (r["test_accuracy"] for r in sklearn_results)
    assert raw > 0.9
    assert projected > 0.9
    assert noisy < raw - 0.2


def test_logistic_sklearn_converges_with_default_settings(sklearn_results: list[dict]) -> None:
    for result in sklearn_results:
        assert result["converged"] is True
        assert result["warnings"] == []
        assert 0 < result["n_iter"] < result["params"]["max_iter"]


def test_logistic_torch_converges_with_default_settings(torch_results: list[dict]) -> None:
    for result in torch_results:
        assert result["converged"] is True
        assert result["warnings"] == []
        assert all(g["converged"] for g in result["grid"])


def test_logistic_chooses_c_from_the_grid_by_validation(sklearn_results: list[dict]) -> None:
    for result in sklearn_results:
        grid = result["grid"]
        assert [g["C"] for g in grid] == [0.01, 0.1, 1.0, 10.0, 100.0]
        best = max(g["val_accuracy"] for g in grid)
        assert result["val_accuracy"] == best
        first_best = next(g["C"] for g in grid if g["val_accuracy"] == best)
        assert result["params"]["C"] == first_best


def test_logistic_single_c_is_used_as_given(digits: Digits) -> None:
    (result,) = probe(digits, "logistic", {"C": 0.5}, layers=[0])
    assert result["params"]["C"] == 0.5
    assert [g["C"] for g in result["grid"]] == [0.5]


def test_logistic_sklearn_records_nonconvergence_as_warning(digits: Digits) -> None:
    (result,) = probe(digits, "logistic", {"C": 100.0, "max_iter": 3}, layers=[0])
    assert result["converged"] is False
    assert result["n_iter"] == 3
    assert any("max_iter=3" in w for w in result["warnings"])


def test_logistic_torch_records_nonconvergence_as_warning(digits: Digits) -> None:
    (result,) = probe(
        digits, "logistic", {"engine": "torch", "C": 100.0, "max_iter": 3}, layers=[0]
    )
    assert result["converged"] is False
    assert result["n_iter"] == 3
    assert any("raise max_iter" in w for w in result["warnings"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_classes", [10, 2])
def test_torch_objective_matches_sklearn_solution(
    digits: Digits, n_classes: int, dtype: str
) -> None:
    """Same objective, same optimum: the penalty scaling and the binary case match sklearn."""
    keep = digits["y_train"] < n_classes if n_classes > 2 else np.isin(digits["y_train"], [3, 8])
    x = StandardScaler().fit_transform(digits["train"][2][keep].astype(np.float64))
    y = np.unique(digits["y_train"][keep], return_inverse=True)[1]
    reference = LogisticRegression(C=0.1, tol=1e-10, max_iter=10_000).fit(x, y)

    # The engine takes features with a last column of ones (the bias) and their covariance.
    with_ones = np.hstack([x, np.ones((len(x), 1))])
    batched = _BatchedLogistic(
        torch.from_numpy(with_ones)[None].to(getattr(torch, dtype)),
        torch.from_numpy(y),
        torch.tensor([[0.1]], dtype=torch.float64),
        n_classes,
        torch.from_numpy(x.T @ x / len(x))[None],
    )
    # The penalty makes the objective at least 1/(C n) ~ 0.008-strongly convex here, so a
    # gradient below 1e-6 puts every weight within about 1e-4 of the optimum. A penalty off by
    # a factor of 2 would move the weights by far more than the 1e-3 tolerance.
    settings = LogisticSettings("torch", [0.1], 2000, 1e-6, dtype, None, 20)
    run = batched.minimise(settings)
    weight = batched.weight.detach()[0, 0].numpy()  # (dim, n_classes or 1)

    assert run.converged.all()
    np.testing.assert_allclose(weight.T, reference.coef_, atol=1e-3)
    np.testing.assert_allclose(batched.bias.detach()[0, 0].numpy(), reference.intercept_, atol=1e-3)


class _SubnormalWatch(TorchFunctionMode):
    """Recorder of every torch operation whose floating-point result contains a subnormal."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        # torch.empty and its kin return memory as it was, which may hold anything.
        computed = not name.startswith("empty")
        if computed and isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            size = out.abs()
            if bool(((size > 0) & (size < torch.finfo(out.dtype).tiny)).any()):
                self.found.append(name)
        return out


@pytest.mark.parametrize("n_classes", [10, 2])
def test_confident_objective_exact_without_subnormals(digits: Digits, n_classes: int) -> None:
    """Large weights push most float32 probabilities below the smallest normal number, where
    CPUs compute 20 to 100 times slower. The objective keeps them out and stays exact."""
    keep = digits["y_train"] < n_classes if n_classes > 2 else np.isin(digits["y_train"], [3, 8])
    x = StandardScaler().fit_transform(digits["train"][2][keep].astype(np.float64))
    y = np.unique(digits["y_train"][keep], return_inverse=True)[1]
    with_ones = torch.from_numpy(np.hstack([x, np.ones((len(x), 1))]))
    columns = 1 if n_classes == 2 else n_classes
    # Weights scaled so that logits of one item lie hundreds apart.
    theta = torch.randn(2, x.shape[1] + 1, columns, generator=torch.Generator().manual_seed(0))
    theta *= torch.tensor([3.0, 30.0], dtype=torch.float64)[:, None, None]
    theta = theta.double()
    c = torch.tensor([[0.1, 10.0]], dtype=torch.float64)
    batched = _BatchedLogistic(
        with_ones[None].float(), torch.from_numpy(y), c, n_classes, torch.eye(x.shape[1])[None]
    )

    with _SubnormalWatch() as watch:
        loss, grad = batched._objective(np.arange(2), theta)

    assert watch.found == []
    # Reference in float64, where nothing here comes near the subnormal range.
    ref = theta.clone().requires_grad_(True)
    logits = torch.einsum("nr,mrk->mnk", with_ones, ref)
    if n_classes == 2:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=2)
    penalty = torch.from_numpy(batched.penalty.reshape(-1))
    nll = torch.stack([F.cross_entropy(z, torch.from_numpy(y)) for z in logits])
    ref_loss = nll + penalty * ref[:, :-1].pow(2).sum(dim=(1, 2))
    ref_loss.sum().backward()
    np.testing.assert_allclose(loss.numpy(), ref_loss.detach().numpy(), rtol=1e-5)
    scale = ref.grad.abs().amax(dim=(1, 2), keepdim=True)
    np.testing.assert_allclose((grad / scale).numpy(), (ref.grad / scale).numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_standardisation_matches_standard_scaler(digits: Digits, dtype: str) -> None:
    """The whole train set's statistics, derived from the two parts' sums, are StandardScaler's."""
    # In float64 an offset checks the centring. In float32 it would cost the centred values of
    # nearly constant pixels their precision (eps * 100 against a standard deviation of 1e-3).
    offset = np.float32(100.0 if dtype == "float64" else 0.0)
    train = (digits["train"] + offset).astype(np.float64)
    n_fit = 900
    x = torch.from_numpy(np.concatenate([train, np.ones((*train.shape[:2], 1))], axis=2))
    x = x.to(getattr(torch, dtype))
    x_fit, x_val, x_all = x[:, :n_fit].clone(), x[:, n_fit:].clone(), x.clone()

    fit_cov, whole = _standardise_parts_(x_fit, x_val)
    whole.apply_(x_all)

    tolerance = 1e-8 if dtype == "float64" else 1e-3
    for layer in range(len(train)):
        for got, rows, fitted_on in (
            (x_fit, slice(None, n_fit), slice(None, n_fit)),
            (x_val, slice(n_fit, None), slice(None, n_fit)),
            (x_all, slice(None), slice(None)),
        ):
            scaler = StandardScaler().fit(train[layer, fitted_on])
            expected = scaler.transform(train[layer, rows])
            standardised = got[layer, :, :-1].double().numpy()
            np.testing.assert_allclose(standardised, expected, atol=tolerance)
            assert (got[layer, :, -1] == 1).all()

        constant = train[layer].std(axis=0) == 0
        assert constant.any() == (layer == 0)  # blank pixels in the raw digits
        assert (x_all[layer, :, :-1][:, torch.from_numpy(constant)] == 0).all()

        expected_cov = np.cov(StandardScaler().fit_transform(train[layer, :n_fit]).T, bias=True)
        np.testing.assert_allclose(fit_cov[layer].numpy(), expected_cov, atol=tolerance)
        expected_cov = np.cov(StandardScaler().fit_transform(train[layer]).T, bias=True)
        np.testing.assert_allclose(whole.cov[layer].numpy(), expected_cov, atol=tolerance)


def _scaled_digits(digits: Digits, scale: float, offset: float, columns: slice) -> Digits:
    """Digits whose ``columns`` of every layer are multiplied by ``scale`` and shifted, float32."""
    out = dict(digits)
    for part in ("train", "test"):
        x = digits[part].astype(np.float64)
        x[..., columns] = x[..., columns] * scale + offset
        out[part] = x.astype(np.float32)
    return out


@pytest.mark.parametrize(
    ("scale", "offset", "columns"),
    [
        (1e19, 0.0, slice(20, 21)),  # one huge feature: its float32 sums of squares overflow
        (1e19, 0.0, slice(None)),  # every feature huge
        (1e-7, 0.0, slice(None)),  # every feature tiny: spreads below 10 eps are still spreads
        (1.0, 12345.678, slice(None)),  # large offset: constant pixels must stay constant
    ],
    ids=["one-huge", "all-huge", "all-tiny", "offset"],
)
def test_logistic_torch_float32_scale_free(
    digits: Digits,
    sklearn_results: list[dict],
    scale: float,
    offset: float,
    columns: slice,
) -> None:
    """Standardisation makes float32 results independent of the features' scale and offset."""
    results = probe(
        _scaled_digits(digits, scale, offset, columns),
        "logistic",
        {"engine": "torch", "dtype": "float32"},
        layers=[0],
    )
    reference = sklearn_results[0]
    assert results[0]["converged"] is True
    assert abs(results[0]["test_accuracy"] - reference["test_accuracy"]) <= 0.005
    assert results[0]["params"]["C"] == reference["params"]["C"]


def test_torch_standardisation_zeroes_constant_float32() -> None:
    """A constant column at a large offset becomes exact zeros in float32, like StandardScaler."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 500, 4)).astype(np.float32)
    x[..., 1] = np.float32(10000.3)
    with_ones = torch.from_numpy(np.concatenate([x, np.ones((1, 500, 1), np.float32)], axis=2))
    x_fit, x_val, x_all = with_ones[:, :400].clone(), with_ones[:, 400:].clone(), with_ones.clone()
    _, whole = _standardise_parts_(x_fit, x_val)
    whole.apply_(x_all)
    for part in (x_fit, x_val, x_all):
        assert (part[0, :, 1] == 0).all()


# --- kNN and MLP ------------------------------------------------------------------------------


def test_knn_beats_chance_by_a_wide_margin(knn_results: list[dict]) -> None:
    raw, projected, noisy = (r["test_accuracy"] for r in knn_results)
    assert raw > 0.8
    assert projected > 0.8
    assert noisy > 0.2


def test_knn_reports_grid_and_loo_accuracy(knn_results: list[dict]) -> None:
    result = knn_results[0]
    assert [g["k"] for g in result["grid"]] == [1, 5, 10, 20, 50, 100, 200]
    assert result["params"]["k"] in {1, 5, 10, 20, 50, 100, 200}
    assert result["train_accuracy"] < 1.0  # an item never votes for itself
    assert result["converged"] is True
    assert result["n_iter"] is None


def test_knn_drops_oversized_k_with_warning(digits: Digits) -> None:
    small = {**digits, "train": digits["train"][:, :150], "y_train": digits["y_train"][:150]}
    (result,) = probe(small, "knn", {}, layers=[0])
    assert [g["k"] for g in result["grid"]] == [1, 5, 10, 20, 50, 100]
    assert any("[200]" in w for w in result["warnings"])


def test_mlp_beats_chance(mlp_results: list[dict]) -> None:
    raw, projected, noisy = (r["test_accuracy"] for r in mlp_results)
    assert raw > 0.8
    assert projected > 0.8
    assert noisy > 0.2


def test_mlp_keeps_the_best_validation_epoch(mlp_results: list[dict]) -> None:
    for result in mlp_results:
        curve = [g["val_accuracy"] for g in result["grid"]]
        assert result["n_iter"] == len(curve)
        assert result["val_accuracy"] == max(curve)
        assert curve[result["params"]["epoch"] - 1] == max(curve)


def test_mlp_deterministic_on_cpu(digits: Digits, mlp_results: list[dict]) -> None:
    again = probe(digits, "mlp", {"hidden": 64, "max_epochs": 60, "patience": 10})
    for first, second in zip(mlp_results, again, strict=True):
        assert {**first, "fit_seconds": 0} == {**second, "fit_seconds": 0}


def test_mlp_leaves_the_global_torch_seed_alone(digits: Digits) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe(digits, "mlp", {"hidden": 16, "max_epochs": 2}, layers=[0])
    assert torch.equal(torch.rand(3), expected)


def test_mlp_records_unfinished_training_as_warning(digits: Digits) -> None:
    (result,) = probe(digits, "mlp", {"hidden": 16, "max_epochs": 3, "patience": 5}, layers=[0])
    assert result["converged"] is False
    assert any("raise max_epochs" in w for w in result["warnings"])


def _mlp_settings(max_epochs: int, patience: int) -> MlpSettings:
    return MlpSettings(
        hidden=16,
        dropout=0.0,
        lr=1e-3,
        weight_decay=0.0,
        max_epochs=max_epochs,
        patience=patience,
        batch_size=64,
    )


@pytest.mark.parametrize(
    ("max_epochs", "patience", "best_epoch", "stopped", "warns"),
    [
        # Patience below half the run: the window is the patience.
        (200, 20, 181, False, True),
        (200, 20, 190, False, True),
        (200, 20, 150, True, False),
        # Early stopping cannot trigger: the window is the second half of the run.
        (150, 150, 32, False, False),
        (150, 150, 75, False, False),
        (150, 150, 76, False, True),
        (150, 1000, 150, False, True),
        # Patience above half the run, yet below max_epochs.
        (60, 40, 25, False, False),
        (60, 40, 31, False, True),
        # One or three epochs: the last epoch is the second half.
        (1, 20, 1, False, True),
        (3, 5, 3, False, True),
        (3, 5, 1, False, False),
    ],
)
def test_mlp_unfinished_warning_rule(
    max_epochs: int, patience: int, best_epoch: int, stopped: bool, warns: bool
) -> None:
    warning = _unfinished_training_warning(_mlp_settings(max_epochs, patience), best_epoch, stopped)

    assert (warning is not None) is warns
    if warning is not None:
        assert f"epoch {best_epoch}," in warning
        assert f"max_epochs={max_epochs}" in warning
        assert "raise max_epochs" in warning


def test_mlp_no_warning_without_early_stopping() -> None:
    """patience >= max_epochs never stops early; an early best epoch needs no more epochs."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    # Two classes 20 standard deviations apart: validation accuracy is 1.0 from epoch 1 on.
    features = (rng.standard_normal((1, 200, 4)) + 20.0 * labels[None, :, None]).astype(np.float32)
    params = {"hidden": 8, "lr": 0.05, "max_epochs": 20, "patience": 20}

    (result,) = fit_probes(
        "mlp", features, labels, features, labels, layers=[0], params=params, seed=0
    )

    assert result["params"]["epoch"] == 1
    assert result["n_iter"] == 20
    assert result["warnings"] == []


# --- metrics and the result contract ----------------------------------------------------------


def _plain(value: Any) -> bool:
    """Whether ``value`` is built from plain python JSON types only (no numpy scalars)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


@pytest.mark.parametrize("fixture", RESULT_FIXTURES)
def test_results_are_plain_json(fixture: str, request: pytest.FixtureRequest) -> None:
    results = request.getfixturevalue(fixture)
    assert [r["layer"] for r in results] == LAYERS
    for result in results:
        assert _plain(result)
        json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("fixture", RESULT_FIXTURES)
def test_results_have_the_documented_keys(fixture: str, request: pytest.FixtureRequest) -> None:
    keys = {
        "kind",
        "layer",
        "train_accuracy",
        "val_accuracy",
        "test_accuracy",
        "test_accuracy_ci95",
        "macro_f1",
        "per_class_accuracy",
        "confusion_matrix",
        "params",
        "grid",
        "converged",
        "n_iter",
        "fit_seconds",
        "warnings",
        "engine",
    }
    for result in request.getfixturevalue(fixture):
        assert keys <= result.keys()


def test_metrics_shapes(sklearn_results: list[dict]) -> None:
    for result in sklearn_results:
        cm = np.array(result["confusion_matrix"])
        assert cm.shape == (10, 10)
        assert cm.sum() == N_TEST
        assert len(result["per_class_accuracy"]) == 10
        assert math.isclose(np.trace(cm) / N_TEST, result["test_accuracy"])
        lo, hi = result["test_accuracy_ci95"]
        assert lo <= result["test_accuracy"] <= hi
        assert 0.0 < result["macro_f1"] <= 1.0


def test_metrics_per_class_accuracy_is_recall(sklearn_results: list[dict]) -> None:
    cm = np.array(sklearn_results[0]["confusion_matrix"])
    np.testing.assert_allclose(sklearn_results[0]["per_class_accuracy"], np.diag(cm) / cm.sum(1))


def test_metrics_class_names_follow_the_classes(sklearn_results: list[dict]) -> None:
    assert sklearn_results[0]["classes"] == list(range(10))
    assert sklearn_results[0]["class_names"] == [str(d) for d in range(10)]


def test_bootstrap_ci_rounded() -> None:
    """The bounds are the interpolated percentiles of the unchanged method, rounded."""
    correct = np.random.default_rng(1).random(500) < 0.4
    rng = np.random.default_rng(0)
    means = np.concatenate(
        [correct[rng.integers(0, 500, size=(100, 500))].mean(axis=1) for _ in range(10)]
    )
    exact = np.percentile(means, [2.5, 97.5])

    bounds = bootstrap_accuracy_ci(correct, seed=0)

    for bound, unrounded in zip(bounds, exact, strict=True):
        assert bound == round(bound, CI_DECIMALS)
        assert abs(bound - unrounded) <= 0.5 * 10**-CI_DECIMALS
    assert any(len(repr(float(value))) > 10 for value in exact)


def test_bootstrap_ci_is_seeded() -> None:
    correct = np.random.default_rng(1).random(500) < 0.8
    assert bootstrap_accuracy_ci(correct, seed=3) == bootstrap_accuracy_ci(correct, seed=3)
    assert bootstrap_accuracy_ci(correct, seed=3) != bootstrap_accuracy_ci(correct, seed=4)


def test_progress_is_reported_per_layer(digits: Digits) -> None:
    calls: list[tuple[int, int]] = []
    probe(digits, "knn", {"k": 5}, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


class _Stop(Exception):
    """Raised by a check to stop a fit."""


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("logistic", {"engine": "torch"}),
        ("logistic", {"engine": "sklearn"}),
        ("mlp", {"max_epochs": 50, "patience": 50}),
    ],
)
def test_check_stops_fit_inside_layer(digits: Digits, kind: str, params: dict[str, Any]) -> None:
    """``check`` runs between L-BFGS iterations (torch), values of C (sklearn) or epochs (MLP),
    so a canceled run stops inside its first layer or batch of layers instead of after it."""
    calls: list[int] = []
    progress: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise _Stop

    with pytest.raises(_Stop):
        probe(
            digits,
            kind,
            params,
            progress=lambda done, _total: progress.append(done),
            check=check,
        )
    assert len(calls) == 3
    assert progress == []


def test_torch_engine_reports_progress_per_batch(digits: Digits) -> None:
    calls: list[tuple[int, int]] = []
    probe(
        digits,
        "logistic",
        {"engine": "torch", "C": 1.0, "layer_batch": 2},
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(2, 3), (3, 3)]


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    """Two torch threads, so the torch engine fits two batches of layers at a time on a CPU."""
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


def _zarr_copies(digits: Digits, path: Any) -> dict[str, Any]:
    stored = {}
    for split in ("train", "test"):
        array = zarr.create_array(
            path / f"{split}.zarr", shape=digits[split].shape, dtype="float32", chunks=(1, 256, 64)
        )
        array[:] = digits[split]
        stored[split] = array
    return stored


def test_torch_batches_in_threads_match_sequential(digits: Digits, tmp_path: Any) -> None:
    params = {"engine": "torch", "C": [0.1, 1.0, 10.0], "layer_batch": 1}
    sequential = probe(digits, "logistic", params)

    stored = _zarr_copies(digits, tmp_path)
    progress: list[tuple[int, int, int]] = []
    checks: list[tuple[str, int]] = []
    torch.set_num_threads(2)
    try:
        in_threads = fit_probes(
            "logistic",
            stored["train"],
            digits["y_train"],
            stored["test"],
            digits["y_test"],
            layers=LAYERS,
            params=params,
            seed=0,
            progress=lambda done, total: progress.append((threading.get_ident(), done, total)),
            check=lambda: checks.append((threading.current_thread().name, torch.get_num_threads())),
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)

    for expected, threaded in zip(sequential, in_threads, strict=True):
        assert threaded["layer"] == expected["layer"]
        assert threaded["params"]["C"] == expected["params"]["C"]
        assert threaded["test_accuracy"] == expected["test_accuracy"]
        assert threaded["confusion_matrix"] == expected["confusion_matrix"]
        assert threaded["grid"] == expected["grid"]
        assert threaded["n_iter"] == expected["n_iter"]
    # Progress comes from the calling thread, whose rq job the callback updates.
    assert {ident for ident, _, _ in progress} == {threading.get_ident()}
    assert [done for _, done, _ in progress] == [1, 2, 3]
    # Two batch threads ran the iterations, with one torch thread each.
    names = {name for name, _ in checks}
    assert len(names) == 2 and all(name.startswith("logistic-batch") for name in names), names
    assert {threads for _, threads in checks} == {1}


@pytest.mark.usefixtures("two_torch_threads")
def test_torch_batch_threads_raise_first_error(digits: Digits) -> None:
    calls: list[str] = []

    def check() -> None:
        calls.append(threading.current_thread().name)
        if len(calls) == 5:
            raise _Stop

    with pytest.raises(_Stop):
        probe(digits, "logistic", {"engine": "torch", "C": 1.0, "layer_batch": 1}, check=check)
    assert [t for t in threading.enumerate() if t.name.startswith("logistic-batch")] == []
    assert torch.get_num_threads() == 2
    assert all(name.startswith("logistic-batch") for name in calls), calls


@pytest.mark.parametrize(
    ("n_layers", "largest", "parallel", "sizes"),
    [
        (25, 3, 2, [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]),  # 10 batches, not 8 of 3 and a lone 1
        (25, 3, 1, [3, 3, 3, 3, 3, 3, 3, 2, 2]),
        (3, 5, 2, [2, 1]),  # fits in one batch, split to give each thread one
        (1, 5, 2, [1]),
    ],
)
def test_torch_automatic_batches_balanced(
    n_layers: int, largest: int, parallel: int, sizes: list[int]
) -> None:
    batches = _balanced_batches(list(range(n_layers)), largest, parallel)
    assert [len(b) for b in batches] == sizes
    assert [layer for b in batches for layer in b] == list(range(n_layers))
    assert all(type(layer) is int for b in batches for layer in b)


def test_zarr_float16_features_are_read_per_layer(digits: Digits, tmp_path: Any) -> None:
    stored = {}
    for split in ("train", "test"):
        array = zarr.create_array(
            tmp_path / f"{split}.zarr",
            shape=digits[split].shape,
            dtype="float16",
            chunks=(1, 256, 64),
        )
        array[:] = digits[split].astype(np.float16)
        stored[split] = array
    results = fit_probes(
        "knn",
        stored["train"],
        digits["y_train"],
        stored["test"],
        digits["y_test"],
        layers=[2, 0],
        params={"k": 5},
    )
    assert [r["layer"] for r in results] == [2, 0]
    assert results[1]["test_accuracy"] > 0.9


# --- bad requests -----------------------------------------------------------------------------


def probe_error(
    digits: Digits, kind: str = "logistic", params: dict | None = None, **kwargs: Any
) -> ProbeError:
    with pytest.raises(ProbeError) as info:
        probe(digits, kind, params or {}, **kwargs)
    return info.value


def test_error_unknown_kind(digits: Digits) -> None:
    error = probe_error(digits, "svm")
    assert error.field == "kind"
    assert "'svm'" in str(error)
    assert all(kind in str(error) for kind in PROBE_KINDS)


def test_error_unknown_param(digits: Digits) -> None:
    error = probe_error(digits, "knn", {"kk": 5})
    assert error.field == "kk"
    assert "'kk'" in str(error)


def test_error_empty_c_grid(digits: Digits) -> None:
    error = probe_error(digits, "logistic", {"C": []})
    assert error.field == "C"
    assert "empty" in str(error)


def test_error_empty_k_grid(digits: Digits) -> None:
    error = probe_error(digits, "knn", {"k": []})
    assert error.field == "k"
    assert "empty" in str(error)


def test_error_c_not_positive(digits: Digits) -> None:
    error = probe_error(digits, "logistic", {"C": [1.0, 0.0]})
    assert error.field == "C"
    assert error.value == 0.0
    assert "C=0.0" in str(error)


def test_error_k_larger_than_train_set(digits: Digits) -> None:
    error = probe_error(digits, "knn", {"k": 5000})
    assert error.field == "k"
    assert error.value == 5000
    assert "k=5000" in str(error)
    assert "1297" in str(error)
    # The k it suggests is accepted: the fit part, not the whole train set, bounds k.
    suggested = re.search(r"pass k <= (\d+)", str(error))
    assert suggested is not None, str(error)
    (result, *_) = probe(digits, "knn", {"k": int(suggested.group(1))}, layers=[0])
    assert result["params"]["k"] == int(suggested.group(1))


def test_error_fewer_than_two_classes(digits: Digits) -> None:
    same = {**digits, "y_train": np.zeros_like(digits["y_train"]), "y_test": np.zeros(N_TEST, int)}
    error = probe_error(same)
    assert error.field == "y_train"
    assert "at least 2" in str(error)


def test_error_nan_features_incomplete(digits: Digits) -> None:
    train = digits["train"].copy()
    train[1, 7, 3] = np.nan
    error = probe_error({**digits, "train": train}, layers=[1])
    assert error.field == "train"
    assert error.value == 1
    assert "layer 1" in str(error)
    assert "incomplete" in str(error)


def test_error_mismatched_dims(digits: Digits) -> None:
    error = probe_error({**digits, "test": digits["test"][:, :, :32]})
    assert error.field == "test"
    assert error.value == (3, N_TEST, 32)
    assert "(3, 500, 32)" in str(error)


def test_error_test_labels_not_in_train(digits: Digits) -> None:
    y_test = digits["y_test"].copy()
    y_test[0] = 11
    error = probe_error({**digits, "y_test": y_test})
    assert error.field == "y_test"
    assert error.value == [11]
    assert "[11]" in str(error)


def test_error_layer_out_of_range(digits: Digits) -> None:
    error = probe_error(digits, layers=[0, 3])
    assert error.field == "layers"
    assert error.value == 3
    assert "0..2" in str(error)


def test_error_unknown_engine(digits: Digits) -> None:
    error = probe_error(digits, "logistic", {"engine": "jax"})
    assert error.field == "engine"
    assert 'engine="jax" is not supported' in str(error)


def test_error_one_train_item_per_class(digits: Digits) -> None:
    first = [int(np.flatnonzero(digits["y_train"] == c)[0]) for c in range(10)]
    one_each = {**digits, "train": digits["train"][:, first], "y_train": digits["y_train"][first]}
    error = probe_error(one_each, "knn", {"val_fraction": 0.9})
    assert error.field == "val_fraction"
    assert "each class needs at least 2 train items" in str(error)
    assert "larger limit" in str(error)


def test_error_val_fraction_out_of_range(digits: Digits) -> None:
    error = probe_error(digits, "knn", {"val_fraction": 1.5})
    assert error.field == "val_fraction"
    assert "1.5" in str(error)


def test_error_unavailable_device(digits: Digits) -> None:
    error = probe_error(digits, "knn", device="cuda:7")
    assert error.field == "device"
    assert "'cuda:7'" in str(error)


@pytest.mark.parametrize("name", ["dtype", "layer_batch", "history_size", "c_batch"])
def test_error_torch_param_with_sklearn_engine(digits: Digits, name: str) -> None:
    value = "float32" if name == "dtype" else 2
    error = probe_error(digits, params={name: value})
    assert error.field == name
    assert 'engine "torch" only' in str(error)
    assert 'engine is "sklearn"' in str(error)
    assert '"engine": "torch"' in str(error)
