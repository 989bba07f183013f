"""Linear probes: L2-regularised multinomial logistic regression on standardised features.

Two engines minimise the same objective per layer and value of C,

    mean cross-entropy + ||W||^2 / (2 * C * n_items)      (bias not penalised),

which is scikit-learn's ``LogisticRegression(C=C)`` objective scaled by ``1 / (C * n_items)``:

- ``"sklearn"`` (the reference): ``StandardScaler`` + ``LogisticRegression(solver="lbfgs")``,
  layer by layer and value by value.
- ``"torch"``: one full-batch L-BFGS run over the summed objective of every layer of a batch
  and every value of the C grid at once, with weights of shape (n_layers, n_C, dim, n_classes).
  The problems are independent, so the gradient of the sum is the stack of their gradients.
  Its max-norm meets ``tol`` only when every problem does, and convergence is checked per
  problem.

Both engines choose C on the validation part (fitted on the fit part, standardised with its
statistics), then refit on the whole train set with the chosen C. In the torch engine
``fit_seconds`` is the layer's share of its batch, and ``n_iter`` counts the iterations of the
shared run.

The torch engine computes in float64 by default (float32 stalls short of the default ``tol``)
and agrees with the reference within 0.1 accuracy points on digits and on the synthetic
benchmark. On a CPU it is slower than the single-threaded reference: the shared line search
needs several times the iterations of the hardest single problem, and every iteration
evaluates every problem still running (measured in docs/benchmarks-probe.md).
``c_batch=1`` (one value of C per run, warm-started along the grid) makes it about three
times faster on a CPU.

NOTE: on a CPU shared with other busy processes, torch's threaded BLAS calls inside L-BFGS wait
for descheduled threads; fewer torch threads (``torch.set_num_threads``) then run faster.
"""

from __future__ import annotations

import logging
import time
import warnings
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

# Bytes of features and activations that one torch batch of layers may hold on the CPU.
CPU_BATCH_BYTES = 2 * 2**30


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
    batch = s.layer_batch or _layer_batch(task, s, device, dtype)
    logger.info(
        "logistic probe (torch): %d layers in batches of %d, %d values of C, %s on %s",
        len(task.layers),
        batch,
        len(s.c_grid),
        dtype,
        device,
    )
    results: list[dict[str, Any]] = []
    for first in range(0, len(task.layers), batch):
        layers = task.layers[first : first + batch]
        results.extend(_fit_torch_batch(task, s, layers, device, dtype))
        task.report_progress(len(results))
    return results


