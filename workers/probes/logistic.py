"""Linear probes: L2-regularised multinomial logistic regression on standardised features.

Two engines minimise the same objective per layer and value of C,

    mean cross-entropy + ||W||^2 / (2 * C * n_items)      (bias not penalised),

which is scikit-learn's ``LogisticRegression(C=C)`` objective scaled by ``1 / (C * n_items)``:

- ``"sklearn"`` (the reference): ``StandardScaler`` + ``LogisticRegression(solver="lbfgs")``,
  layer by layer and value by value.
- ``"torch"``: a batched full-batch L-BFGS over every layer of a batch and every value of the
  C grid at once. Each (layer, C) problem has its own curvature history, step length and
  backtracking line search, and stops on its own when the max-norm of its gradient meets
  ``tol``. One iteration evaluates every problem still running, with one matmul per layer
  for all of that layer's values of C. The two-loop recursion starts from a preconditioner,
  an estimate of the inverse Hessian at zero weights built from the eigenvectors of each
  layer's feature covariance. On the synthetic benchmark it cut the iterations to a third.

Both engines choose C on the validation part (fitted on the fit part, standardised with its
statistics), then refit on the whole train set with the chosen C. In the torch engine
``fit_seconds`` is the layer's share of its batch, and ``n_iter`` counts each problem's own
iterations. The refit starts from the layer's validation solution.

The torch engine keeps weights, losses and solver state in float64. ``dtype`` sets the
dtype of the features, the matmuls and the softmax: float64 by default, float32 in 0.62 of
its time on the full CPU sweep. On features with extreme standardised values the float32
gradient is exact only to a few 1e-6 (digits pixels, which reach 36), so a problem whose
gradient stops falling is reported as stalled rather than run to ``max_iter``. The default
``tol`` is 1e-6, tighter than the reference's 1e-5, because at 1e-5 a tie between values of C
on validation can break either way (see ``workers.probes.settings``).

On a CPU where torch has two or more threads, two batches of layers are fitted at a time,
each in its own thread with half of torch's threads. Most matmuls of a sweep cover few values
of C, so a second thread inside one matmul gains little.

On the 2-core CPUs of docs/benchmarks-probe.md, with one thread each, the full sweep of 25
layers x 8 values of C on 50,000 x 512 features ran 5.39x faster than the reference in
float64 and 8.65x to 11.27x in float32. On both cores, with the reference on one thread (its
faster setting there), it ran 20.4x and 21.5x faster in float32 (two runs). It chose the
same values of C except where values tie on validation and the reference stopped short of its
optimum.
``c_batch=1`` (one value of C per run, warm-started along the grid) needs fewer iterations
but is slower on a CPU, because each matmul then covers a single value of C.

NOTE: on a CPU shared with other busy processes, torch's threaded BLAS calls wait for
descheduled threads; fewer torch threads (``torch.set_num_threads``) then run faster.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from workers.probes.device import resolve_device
from workers.probes.metrics import accuracy
from workers.probes.settings import (
    LogisticSettings,
)
from workers.probes.settings import read_logistic_settings as read_settings
from workers.probes.task import ProbeTask

logger = logging.getLogger(__name__)

# Bytes of features and activations that the torch batches of layers may hold on the CPU.
CPU_BATCH_BYTES = 2 * 2**30
# Batches of layers fitted at once on a CPU, each in its own thread with a share of torch's
# threads. On 2 cores this ran the full sweep of docs/benchmarks-probe.md 2.04x faster than one
# thread, where one batch at a time on two threads gave 1.59x (table 9 there).
CPU_PARALLEL_BATCHES = 2


def fit_logistic(task: ProbeTask, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Fit logistic probes on every layer of ``task``; one result dict per layer."""
    settings = read_settings(params)
    if settings.engine == "torch":
        return _fit_torch(task, settings)
    return _fit_sklearn(task, settings)


# --- scikit-learn engine -------------------------------------------------------------------


def _fit_sklearn(task: ProbeTask, s: LogisticSettings) -> list[dict[str, Any]]:
    results = []
    y_fit, y_val = task.y_train[task.fit_part], task.y_train[task.val_part]
    for done, layer in enumerate(task.layers, start=1):
        start = time.perf_counter()
        x_train, x_test = (x.astype(np.float64) for x in task.read_layer(layer))
        notes: list[str] = []

        scaler = StandardScaler().fit(x_train[task.fit_part])
        x_fit = scaler.transform(x_train[task.fit_part])
        x_val = scaler.transform(x_train[task.val_part])
        grid = []
        for c in s.c_grid:
            task.check_running()
            model, converged, n_iter = _sklearn_model(x_fit, y_fit, c, s, notes, "validation fit")
            val_acc = accuracy(y_val, model.predict(x_val))
            grid.append({"C": c, "val_accuracy": val_acc, "converged": converged, "n_iter": n_iter})
        # np.argmax takes the first maximum: ties go to the smallest C, the simplest model.
        best = int(np.argmax([g["val_accuracy"] for g in grid]))

        scaler = StandardScaler().fit(x_train)
        x_all = scaler.transform(x_train)
        c = s.c_grid[best]
        model, converged, n_iter = _sklearn_model(x_all, task.y_train, c, s, notes, "refit")
        test_pred = model.predict(scaler.transform(x_test))
        results.append(
            task.layer_result(
                layer,
                engine="sklearn",
                test_pred=test_pred,
                train_accuracy=accuracy(task.y_train, model.predict(x_all)),
                val_accuracy=grid[best]["val_accuracy"],
                params={"C": c, "max_iter": s.max_iter, "tol": s.tol},
                grid=grid,
                converged=converged,
                n_iter=n_iter,
                fit_seconds=time.perf_counter() - start,
                warnings=notes,
            )
        )
        logger.info("logistic probe: layer %d done (C=%g)", layer, c)
        task.report_progress(done)
    return results


