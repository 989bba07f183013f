"""k-nearest-neighbour probes: cosine similarity, similarity-weighted votes, brute force in torch.

Features are L2-normalised, so a matrix product gives cosine similarities. Each of the k
nearest train items votes for its class with weight ``exp(similarity / temperature)`` (the
weighted kNN protocol of instance-discrimination and DINO evaluations): every weight is
positive and closer neighbours count more. Query rows are processed in chunks so that one
(chunk, n_reference) similarity block stays within a fixed number of elements.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workers.probes.device import resolve_device
from workers.probes.metrics import accuracy
from workers.probes.settings import read_knn_settings as read_settings
from workers.probes.task import ProbeTask

logger = logging.getLogger(__name__)

# Elements of one similarity block (float32): 2**26 is 256 MiB.
SIMILARITY_BLOCK = 2**26


def fit_knn(task: ProbeTask, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Fit kNN probes on every layer of ``task``; one result dict per layer.

    ``train_accuracy`` is the leave-one-out accuracy (an item never votes for itself) of
    at most ``train_eval_items`` seeded train items, so that it costs no more than a test set.
    """
    s = read_settings(params, task)
    device = resolve_device(task.device)
    y_train = torch.from_numpy(task.y_train).to(device)
    fit_idx = torch.from_numpy(task.fit_part).to(device)
    val_idx = torch.from_numpy(task.val_part).to(device)
    rng = np.random.default_rng(task.seed)
    n_eval = min(s.train_eval_items, len(task.y_train))
    loo_np = np.sort(rng.choice(len(task.y_train), size=n_eval, replace=False))
    loo = torch.from_numpy(loo_np).to(device)

    results = []
    for done, layer in enumerate(task.layers, start=1):
        start = time.perf_counter()
        x_train_np, x_test_np = task.read_layer(layer)
        x_train = F.normalize(torch.from_numpy(x_train_np).to(device), dim=1)  # (n_train, dim)
        x_test = F.normalize(torch.from_numpy(x_test_np).to(device), dim=1)  # (n_test, dim)

        # One neighbour search with the largest k scores every k: top-k lists are prefixes.
        sims, idx = _nearest(x_train[val_idx], x_train[fit_idx], s.k_grid[-1], s.chunk_size)
        labels = y_train[fit_idx][idx]  # (n_val, k_max)
        y_val = task.y_train[task.val_part]
        grid = []
        for k in s.k_grid:
            pred = _vote(sims[:, :k], labels[:, :k], task.n_classes, s.temperature)
            grid.append({"k": k, "val_accuracy": accuracy(y_val, pred.cpu().numpy())})
        # First maximum: ties go to the smallest k.
        best = int(np.argmax([g["val_accuracy"] for g in grid]))
        k = s.k_grid[best]

        sims, idx = _nearest(x_test, x_train, k, s.chunk_size)
        test_pred = _vote(sims, y_train[idx], task.n_classes, s.temperature).cpu().numpy()
        k_loo = min(k, len(task.y_train) - 1)
        sims, idx = _nearest(x_train[loo], x_train, k_loo, s.chunk_size, exclude=loo)
        loo_pred = _vote(sims, y_train[idx], task.n_classes, s.temperature).cpu().numpy()

        results.append(
            task.layer_result(
                layer,
                engine="torch",
                test_pred=test_pred,
                train_accuracy=accuracy(task.y_train[loo_np], loo_pred),
                val_accuracy=grid[best]["val_accuracy"],
                params={"k": k, "temperature": s.temperature},
                grid=grid,
                converged=True,
                n_iter=None,
                fit_seconds=time.perf_counter() - start,
                warnings=list(s.notes),
            )
        )
        logger.info("knn probe: layer %d done (k=%d)", layer, k)
        task.report_progress(done)
    return results


def _nearest(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    chunk_size: int | None,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the k most similar reference rows of each query row, most similar first.

    Parameters
    ----------
    queries, reference
        L2-normalised features of shapes (n_queries, dim) and (n_reference, dim).
    exclude
        Optional reference index per query, shape (n_queries,), that may not be returned
        (the query itself, for leave-one-out).

    Returns
    -------
    similarities, indices
        Tensors of shape (n_queries, k).
    """
    rows = chunk_size or max(1, SIMILARITY_BLOCK // max(1, len(reference)))
    sims, idx = [], []
    for start in range(0, len(queries), rows):
        block = queries[start : start + rows] @ reference.T  # (rows, n_reference)
        if exclude is not None:
            own = exclude[start : start + rows]
            block[torch.arange(len(own), device=block.device), own] = -float("inf")
        top = block.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


def _vote(
    sims: torch.Tensor, labels: torch.Tensor, n_classes: int, temperature: float
) -> torch.Tensor:
    """Predicted class per query from neighbour similarities and labels, both (n, k)."""
    # Shift by the best similarity of each row so that exp cannot overflow at small temperatures.
    weights = torch.exp((sims - sims[:, :1]) / temperature)
    scores = torch.zeros(len(sims), n_classes, dtype=weights.dtype, device=weights.device)
    scores.scatter_add_(1, labels, weights)
    return scores.argmax(dim=1)