def _layer_batch(
    task: ProbeTask, s: LogisticSettings, device: torch.device, dtype: torch.dtype
) -> int:
    """Layers per L-BFGS run so that features and logits stay within a memory budget."""
    n_train, n_test = len(task.y_train), len(task.y_test)
    itemsize = torch.finfo(dtype).bits // 8
    # raw, standardised and subset copies of train features, test features, ~4 logits-sized
    # buffers, and the L-BFGS history (two weight-sized vectors per remembered step)
    n_weights = len(s.c_grid) * (task.dim + 1) * task.n_classes
    per_layer = itemsize * (
        (3 * n_train + n_test) * task.dim
        + 4 * n_train * len(s.c_grid) * task.n_classes
        + 2 * s.history_size * n_weights
    )
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 2
    else:
        budget = CPU_BATCH_BYTES
    return max(1, min(len(task.layers), budget // per_layer))


def _fit_torch_batch(
    task: ProbeTask,
    s: LogisticSettings,
    layers: list[int],
    device: torch.device,
    dtype: torch.dtype,
) -> list[dict[str, Any]]:
    start = time.perf_counter()
    arrays = [task.read_layer(layer) for layer in layers]
    x_train = torch.stack([torch.from_numpy(a) for a, _ in arrays]).to(device, dtype)
    x_test = torch.stack([torch.from_numpy(b) for _, b in arrays]).to(device, dtype)
    del arrays  # (n_layers, n_items, dim) each
    y_train = torch.from_numpy(task.y_train).to(device)
    fit_idx = torch.from_numpy(task.fit_part).to(device)
    val_idx = torch.from_numpy(task.val_part).to(device)
    n_layers = len(layers)

    # Validation: every layer x every C, standardised with the fit part's statistics.
    x_fit, x_val = _standardise(x_train[:, fit_idx], x_train[:, val_idx])
    val_fit, val_run, val_iter = _fit_grid(x_fit, y_train[fit_idx], s, task.n_classes)
    del x_fit
    val_pred = val_fit.predict(x_val)  # (n_layers, n_C, n_val)
    val_acc = (val_pred == y_train[val_idx]).double().mean(dim=2).cpu().numpy()
    del x_val, val_pred
    # First maximum per layer: ties go to the smallest C, as in the sklearn engine.
    best = np.argmax(val_acc, axis=1)

    # Refit on all of train with each layer's chosen C, warm-started from its validation fit.
    x_all, x_test = _standardise(x_train, x_test)
    del x_train
    chosen = torch.tensor([s.c_grid[i] for i in best], dtype=dtype, device=device)
    refit = _BatchedLogistic(x_all, y_train, chosen[:, None], task.n_classes)
    rows = torch.arange(n_layers, device=device)
    pick = torch.from_numpy(best).to(device)
    refit.init_from(val_fit.weight[rows, pick][:, None], val_fit.bias[rows, pick][:, None])
    del val_fit
    run = refit.minimise(s)
    train_pred = refit.predict(x_all)[:, 0].cpu().numpy()  # (n_layers, n_train)
    test_pred = refit.predict(x_test)[:, 0].cpu().numpy()  # (n_layers, n_test)
    seconds = (time.perf_counter() - start) / n_layers

    results = []
    for i, layer in enumerate(layers):
        notes = []
        unconverged = [c for j, c in enumerate(s.c_grid) if not val_run.converged[i, j]]
        if unconverged:
            notes.append(
                f"validation fits with C={unconverged} stopped after {val_run.n_iter} L-BFGS "
                f"iterations with gradient max-norm up to {val_run.grad_norm[i].max():.2e} "
                f"above tol={s.tol:g}; {_advice(val_run, s)}"
            )
        if not run.converged[i, 0]:
            notes.append(
                f"refit with C={s.c_grid[best[i]]:g} stopped after {run.n_iter} L-BFGS "
                f"iterations with gradient max-norm {run.grad_norm[i, 0]:.2e} above "
                f"tol={s.tol:g}; {_advice(run, s)}"
            )
        grid = [
            {
                "C": c,
                "val_accuracy": float(val_acc[i, j]),
                "converged": bool(val_run.converged[i, j]),
                "n_iter": val_iter[j],
            }
            for j, c in enumerate(s.c_grid)
        ]
        results.append(
            task.layer_result(
                layer,
                engine="torch",
                test_pred=test_pred[i],
                train_accuracy=accuracy(task.y_train, train_pred[i]),
                val_accuracy=float(val_acc[i, best[i]]),
                params={
                    "C": s.c_grid[best[i]],
                    "max_iter": s.max_iter,
                    "tol": s.tol,
                    "dtype": str(dtype).removeprefix("torch."),
                    "layer_batch": n_layers,
                },
                grid=grid,
                converged=bool(run.converged[i, 0]),
                n_iter=run.n_iter,
                fit_seconds=seconds,
                warnings=notes,
            )
        )
        logger.info("logistic probe (torch): layer %d done (C=%g)", layer, s.c_grid[best[i]])
    return results


def _fit_grid(
    x: torch.Tensor, y: torch.Tensor, s: LogisticSettings, n_classes: int
) -> tuple[_BatchedLogistic, _Run, list[int]]:
    """Fit every layer of ``x`` (n_layers, n_items, dim) with every value of the C grid.

    By default all values of C share one L-BFGS run. With ``c_batch`` the grid goes in
    increasing runs of that many values, each warm-started from the largest C fitted so far
    (a regularisation path): fewer problems per evaluation and a better start, at the price
    of more runs.

    Returns the fitted problems, their convergence (``n_iter`` is that of the longest run)
    and the L-BFGS iterations of the run that fitted each value of C.
    """
    n_layers, n_c = len(x), len(s.c_grid)
    size = s.c_batch or n_c
    grid = torch.tensor(s.c_grid, dtype=x.dtype, device=x.device)
    fit = _BatchedLogistic(x, y, grid.expand(n_layers, n_c), n_classes)
    converged, norms, n_iter = [], [], []
    for first in range(0, n_c, size):
        part = _BatchedLogistic(x, y, grid[first : first + size].expand(n_layers, -1), n_classes)
        if first:
            # (n_layers, 1, dim, k) broadcast over the run's values of C
            part.init_from(fit.weight[:, first - 1 : first], fit.bias[:, first - 1 : first])
        run = part.minimise(s)
        fit.init_from_columns(first, part)
        converged.append(run.converged)
        norms.append(run.grad_norm)
        n_iter += [run.n_iter] * run.converged.shape[1]
    combined = _Run(np.concatenate(converged, 1), np.concatenate(norms, 1), max(n_iter))
    return fit, combined, n_iter


def _advice(run: _Run, s: LogisticSettings) -> str:
    if run.n_iter >= s.max_iter:
        return "raise max_iter"
    return "the line search stalled before max_iter; use dtype float64 or a larger tol"


def _standardise(fit: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise both with the per-layer statistics of ``fit`` (n_layers, n_items, dim).

    Constant features keep scale 1, as in StandardScaler, so they become exact zeros.
    """
    mean = fit.mean(dim=1, keepdim=True)
    std = fit.std(dim=1, keepdim=True, correction=0)
    std = torch.where(std < 10 * torch.finfo(fit.dtype).eps, torch.ones_like(std), std)
    return (fit - mean) / std, (other - mean) / std


@dataclass(frozen=True)
class _Run:
    converged: np.ndarray  # (n_layers, n_C) bool
    grad_norm: np.ndarray  # (n_layers, n_C) max-norm of each problem's gradient at the end
    n_iter: int  # L-BFGS iterations of the whole run


class _BatchedLogistic:
    """Independent logistic regressions, one per (layer, C), sharing a full-batch L-BFGS.

    Parameters
    ----------
    x
        Standardised features, tensor of shape (n_layers, n_items, dim).
    y
        Class indices, tensor of shape (n_items,), shared by every layer.
    c
        Inverse regularisation strengths, tensor of shape (n_layers, n_C).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, n_classes: int) -> None:
        n_layers, n_items, dim = x.shape
        # Two classes: one logit column against a fixed zero, as scikit-learn's binary model;
        # two free columns would halve the effective penalty.
        self.binary = n_classes == 2
        k = 1 if self.binary else n_classes
        self.x, self.y = x, y
        self.penalty = 1.0 / (2.0 * c * n_items)  # (n_layers, n_C)
        self.weight = torch.zeros(n_layers, c.shape[1], dim, k, dtype=x.dtype, device=x.device)
        self.bias = torch.zeros(n_layers, c.shape[1], k, dtype=x.dtype, device=x.device)

    def init_from(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Start from these weights (broadcast to (n_layers, n_C, dim, k)) and biases."""
        self.weight.copy_(weight)
        self.bias.copy_(bias)

    def init_from_columns(self, first: int, part: _BatchedLogistic) -> None:
        """Copy the solutions of ``part`` into the values of C from index ``first`` on."""
        n = part.weight.shape[1]
        self.weight[:, first : first + n] = part.weight
        self.bias[:, first : first + n] = part.bias

    def logits(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of shape (n_layers, n_items, n_C, n_classes) for features (n_layers, n, dim)."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        n_layers, n_c, dim, k = weight.shape
        w = weight.permute(0, 2, 1, 3).reshape(n_layers, dim, n_c * k)
        z = torch.bmm(x, w).view(n_layers, -1, n_c, k) + bias[:, None]
        if self.binary:
            z = torch.cat([torch.zeros_like(z), z], dim=-1)
        return z

    def objectives(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, penalty: torch.Tensor
    ) -> torch.Tensor:
        """Objective of each problem, tensor of shape (n_layers, n_C), for a subset of them."""
        logp = torch.log_softmax(self.logits(x, weight, bias), dim=-1)  # (L, n, n_C, classes)
        target = self.y.view(1, -1, 1, 1).expand(*logp.shape[:3], 1)
        nll = -logp.gather(-1, target).squeeze(-1).mean(dim=1)  # (n_layers, n_C)
        return nll + penalty * weight.pow(2).sum(dim=(2, 3))

    def minimise(self, s: LogisticSettings) -> _Run:
        """Run L-BFGS on the summed objective until every problem meets ``tol`` or max_iter.

        The run goes in rounds of ``ROUND_ITER`` iterations. Once every problem of a layer or
        of a value of C meets ``tol`` at the end of a round, every problem that meets it is
        frozen there, as scikit-learn stops a single fit. The solver then restarts on the rest
        and drops the layers and values of C that have no problem left. Without this, easy
        problems (small C) would be evaluated, and would steer the shared line search, until
        the hardest one converges.
        """
        n_layers, n_c = self.penalty.shape
        active = torch.ones(n_layers, n_c, dtype=torch.bool, device=self.x.device)
        norms = torch.full((n_layers, n_c), float("inf"), dtype=self.x.dtype, device=self.x.device)
        n_iter, stalled = 0, False
        while active.any() and n_iter < s.max_iter and not stalled:
            rows = active.any(dim=1).nonzero().squeeze(1)
            cols = active[rows].any(dim=0).nonzero().squeeze(1)
            mask = active[rows][:, cols]
            done, sub_norms, stalled = self._rounds(rows, cols, mask, s, s.max_iter - n_iter)
            n_iter += done
            block = (rows[:, None], cols)
            norms[block] = torch.where(mask, sub_norms, norms[block])
            active[block] &= ~(sub_norms <= s.tol)
        final = norms.cpu().numpy()
        return _Run(converged=final <= s.tol, grad_norm=final, n_iter=n_iter)

    def _rounds(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        mask: torch.Tensor,
        s: LogisticSettings,
        budget: int,
    ) -> tuple[int, torch.Tensor, bool]:
        """Minimise the problems ``mask`` of the block (rows, cols) and store their weights.

        The run stops when all problems of one layer or one value of C meet ``tol``, when the
        solver stalls, or after ``budget`` iterations.

        Returns the iterations run, the gradient max-norms of the block's problems (shape
        (len(rows), len(cols))) and whether the solver stalled.
        """
        x = self.x if len(rows) == len(self.x) else self.x[rows]
        penalty = self.penalty[rows][:, cols]
        weight = self.weight[rows][:, cols].requires_grad_(True)
        bias = self.bias[rows][:, cols].requires_grad_(True)
        live = mask.to(self.x.dtype)  # frozen problems leave the sum, so their gradient is 0
        optimizer = _lbfgs([weight, bias], s, self.x.dtype)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = (self.objectives(x, weight, bias, penalty) * live).sum()
            loss.backward()
            return loss

        n_iter, stalled = 0, False
        while n_iter < budget:
            # The optimizer keeps its curvature history from one round to the next.
            limit = min(ROUND_ITER, budget - n_iter)
            optimizer.param_groups[0]["max_iter"] = limit
            before = _iterations(optimizer)
            optimizer.step(closure)
            done = _iterations(optimizer) - before
            n_iter += done
            closure()  # gradients at the current point
            norms = _grad_norms(weight, bias)
            settled = (norms <= s.tol) | ~mask
            stalled = done < limit and not bool(settled.all())
            # Restart on a smaller block once a whole layer or value of C has converged.
            if settled.all(dim=1).any() or settled.all(dim=0).any() or stalled:
                break
        with torch.no_grad():
            self.weight[rows[:, None], cols] = weight
            self.bias[rows[:, None], cols] = bias
        return n_iter, norms.detach(), stalled

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes of shape (n_layers, n_C, n_items) for features (n_layers, n, dim)."""
        return self.logits(x).argmax(dim=-1).permute(0, 2, 1)


# L-BFGS iterations between convergence checks of the individual problems.
ROUND_ITER = 25


def _lbfgs(
    params: list[torch.Tensor], s: LogisticSettings, dtype: torch.dtype
) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=ROUND_ITER,
        max_eval=10 * ROUND_ITER,
        tolerance_grad=s.tol,
        # Stop early only on a true stall (loss and weights exactly unchanged). Any larger
        # threshold on the change of the summed loss stops runs before the gradient
        # tolerance is met: near the optimum the loss changes by ~|grad|^2 / curvature.
        tolerance_change=torch.finfo(dtype).tiny,
        history_size=s.history_size,
        line_search_fn="strong_wolfe",
    )


def _iterations(optimizer: torch.optim.LBFGS) -> int:
    first = optimizer.param_groups[0]["params"][0]
    return int(optimizer.state[first].get("n_iter", 0))


def _grad_norms(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Max-norm of each problem's gradient, shape (n_layers, n_C); needs ``.grad`` set."""
    assert weight.grad is not None and bias.grad is not None
    return torch.maximum(weight.grad.abs().amax(dim=(2, 3)), bias.grad.abs().amax(dim=2))
