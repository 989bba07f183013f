"""MLP probes: one hidden layer, AdamW, early stopping on validation accuracy.

The network trains on the fit part of train, standardised with its statistics. After each
epoch it is scored on the validation part. The weights of the best epoch are kept and
evaluated on test. Training stops once ``patience`` epochs pass without a new best.

Every random draw comes from ``seed``: the initial weights and dropout masks from the global
torch generator, seeded inside :func:`torch.random.fork_rng` so the caller's random state is
left as it was, and the order of mini-batches from a private :class:`torch.Generator`. A fixed
seed gives identical results on the CPU.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from workers.errors import ProbeError
from workers.probes.device import resolve_device
from workers.probes.metrics import accuracy
from workers.probes.settings import MlpSettings
from workers.probes.settings import read_mlp_settings as read_settings
from workers.probes.task import ProbeTask

logger = logging.getLogger(__name__)

# Rows per forward pass when scoring, to bound activation memory.
EVAL_ROWS = 8192


def fit_mlp(task: ProbeTask, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Fit MLP probes on every layer of ``task``; one result dict per layer.

    ``train_accuracy`` is measured on the fit part (the items the network trained on),
    ``n_iter`` counts epochs run, and ``params["epoch"]`` is the epoch whose weights were kept.
    """
    s = read_settings(params)
    device = resolve_device(task.device)
    results = []
    for done, layer in enumerate(task.layers, start=1):
        start = time.perf_counter()
        x_train, x_test = task.read_layer(layer)
        fit = x_train[task.fit_part]
        mean, std = fit.mean(axis=0), fit.std(axis=0)
        std[std == 0] = 1.0  # constant features become zeros, as in StandardScaler

        def prepare(x: np.ndarray, mean: np.ndarray = mean, std: np.ndarray = std) -> torch.Tensor:
            return torch.from_numpy((x - mean) / std).to(device)

        x_fit, x_val, x_te = prepare(fit), prepare(x_train[task.val_part]), prepare(x_test)
        y_fit = torch.from_numpy(task.y_train[task.fit_part]).to(device)
        y_val = task.y_train[task.val_part]
        model, curve, best_epoch, stopped = _train(task, s, device, x_fit, y_fit, x_val, y_val)

        notes = []
        unfinished = _unfinished_training_warning(s, best_epoch, stopped)
        if unfinished is not None:
            notes.append(unfinished)
        results.append(
            task.layer_result(
                layer,
                engine="torch",
                test_pred=_predict(model, x_te),
                train_accuracy=accuracy(task.y_train[task.fit_part], _predict(model, x_fit)),
                val_accuracy=curve[best_epoch - 1],
                params={**s.as_params(), "epoch": best_epoch},
                grid=[{"epoch": e, "val_accuracy": a} for e, a in enumerate(curve, start=1)],
                converged=stopped,
                n_iter=len(curve),
                fit_seconds=time.perf_counter() - start,
                warnings=notes,
            )
        )
        logger.info("mlp probe: layer %d done (best epoch %d of %d)", layer, best_epoch, len(curve))
        task.report_progress(done)
    return results


def _unfinished_training_warning(s: MlpSettings, best_epoch: int, stopped: bool) -> str | None:
    """Return the "raise max_epochs" warning of a run that more epochs may improve, or None.

    The rule: warn when the run used all ``max_epochs`` (patience did not run out) and its best
    epoch lies within the last ``window`` epochs, where ``window`` is ``patience`` capped at
    half of ``max_epochs``, rounded up. A run that was not stopped improved within its last
    ``patience`` epochs, so early stopping would have let it go on. The cap matters when
    ``patience`` exceeds half the run, for example when ``patience >= max_epochs`` and early
    stopping never triggers. A best epoch in the first half was followed by at least as many
    epochs without a gain, so more epochs are unlikely to help.
    """
    window = min(s.patience, math.ceil(s.max_epochs / 2))
    if stopped or best_epoch <= s.max_epochs - window:
        return None
    return (
        f"the best validation accuracy came at epoch {best_epoch}, within the last {window} "
        f"of max_epochs={s.max_epochs} epochs, so more epochs may improve it; raise max_epochs"
    )


def _train(
    task: ProbeTask,
    s: MlpSettings,
    device: torch.device,
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_val: torch.Tensor,
    y_val: np.ndarray,
) -> tuple[nn.Module, list[float], int, bool]:
    """Train with early stopping; returns the best model, the validation curve, the best
    epoch (1-based) and whether patience ran out before ``max_epochs``.

    Raises `ProbeError` naming ``lr`` when a training loss is NaN or infinite, rather than
    keeping a diverged network's chance-level scores.
    """
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(task.seed)
        order = torch.Generator().manual_seed(task.seed)
        model = nn.Sequential(
            nn.Linear(x_fit.shape[1], s.hidden),
            nn.ReLU(),
            nn.Dropout(s.dropout),
            nn.Linear(s.hidden, task.n_classes),
        ).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        loss_fn = nn.CrossEntropyLoss()

        curve: list[float] = []
        best_state: dict[str, torch.Tensor] = {}
        best_epoch, stale = 0, 0
        for epoch in range(1, s.max_epochs + 1):
            task.check_running()
            model.train()
            total = torch.zeros((), device=device)
            for batch in torch.randperm(len(y_fit), generator=order).split(s.batch_size):
                batch = batch.to(device)
                optimizer.zero_grad()
                loss = loss_fn(model(x_fit[batch]), y_fit[batch])
                loss.backward()
                optimizer.step()
                total = total + loss.detach()
            # NaN and infinity survive the sum, so one check per epoch finds any diverged batch.
            if not math.isfinite(float(total)):
                raise ProbeError(
                    f"the MLP fit diverged at epoch {epoch} (training loss {float(total)}) "
                    f"with lr={s.lr!r}; lower lr",
                    field="lr",
                    value=s.lr,
                )
            curve.append(accuracy(y_val, _predict(model, x_val)))
            if best_epoch == 0 or curve[-1] > curve[best_epoch - 1]:
                best_epoch, stale = epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= s.patience:
                    break
    model.load_state_dict(best_state)
    return model, curve, best_epoch, stale >= s.patience


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Predicted classes of shape (n_items,) in eval mode (dropout off)."""
    model.eval()
    return torch.cat([model(part).argmax(dim=1) for part in x.split(EVAL_ROWS)]).cpu().numpy()