def _sklearn_model(
    x: np.ndarray, y: np.ndarray, c: float, s: LogisticSettings, notes: list[str], stage: str
) -> tuple[LogisticRegression, bool, int]:
    """Fit one model; a ConvergenceWarning becomes a note instead of a raised warning."""
    model = LogisticRegression(C=c, solver="lbfgs", max_iter=s.max_iter, tol=s.tol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    not_converged = False
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            not_converged = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    n_iter = int(np.max(model.n_iter_))
    converged = not not_converged and n_iter < s.max_iter
    if not converged:
        notes.append(
            f"{stage} with C={c:g}: lbfgs did not converge within max_iter={s.max_iter} "
            f"(ran {n_iter} iterations); raise max_iter or choose a smaller C"
        )
    return model, converged, n_iter


# --- torch engine ---------------------------------------------------------------------------


def _fit_torch(task: ProbeTask, s: LogisticSettings) -> list[dict[str, Any]]:
    device = resolve_device(task.device)
    dtype = getattr(torch, s.dtype)
    threads = torch.get_num_threads()
    parallel = min(CPU_PARALLEL_BATCHES, threads) if device.type == "cpu" else 1
    if s.layer_batch:
        batches = [
            task.layers[i : i + s.layer_batch] for i in range(0, len(task.layers), s.layer_batch)
        ]
    else:
        batches = _balanced_batches(
            task.layers, _layer_batch(task, s, device, dtype, parallel), parallel
        )
    parallel = min(parallel, len(batches))
    logger.info(
        "logistic probe (torch): %d layers in %d batches of up to %d (%d at a time), %d values "
        "of C, %s on %s",
        len(task.layers),
        len(batches),
        max(len(layers) for layers in batches),
        parallel,
        len(s.c_grid),
        dtype,
        device,
    )
    if parallel > 1:
        return _fit_batches_in_threads(task, s, batches, device, dtype, parallel)
    results: list[dict[str, Any]] = []
    for layers in batches:
        results.extend(_fit_torch_batch(task, s, layers, device, dtype, task.check_running))
        task.report_progress(len(results))
    return results


def _balanced_batches(layers: list[int], largest: int, parallel: int) -> list[list[int]]:
    """Split ``layers`` into batches of at most ``largest`` layers, as even as can be, and in
    a multiple of ``parallel`` batches where there are enough layers, so that no thread is
    left with a lone extra batch at the end."""
    count = math.ceil(len(layers) / largest)
    count = min(len(layers), math.ceil(count / parallel) * parallel)
    return [part.tolist() for part in np.array_split(np.asarray(layers), count)]


def _fit_batches_in_threads(
    task: ProbeTask,
    s: LogisticSettings,
    batches: list[list[int]],
    device: torch.device,
    dtype: torch.dtype,
    parallel: int,
) -> list[dict[str, Any]]:
    """Fit ``parallel`` batches of layers at a time, each in its own thread, on a CPU.

    torch's threads are shared out evenly among the batches for the run. Progress is reported
    from the calling thread, whose rq job the progress callback updates. When one batch fails
    or the calling thread is interrupted (cancel, rq's job timeout), the other batches stop at
    their next iteration and the first error is raised.
    """
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise _BatchStopped
        task.check_running()

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // parallel))
    by_batch: list[list[dict[str, Any]]] = [[] for _ in batches]
    try:
        with ThreadPoolExecutor(parallel, thread_name_prefix="logistic-batch") as pool:
            futures = {
                pool.submit(_fit_torch_batch, task, s, layers, device, dtype, check): i
                for i, layers in enumerate(batches)
            }
            try:
                pending, done = set(futures), 0
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        by_batch[futures[future]] = future.result()
                        done += len(batches[futures[future]])
                    task.report_progress(done)
            except BaseException:
                stop.set()
                for future in futures:
                    future.cancel()
                raise
    finally:
        torch.set_num_threads(threads)
    return [row for rows in by_batch for row in rows]


class _BatchStopped(Exception):
    """Raised in a batch's thread when another batch failed; its own error is the one raised."""


def _layer_batch(
    task: ProbeTask,
    s: LogisticSettings,
    device: torch.device,
    dtype: torch.dtype,
    parallel: int = 1,
) -> int:
    """Layers per batch so that features, logits and solver state of ``parallel`` batches
    stay within a memory budget."""
    n_train, n_test = len(task.y_train), len(task.y_test)
    itemsize = torch.finfo(dtype).bits // 8
    n_c = len(s.c_grid)
    n_weights = n_c * (task.dim + 1) * task.n_classes
    per_layer = (
        # train features (standardised in place), their fit and validation copies, and
        # test features
        itemsize * (2 * n_train + n_test) * task.dim
        # logits, probabilities and residuals in float64, plus a compute-dtype copy
        + (3 * 8 + itemsize) * n_train * n_c * task.n_classes
        # L-BFGS history (two float64 vectors per remembered step) and ~8 working vectors
        + 8 * (2 * s.history_size + 8) * n_weights
        # covariance and eigenvectors of the preconditioner
        + 8 * 3 * task.dim**2
    )
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 2
    else:
        budget = CPU_BATCH_BYTES // parallel
    return max(1, min(len(task.layers), budget // per_layer))


def _fit_torch_batch(
    task: ProbeTask,
    s: LogisticSettings,
    layers: list[int],
    device: torch.device,
    dtype: torch.dtype,
    check: Callable[[], None],
) -> list[dict[str, Any]]:
    start = time.perf_counter()
    x_train, x_test = _read_with_ones(task, layers, device, dtype)
    y_train = torch.from_numpy(task.y_train).to(device)
    fit_idx = torch.from_numpy(task.fit_part).to(device)
    val_idx = torch.from_numpy(task.val_part).to(device)
    n_layers = len(layers)

    # Validation: every layer x every C, standardised with the fit part's statistics.
    x_fit, x_val = x_train.index_select(1, fit_idx), x_train.index_select(1, val_idx)  # copies
    fit_cov, whole = _standardise_parts_(x_fit, x_val)
    val_fit, val_run = _fit_grid(x_fit, y_train[fit_idx], s, task.n_classes, fit_cov, check=check)
    del x_fit
    val_pred = val_fit.predict(x_val)  # (n_layers, n_C, n_val)
    val_acc = (val_pred == y_train[val_idx]).double().mean(dim=2).cpu().numpy()
    del x_val, val_pred
    # First maximum per layer: ties go to the smallest C, as in the sklearn engine.
    best = np.argmax(val_acc, axis=1)

    # Refit on all of train with each layer's chosen C, warm-started from its validation fit.
    x_all = x_train
    whole.apply_(x_all, x_test)
    chosen = torch.tensor([s.c_grid[i] for i in best], dtype=torch.float64, device=device)
    refit = _BatchedLogistic(x_all, y_train, chosen[:, None], task.n_classes, whole.cov)
    rows = torch.arange(n_layers, device=device)
    pick = torch.from_numpy(best).to(device)
    refit.init_from(val_fit.weight[rows, pick][:, None], val_fit.bias[rows, pick][:, None])
    del val_fit
    run = refit.minimise(s, check=check)
    train_pred = refit.predict(x_all)[:, 0].cpu().numpy()  # (n_layers, n_train)
    test_pred = refit.predict(x_test)[:, 0].cpu().numpy()  # (n_layers, n_test)
    seconds = (time.perf_counter() - start) / n_layers

    results = []
    for i, layer in enumerate(layers):
        c = s.c_grid[best[i]]
        notes = []
        unconverged = [j for j in range(len(s.c_grid)) if not val_run.converged[i, j]]
        if unconverged:
            notes.append(
                f"validation fits with C={[s.c_grid[j] for j in unconverged]} stopped after "
                f"{[int(val_run.n_iter[i, j]) for j in unconverged]} L-BFGS iterations with "
                f"gradient max-norm up to {val_run.grad_norm[i, unconverged].max():.2e} above "
                f"tol={s.tol:g}; {_advice(val_run, i, unconverged, s)}"
            )
        if not run.converged[i, 0]:
            notes.append(
                f"refit with C={c:g} stopped after {run.n_iter[i, 0]} L-BFGS iterations with "
                f"gradient max-norm {run.grad_norm[i, 0]:.2e} above tol={s.tol:g}; "
                f"{_advice(run, i, [0], s)}"
            )
        grid = [
            {
                "C": c_j,
                "val_accuracy": float(val_acc[i, j]),
                "converged": bool(val_run.converged[i, j]),
                "n_iter": int(val_run.n_iter[i, j]),
            }
            for j, c_j in enumerate(s.c_grid)
        ]
        results.append(
            task.layer_result(
                layer,
                engine="torch",
                test_pred=test_pred[i],
                train_accuracy=accuracy(task.y_train, train_pred[i]),
                val_accuracy=float(val_acc[i, best[i]]),
                params={
                    "C": c,
                    "max_iter": s.max_iter,
                    "tol": s.tol,
                    "dtype": str(dtype).removeprefix("torch."),
                    "layer_batch": n_layers,
                },
                grid=grid,
                converged=bool(run.converged[i, 0]),
                n_iter=int(run.n_iter[i, 0]),
                fit_seconds=seconds,
                warnings=notes,
            )
        )
        logger.info("logistic probe (torch): layer %d done (C=%g)", layer, c)
    return results


def _read_with_ones(
    task: ProbeTask, layers: list[int], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test features of ``layers``, (n_layers, n, dim + 1), last column all ones.

    With the ones column, one matmul gives the logits including the bias, and one gives the
    gradient of the weights and the bias. A separate bias term cost a fifth of each objective
    evaluation on a CPU.
    """
    out = []
    for n_items in (len(task.y_train), len(task.y_test)):
        x = torch.empty(len(layers), n_items, task.dim + 1, dtype=dtype, device=device)
        x[..., -1] = 1.0
        out.append(x)
    for i, layer in enumerate(layers):
        for x, part in zip(out, task.read_layer(layer), strict=True):
            x[i, :, :-1] = torch.from_numpy(part)
    return out[0], out[1]


def _fit_grid(
    x: torch.Tensor,
    y: torch.Tensor,
    s: LogisticSettings,
    n_classes: int,
    cov: torch.Tensor,
    check: Callable[[], None] | None = None,
) -> tuple[_BatchedLogistic, _Run]:
    """Fit every layer of ``x`` (n_layers, n_items, dim) with every value of the C grid.

    ``cov`` is the covariance of ``x`` per layer, (n_layers, dim, dim) float64.

    By default every value of C starts from zero in one batched run. With ``c_batch`` the
    grid goes in increasing runs of that many values, each warm-started from the largest C
    fitted so far (a regularisation path).
    """
    n_layers, n_c = len(x), len(s.c_grid)
    size = s.c_batch or n_c
    grid = torch.tensor(s.c_grid, dtype=torch.float64, device=x.device)
    fit = _BatchedLogistic(x, y, grid.expand(n_layers, n_c), n_classes, cov)
    runs = []
    for first in range(0, n_c, size):
        part = _BatchedLogistic(
            x, y, grid[first : first + size].expand(n_layers, -1), n_classes, cov
        )
        part.share_preconditioner(fit)
        if first:
            # (n_layers, 1, dim, k) broadcast over the run's values of C
            part.init_from(fit.weight[:, first - 1 : first], fit.bias[:, first - 1 : first])
        runs.append(part.minimise(s, check=check))
        fit.init_from_columns(first, part)
    combined = _Run(
        converged=np.concatenate([r.converged for r in runs], 1),
        grad_norm=np.concatenate([r.grad_norm for r in runs], 1),
        n_iter=np.concatenate([r.n_iter for r in runs], 1),
        stalled=np.concatenate([r.stalled for r in runs], 1),
    )
    return fit, combined


def _advice(run: _Run, layer: int, columns: list[int], s: LogisticSettings) -> str:
    if run.stalled[layer, columns].any():
        if s.dtype == "float64":
            return "the gradient stopped falling before max_iter; use a larger tol"
        return "the gradient stopped falling before max_iter; use dtype float64 or a larger tol"
    return "raise max_iter"


def _standardise_parts_(
    x_fit: torch.Tensor, x_val: torch.Tensor
) -> tuple[torch.Tensor, _Standardiser]:
    """Standardise the fit and validation parts (n_layers, n, dim + 1) in place with the fit
    part's statistics, leaving the last column (ones) as it is.

    Returns the covariance of the standardised fit part, (n_layers, dim, dim) float64, and the
    standardisation of the whole train set (both parts), which follows from the same sums
    without another pass over the features. The variances are the diagonals of the covariance
    matmuls: on a CPU, ``torch.var_mean`` along the item axis of two 50,000 x 512 layers took
    longer (0.76 s) than their whole covariance (0.67 s).
    """
    n_fit, n_val = x_fit.shape[1], x_val.shape[1]
    x_fit, x_val = x_fit[..., :-1], x_val[..., :-1]

    # Two centring passes. The second removes the rounding error of the first mean, so a
    # constant feature becomes exact zeros at any offset.
    first = x_fit.mean(dim=1, keepdim=True)
    x_fit.sub_(first)
    second = x_fit.mean(dim=1, keepdim=True)
    x_fit.sub_(second)
    x_val.sub_(first).sub_(second)
    mean = first.double() + second.double()  # (n_layers, 1, dim)

    # Each feature is divided by the power of two just above its largest centred magnitude.
    # That is exact, and the sums of squares below then cannot overflow, even for float32
    # features of 1e19, nor lose tiny features to rounding.
    peak = torch.stack(
        [x.amax(dim=1, keepdim=True).maximum(-x.amin(dim=1, keepdim=True)) for x in (x_fit, x_val)]
    ).amax(dim=0)
    unit = torch.ldexp(torch.ones_like(peak), torch.frexp(peak).exponent)
    x_fit.div_(unit)
    x_val.div_(unit)
    sums_fit = torch.bmm(x_fit.transpose(1, 2), x_fit).double()
    sums_val = torch.bmm(x_val.transpose(1, 2), x_val).double()
    # Mean of the whole train set minus the fit part's mean, (n_layers, dim), in units.
    shift = x_val.mean(dim=1).double() * (n_val / (n_fit + n_val))

    fit = _Standardiser(sums_fit / n_fit, mean, unit)
    fit.scale_(x_fit, x_val)
    whole = _Standardiser(
        (sums_fit + sums_val) / (n_fit + n_val) - shift[:, :, None] * shift[:, None, :],
        mean + shift[:, None] * unit.double(),
        unit,
    )
    return fit.cov, whole


class _Standardiser:
    """Per-layer centring and scaling of features (n_layers, n, dim + 1).

    Parameters
    ----------
    cov
        Covariance of the features divided by ``unit``, (n_layers, dim, dim) float64.
    mean
        Mean of the features, (n_layers, 1, dim) float64.
    unit
        Power of two per feature, (n_layers, 1, dim) in the compute dtype.

    A feature whose standard deviation is at most ``10 * eps`` of the compute dtype in units
    of ``unit`` counts as constant and keeps scale 1, as in scikit-learn's ``StandardScaler``.
    After the two centring passes that only happens where every value is the same. ``cov``
    is the covariance after scaling.
    """

    def __init__(self, cov: torch.Tensor, mean: torch.Tensor, unit: torch.Tensor) -> None:
        std = torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0.0).sqrt()  # (n_layers, dim)
        constant = std <= 10 * torch.finfo(unit.dtype).eps
        std = torch.where(constant, torch.ones_like(std), std)
        self.cov = cov / (std[:, :, None] * std[:, None, :])
        self.mean = mean.to(unit.dtype)
        self.std = torch.where(constant[:, None], 1.0, std[:, None] * unit.double()).to(unit.dtype)
        # Exact, because unit is a power of two.
        self.std_in_units = self.std / unit

    def scale_(self, *parts: torch.Tensor) -> None:
        """Scale each of ``parts`` (n_layers, n, dim), already centred and divided by ``unit``."""
        for x in parts:
            x.div_(self.std_in_units)

    def apply_(self, *parts: torch.Tensor) -> None:
        """Centre and scale each of ``parts`` (n_layers, n, dim + 1) in place, except the last
        column (ones)."""
        for x in parts:
            x = x[..., : self.std.shape[-1]]
            x.sub_(self.mean).div_(self.std)


@dataclass(frozen=True)
class _Run:
    converged: np.ndarray  # (n_layers, n_C) bool
    grad_norm: np.ndarray  # (n_layers, n_C) max-norm of each problem's gradient at the end
    n_iter: np.ndarray  # (n_layers, n_C) L-BFGS iterations of each problem
    # (n_layers, n_C) bool: stopped before tol and max_iter, because the line search failed
    # twice in a row or the gradient max-norm reached no new low for STALL_ITER iterations
    stalled: np.ndarray


# L-BFGS line search: sufficient-decrease constant and the most trial steps per iteration.
ARMIJO = 1e-4
MAX_TRIALS = 30
# Iterations without a new lowest gradient max-norm after which a problem counts as stalled.
STALL_ITER = 50
# False runs plain L-BFGS (identity initial Hessian), for comparisons.
PRECONDITION = True
# Added to every covariance eigenvalue in the preconditioner, in units of a standardised
# feature's variance. Without it, directions of tiny variance get a step scale of 1/penalty,
# and large-C fits on digits needed twice scikit-learn's iterations; 0.1 was the best of
# 0 to 0.3 on digits and on the synthetic benchmark.
DAMPING = 0.1
# Rows of the logit matmul below which a CPU pads it with zeros. On one thread of a 2-core
# Intel Xeon, MKL multiplied 10 rows by 50,000 x 513 features in 18 ms and 16 rows
# in 13 ms (best of 15).
MIN_LOGIT_ROWS = 16
# Items per block of the objective on a CPU. On the same machine, blocks of 4,096 made one
# evaluation of 4 to 8 problems on 40,000 items 10-25% faster than all items at once.
CPU_ROW_BLOCK = 4096
# Fraction of the problems in the solver's working set below which it drops the finished ones.
COMPACT_BELOW = 0.75


class _BatchedLogistic:
    """Independent logistic regressions, one per (layer, C), each with its own L-BFGS.

    Parameters
    ----------
    x
        Standardised features with a last column of ones, tensor of shape
        (n_layers, n_items, dim + 1). Its dtype is the compute dtype of the logits and
        gradients; weights, losses and the solver state are float64.
    y
        Class indices, tensor of shape (n_items,), shared by every layer.
    c
        Inverse regularisation strengths, tensor of shape (n_layers, n_C).
    cov
        Covariance of ``x`` per layer, float64 tensor of shape (n_layers, dim, dim); the
        preconditioner is built from its eigenvectors.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, n_classes: int, cov: torch.Tensor
    ) -> None:
        n_layers, n_items, dim = x.shape[0], x.shape[1], x.shape[2] - 1
        # Two classes: one logit column against a fixed zero, as scikit-learn's binary model;
        # two free columns would halve the effective penalty.
        self.binary = n_classes == 2
        k = 1 if self.binary else n_classes
        self.x, self.y = x, y
        self.n_c = c.shape[1]
        # (n_layers, n_C) float64, on the CPU: the solver reads it per layer
        self.penalty = (1.0 / (2.0 * c.double() * n_items)).cpu().numpy()
        # Weights and bias of each problem in one tensor: rows 0..dim-1 weight, row dim bias.
        self.theta = torch.zeros(
            n_layers, self.n_c, dim + 1, k, dtype=torch.float64, device=x.device
        )
        self.cov = cov
        self._eigen: tuple[torch.Tensor, torch.Tensor] | None = None
        self._vectors: torch.Tensor | None = None
        # Curvature of the loss per unit of feature variance at zero weights: the softmax
        # Hessian is (I - 1/n_classes) / n_classes there, and p (1 - p) = 1/4 for two classes.
        self.curvature = 0.25 if self.binary else 1.0 / n_classes
        # Lowest logit, relative to the largest logit of its item, that enters exp(). The
        # smallest probability, exp(exp_floor) / n_classes, is then a normal number.
        self.exp_floor = math.log(torch.finfo(x.dtype).tiny) + math.log(n_classes) + 1.0

    @property
    def weight(self) -> torch.Tensor:
        """Weights of shape (n_layers, n_C, dim, k)."""
        return self.theta[..., :-1, :]

    @property
    def bias(self) -> torch.Tensor:
        """Biases of shape (n_layers, n_C, k)."""
        return self.theta[..., -1, :]

    def init_from(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Start from these weights (broadcast to (n_layers, n_C, dim, k)) and biases."""
        self.weight.copy_(weight)
        self.bias.copy_(bias)

    def init_from_columns(self, first: int, part: _BatchedLogistic) -> None:
        """Copy the solutions of ``part`` into the values of C from index ``first`` on."""
        n = part.theta.shape[1]
        self.theta[:, first : first + n] = part.theta

    def share_preconditioner(self, other: _BatchedLogistic) -> None:
        """Reuse the covariance eigenvectors of ``other`` (same features)."""
        self._eigen = other.eigen()
        self._vectors = other._compute_vectors()

    def _compute_vectors(self) -> torch.Tensor:
        """Return the covariance eigenvectors in the compute dtype."""
        if self._vectors is None:
            self._vectors = self.eigen()[1].to(self.x.dtype)
        return self._vectors

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (n_layers, dim) and eigenvectors (n_layers, dim, dim) of the covariance."""
        if self._eigen is None:
            values, vectors = torch.linalg.eigh(self.cov)
            self._eigen = (values.clamp_min(0.0), vectors)
        return self._eigen

    def logits(self, x: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (n_layers, n_items, n_C, n_classes) for features (n_layers, n, dim + 1)."""
        theta = (self.theta if theta is None else theta).to(x.dtype)
        n_layers, n_c, rows, k = theta.shape
        w = theta.permute(0, 2, 1, 3).reshape(n_layers, rows, n_c * k)
        z = torch.bmm(x, w).view(n_layers, -1, n_c, k)
        if self.binary:
            z = torch.cat([torch.zeros_like(z), z], dim=-1)
        return z

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes (n_layers, n_C, n_items) for features (n_layers, n, dim + 1)."""
        return self.logits(x).argmax(dim=-1).permute(0, 2, 1)

    # -- objective ---------------------------------------------------------------------------

    def _objective(self, ids: np.ndarray, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectives (m,) and gradients (m, dim + 1, k) of the problems ``ids`` at ``theta``.

        ``ids`` are sorted flat problem indices (layer * n_C + column) and ``theta`` holds
        their parameters, shape (m, dim + 1, k). The problems of one layer share one matmul.
        """
        f = torch.empty(len(ids), dtype=torch.float64, device=theta.device)
        g = torch.empty_like(theta)
        for layer, a, b in _layer_groups(ids, self.n_c):
            penalty = self.penalty.reshape(-1)[ids[a:b]]
            f[a:b], g[a:b] = self._layer_objective(layer, theta[a:b], penalty)
        return f, g

    def _layer_objective(
        self, layer: int, theta: torch.Tensor, penalty: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[layer]  # (n, dim + 1), compute dtype, last column ones
        n, rows = x.shape
        dim = rows - 1
        m, _, k = theta.shape
        w = theta.to(x.dtype).transpose(1, 2).reshape(m * k, rows)
        if m * k < MIN_LOGIT_ROWS and x.device.type == "cpu":
            w = torch.cat([w, w.new_zeros(MIN_LOGIT_ROWS - m * k, rows)])

        # On a CPU the items go in blocks, so that each block of features is read from
        # memory once for both matmuls and the softmax works on data in cache.
        block = CPU_ROW_BLOCK if x.device.type == "cpu" else n
        nll = torch.zeros(m, dtype=torch.float64, device=x.device)
        grad = torch.zeros(m * k, rows, dtype=torch.float64, device=x.device)
        for first in range(0, n, block):
            part_nll, part_grad = self._block_terms(
                x[first : first + block], self.y[first : first + block], w, m, k
            )
            nll += part_nll
            grad += part_grad
        nll /= n
        grad /= n
        grad = grad.view(m, k, rows).transpose(1, 2)

        pen = torch.as_tensor(penalty, device=theta.device)
        weight = theta[:, :dim]
        nll += pen * weight.pow(2).sum(dim=(1, 2))
        grad[:, :dim] += (2.0 * pen)[:, None, None] * weight
        return nll, grad

    def _block_terms(
        self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, m: int, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum the cross-entropy (m,) and its gradient (m * k, dim + 1) over items ``x``.

        ``w`` contains the weights of the m problems as rows (m * k, dim + 1), possibly followed
        by rows of zeros. The sums are float64.
        """
        n = x.shape[0]
        # Logits as (m, k, n): the softmax then reduces over a short axis whose elements
        # lie n apart, which vectorises over the items. Along a contiguous axis of 10
        # classes torch's CPU softmax costs as much as the matmuls.
        z = (w @ x.T)[: m * k].view(m, k, n)
        if self.binary:
            z = torch.cat([torch.zeros_like(z), z], dim=1)
        # Softmax and log-softmax over the classes, without subnormal numbers. Once a fit is
        # confident, most float32 probabilities fall below the smallest normal number. On a
        # 2-core Intel Xeon exp() into that range ran 33 times slower and a matmul on such
        # numbers 190 times (docs/benchmarks-probe.md, table 6), and
        # torch.set_flush_denormal reaches the calling thread only. So each logit enters
        # exp() at most ``exp_floor`` (about -84 in float32) below the largest logit of its
        # item, which moves a probability by less than 1e-35.
        z -= z.amax(dim=1, keepdim=True)
        exps = z.clamp_min(self.exp_floor).exp_()
        total = exps.sum(dim=1, keepdim=True)  # (m, 1, n), at least 1

        target = y.view(1, 1, n).expand(m, 1, n)
        # Sums over the items in float64: the line search compares losses that differ by
        # little more than float32 resolution.
        nll = (total.log().squeeze(1) - z.gather(1, target).squeeze(1)).sum(
            dim=1, dtype=torch.float64
        )  # (m,)
        residual = exps.div_(total)  # softmax minus one-hot, over n
        minus_one = torch.full((1, 1, 1), -1.0, dtype=x.dtype, device=x.device)
        residual.scatter_add_(1, target, minus_one.expand(m, 1, n))
        if self.binary:
            residual = residual[:, 1:]

        # Weights and bias in one matmul, through the ones column.
        return nll, (residual.reshape(m * k, n) @ x).double()

    def _precondition(self, ids: np.ndarray, q: torch.Tensor) -> torch.Tensor:
        """Apply each problem's inverse Hessian estimate at zero weights to ``q`` (m, dim+1, k).

        At zero weights the Hessian of problem (layer, C) is ``curvature * cov(layer) +
        2 * penalty`` on the weights and ``curvature`` on the bias. That holds exactly on the
        subspace where the class columns sum to zero, which the iterates never leave. The
        estimate adds ``DAMPING`` to the covariance eigenvalues, so the first step from zero
        is close to a Newton step in the directions of large variance.
        """
        if not PRECONDITION:
            return q.clone()
        values, _ = self.eigen()
        # The rotations run in the compute dtype: the estimate only shapes the search
        # direction, and each step is checked on the exact objective.
        vectors = self._compute_vectors()
        out = torch.empty_like(q)
        dim = q.shape[1] - 1
        for layer, a, b in _layer_groups(ids, self.n_c):
            m, k = b - a, q.shape[2]
            u = vectors[layer]
            pen = torch.as_tensor(self.penalty.reshape(-1)[ids[a:b]], device=q.device)
            qw = q[a:b, :dim].permute(1, 0, 2).reshape(dim, m * k).to(u.dtype)
            rotated = (u.T @ qw).view(dim, m, k)
            scale = self.curvature * (values[layer][:, None] + DAMPING) + 2.0 * pen[None, :]
            rotated /= scale[:, :, None].to(u.dtype)
            turned_back = (u @ rotated.view(dim, m * k)).view(dim, m, k).permute(1, 0, 2)
            out[a:b, :dim] = turned_back
            out[a:b, dim] = q[a:b, dim] / self.curvature
        return out

    # -- solver ------------------------------------------------------------------------------

    def minimise(self, s: LogisticSettings, check: Callable[[], None] | None = None) -> _Run:
        """Run one L-BFGS per problem until it meets ``tol``, stalls or reaches max_iter.

        Each problem has its own curvature history, step length and backtracking line
        search, so no problem waits for or steers another. Each iteration evaluates every
        problem still running, with one matmul per layer. ``check`` is called before each
        iteration and stops the run by raising.
        """
        n_layers, n_c = self.theta.shape[:2]
        total = n_layers * n_c
        flat = self.theta.view(total, *self.theta.shape[2:])
        n_iter = np.zeros(total, dtype=np.int64)
        norms = np.full(total, np.inf)
        stalled = np.zeros(total, dtype=bool)
        solver = _Solver(self, np.arange(total), flat.clone(), s)
        norms[solver.ids] = solver.norms()
        losses = np.full(total, np.inf)
        lows = _GradientLows(total, solver.noise)
        live = ~(norms <= s.tol) & (s.max_iter > 0)
        while live.any():
            if check is not None:
                check()
            solver.keep(live[solver.ids], flat)
            done, failed = solver.step()
            n_iter[solver.ids[done]] += 1
            norms[solver.ids] = solver.norms()
            stalled[solver.ids[failed]] = True
            losses[solver.ids] = solver.f.cpu().numpy()
            stalled |= live & lows.stalled(norms, losses, n_iter)
            live &= ~stalled & (n_iter < s.max_iter) & ~(norms <= s.tol)
        solver.keep(np.zeros(len(solver.ids), dtype=bool), flat)
        shape = (n_layers, n_c)
        return _Run(
            converged=(norms <= s.tol).reshape(shape),
            grad_norm=norms.reshape(shape),
            n_iter=n_iter.reshape(shape),
            stalled=stalled.reshape(shape),
        )


class _GradientLows:
    """Lowest gradient max-norm of each problem reached by an iteration, with its iteration and
    loss.

    A problem is stalled when its gradient has reached no new low for STALL_ITER iterations
    and its loss has fallen by no more than STALL_ITER times its rounding level since that low.
    Its dtype's rounding (float32 near a small tol) then stops it. A large-C fit can go on
    lowering its loss for many iterations while its gradient max-norm stays above an early
    low, as a run warm-started from a nearby value of C does. The starting point does not count.
    """

    def __init__(self, total: int, noise: float) -> None:
        self.noise = noise  # relative rounding level of a loss
        self.best = np.full(total, np.inf)
        self.best_iter = np.zeros(total, dtype=np.int64)
        self.best_loss = np.full(total, np.inf)

    def stalled(self, norms: np.ndarray, losses: np.ndarray, n_iter: np.ndarray) -> np.ndarray:
        """Record ``norms`` and ``losses`` after ``n_iter`` iterations and return which
        problems stalled."""
        improved = (norms < self.best) & (n_iter > 0)
        self.best[improved] = norms[improved]
        self.best_iter[improved] = n_iter[improved]
        self.best_loss[improved] = losses[improved]
        flat = self.best_loss - losses <= STALL_ITER * self.noise * np.abs(losses)
        return (n_iter - self.best_iter >= STALL_ITER) & flat


class _Solver:
    """L-BFGS state of the problems in a working set, one row per problem.

    ``ids`` are the flat indices of the problems in the set. Rows stay in the set after their
    problem finishes (masked out) until fewer than ``COMPACT_BELOW`` of them are running.
    """

    def __init__(
        self, model: _BatchedLogistic, ids: np.ndarray, theta: torch.Tensor, s: LogisticSettings
    ) -> None:
        self.model, self.ids, self.theta = model, ids, theta
        n, rows, k = theta.shape
        self.f, self.g = model._objective(ids, theta)
        self.history = s.history_size
        self.s = torch.zeros(n, s.history_size, rows, k, dtype=theta.dtype, device=theta.device)
        self.y = torch.zeros_like(self.s)
        self.rho = torch.zeros(n, s.history_size, dtype=theta.dtype, device=theta.device)
        self.gamma = torch.ones(n, dtype=theta.dtype, device=theta.device)
        self.head, self.filled = 0, 0
        self.running = np.ones(n, dtype=bool)
        # Rows whose history was cleared after a failed line search; a second failure in a
        # row stops them.
        self.restarted = np.zeros(n, dtype=bool)
        # Relative rounding level of a loss computed from compute-dtype logits.
        self.noise = 10.0 * float(torch.finfo(model.x.dtype).eps)

    def norms(self) -> np.ndarray:
        """Gradient max-norm of each row."""
        return self.g.abs().amax(dim=(1, 2)).cpu().numpy()

    def keep(self, running: np.ndarray, out: torch.Tensor) -> None:
        """Write finished rows to ``out`` (flat theta); drop them once few rows still run."""
        finished = self.running & ~running
        if finished.any():
            rows = torch.as_tensor(np.flatnonzero(finished), device=self.theta.device)
            out[torch.as_tensor(self.ids[finished], device=out.device)] = self.theta[rows]
        self.running = running
        if running.sum() >= COMPACT_BELOW * len(running):
            return
        rows = torch.as_tensor(np.flatnonzero(running), device=self.theta.device)
        self.ids = self.ids[running]
        self.restarted = self.restarted[running]
        for name in ("theta", "f", "g", "s", "y", "rho", "gamma"):
            setattr(self, name, getattr(self, name)[rows])
        self.running = np.ones(len(self.ids), dtype=bool)

    def step(self) -> tuple[np.ndarray, np.ndarray]:
        """Take one L-BFGS step on every running row.

        Returns the rows (in the current working set) that took a step and those whose line
        search failed.
        """
        rows = np.flatnonzero(self.running)
        index = torch.as_tensor(rows, device=self.theta.device)
        g = self.g[index]
        direction = -self._two_loop(rows, index, g)
        slope = _dot(g, direction)  # directional derivative at step 0, (m,)
        # A direction that is not a descent direction (rounding) restarts from -M g.
        uphill = slope >= 0
        if bool(uphill.any()):
            fallback = -self.model._precondition(self.ids[rows], g)
            direction = torch.where(uphill[:, None, None], fallback, direction)
            slope = torch.where(uphill, _dot(g, direction), slope)
            self.rho[index[uphill]] = 0.0

        f0 = self.f[index]
        step = torch.ones_like(f0)
        theta0 = self.theta[index]
        new_theta = theta0.clone()
        new_f, new_g = f0.clone(), g.clone()
        accepted = torch.zeros(len(rows), dtype=torch.bool, device=f0.device)
        pending = np.arange(len(rows))
        for _ in range(MAX_TRIALS):
            p = torch.as_tensor(pending, device=f0.device)
            trial = theta0[p] + step[p, None, None] * direction[p]
            f, grad = self.model._objective(self.ids[rows[pending]], trial)
            d_slope = _dot(grad, direction[p])
            armijo = f <= f0[p] + ARMIJO * step[p] * slope[p]
            # For a quadratic, Armijo's condition is equivalent to
            # slope(t) <= (1 - 2 * ARMIJO) * |slope(0)|. That test uses the gradient only,
            # which stays accurate where the loss change drops below its rounding level.
            flat = (f <= f0[p] + self.noise * f0[p].abs()) & (
                d_slope <= (2 * ARMIJO - 1) * slope[p]
            )
            ok = armijo | flat
            ok_rows = p[ok]
            new_theta[ok_rows], new_f[ok_rows], new_g[ok_rows] = trial[ok], f[ok], grad[ok]
            accepted[ok_rows] = True
            # Backtrack to the root of the secant of the slope, within [0.1, 0.5] of the step.
            t = step[p]
            root = t * slope[p] / (slope[p] - d_slope)
            root = torch.where(d_slope > slope[p], root, 0.5 * t)
            step[p] = torch.minimum(torch.maximum(root, 0.1 * t), 0.5 * t)
            pending = pending[~ok.cpu().numpy()]
            if len(pending) == 0:
                break

        took = accepted.cpu().numpy()
        # A failed line search first clears the row's curvature history, so that the next
        # try goes along the preconditioned gradient.
        retry = rows[~took & ~self.restarted[rows]]
        self.rho[torch.as_tensor(retry, device=self.rho.device)] = 0.0
        failed = rows[~took & self.restarted[rows]]
        self.restarted[rows] = ~took
        s_new = new_theta - theta0
        y_new = new_g - g
        sy = _dot(s_new, y_new)
        yy = _dot(y_new, y_new)
        valid = accepted & (sy > 1e-10 * yy)
        slot = self.head
        self.s[index, slot] = torch.where(valid[:, None, None], s_new, 0.0)
        self.y[index, slot] = torch.where(valid[:, None, None], y_new, 0.0)
        self.rho[index, slot] = torch.where(valid, 1.0 / sy.where(valid, 1.0), 0.0)
        my = self.model._precondition(self.ids[rows], y_new)
        gamma = sy / _dot(y_new, my).clamp_min(torch.finfo(sy.dtype).tiny)
        self.gamma[index] = torch.where(valid, gamma, self.gamma[index])
        self.head = (self.head + 1) % self.history
        self.filled = min(self.filled + 1, self.history)
        self.theta[index], self.f[index], self.g[index] = new_theta, new_f, new_g
        return rows[took], failed

    def _two_loop(self, rows: np.ndarray, index: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Inverse Hessian estimate times ``g`` for the rows ``index``, shape (m, dim+1, k)."""
        every = len(rows) == len(self.ids)
        s = self.s if every else self.s[index]
        y = self.y if every else self.y[index]
        rho = self.rho if every else self.rho[index]
        q = g.clone()
        alphas = []
        for j in range(self.filled):
            slot = (self.head - 1 - j) % self.history
            alpha = rho[:, slot] * _dot(s[:, slot], q)
            q.addcmul_(alpha[:, None, None], y[:, slot], value=-1.0)
            alphas.append((slot, alpha))
        r = self.gamma[index][:, None, None] * self.model._precondition(self.ids[rows], q)
        for slot, alpha in reversed(alphas):
            beta = rho[:, slot] * _dot(y[:, slot], r)
            r.addcmul_((alpha - beta)[:, None, None], s[:, slot])
        return r


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of (m, ...) tensors, shape (m,)."""
    return torch.einsum("ij,ij->i", a.reshape(len(a), -1), b.reshape(len(b), -1))


def _layer_groups(ids: np.ndarray, n_c: int) -> list[tuple[int, int, int]]:
    """(layer, start, stop) of each run of sorted flat problem indices with the same layer."""
    layers = ids // n_c
    starts = np.flatnonzero(np.r_[True, layers[1:] != layers[:-1]])
    stops = np.r_[starts[1:], len(ids)]
    return [(int(layers[a]), int(a), int(b)) for a, b in zip(starts, stops, strict=True)]
