"""Time the torch logistic engine's objective against its matmuls, and its share of one fit.

Two measurements on one thread, run by hand, never in CI:

1. One block of the objective (``_BatchedLogistic._block_terms``: logits, softmax, loss and
   gradient) for ``--problems`` values of C on ``--block`` items, against the block's two
   matmuls alone. The difference is what the element-wise steps cost.
2. One layer of the synthetic sweep of ``bench/probe.py`` fitted through ``fit_probes``, with
   the time spent in the objective counted, so the rest (reading, standardising, covariance,
   L-BFGS bookkeeping, metrics) shows as the remainder.
3. With ``--widths``, one whole evaluation (``_BatchedLogistic._objective``, in blocks of
   ``--block`` items) on ``--items`` items for 1 to ``--problems`` problems of one layer, and a
   straight line fitted to those times. Its intercept is the cost of a call of any width, its
   slope the cost per problem.
4. With ``--sweep``, every layer of the sweep fitted through ``fit_probes``, with the objective's
   calls counted and timed per stage (validation fits or refit) and number of problems.

    .venv/bin/python bench/probe_objective.py --layer 12
    .venv/bin/python bench/probe_objective.py --widths --items 40000
    .venv/bin/python bench/probe_objective.py --sweep
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from bench.probe import DEFAULT_C_GRID, make_features  # noqa: E402
from workers.probes import fit_probes, logistic  # noqa: E402


def time_block(n_items: int, problems: int, n_classes: int, dim: int, repeat: int) -> None:
    """Print the best time of one objective block and of its two matmuls alone."""
    x = torch.randn(n_items, dim + 1)
    x[:, -1] = 1.0
    y = torch.randint(0, n_classes, (n_items,))
    c = torch.ones(1, problems, dtype=torch.float64)
    model = logistic._BatchedLogistic(
        x[None], y, c, n_classes, torch.eye(dim, dtype=torch.float64)[None]
    )
    w = torch.randn(problems * n_classes, dim + 1) * 0.05

    def block() -> None:
        model._block_terms(x, y, w, problems, n_classes)

    def matmuls() -> None:
        ((w @ x.T) @ x).double()

    for name, call in (("objective block", block), ("two matmuls", matmuls)):
        best = min(timeit.repeat(call, number=20, repeat=repeat)) / 20
        flops = 2 * 2 * n_items * (dim + 1) * problems * n_classes
        print(
            f"{name}: {best * 1e3:.2f} ms for {problems} problems x {n_items} items "
            f"({flops / best / 1e9:.0f} GFLOP/s counting the matmuls only)"
        )


def time_widths(n_items: int, problems: int, n_classes: int, dim: int, repeat: int) -> None:
    """Print the time of one evaluation per width, and the fitted costs per call and per problem."""
    x = torch.randn(1, n_items, dim + 1)
    x[..., -1] = 1.0
    y = torch.randint(0, n_classes, (n_items,))
    c = torch.ones(1, problems, dtype=torch.float64)
    model = logistic._BatchedLogistic(x, y, c, n_classes, torch.eye(dim, dtype=torch.float64)[None])
    theta = torch.randn(problems, dim + 1, n_classes, dtype=torch.float64) * 0.05
    widths, seconds = list(range(1, problems + 1)), []
    for width in widths:
        call = functools.partial(model._objective, np.arange(width), theta[:width])
        best = min(timeit.repeat(call, number=3, repeat=repeat))
        seconds.append(best / 3)
        print(f"width {width}: {seconds[-1] * 1e3:.1f} ms per evaluation of {n_items} items")
    slope, intercept = np.polyfit(widths, seconds, 1)
    if slope <= 0:
        print("fit: the times do not grow with the width; run again on an idle machine")
        return
    print(
        f"fit: {intercept * 1e3:.1f} ms per call + {slope * 1e3:.1f} ms per problem; a call of one "
        f"problem costs as much as {seconds[0] / slope:.1f} problems at the marginal rate"
    )


def time_fit(layer: int, n_layers: int, items: int, dim: int, n_classes: int) -> None:
    """Fit one synthetic layer with the torch engine and print the objective's share."""
    n_test = items // 5
    features, labels = make_features(items + n_test, dim, n_layers, n_classes, seed=0)
    chosen = features[layer : layer + 1]
    del features
    spent = {"seconds": 0.0, "problems": 0}
    objective = logistic._BatchedLogistic._objective

    def counted(self, ids, theta):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = objective(self, ids, theta)
        spent["seconds"] += time.perf_counter() - start
        spent["problems"] += len(ids)
        return out

    logistic._BatchedLogistic._objective = counted  # type: ignore[method-assign]
    start = time.perf_counter()
    results = fit_probes(
        "logistic",
        chosen[:, :items],
        labels[:items],
        chosen[:, items:],
        labels[items:],
        layers=[0],
        params={"C": DEFAULT_C_GRID, "engine": "torch", "dtype": "float32"},
        seed=0,
        device="cpu",
    )
    wall = time.perf_counter() - start
    logistic._BatchedLogistic._objective = objective  # type: ignore[method-assign]
    iterations = [g["n_iter"] for g in results[0]["grid"]] + [results[0]["n_iter"]]
    print(
        f"layer {layer}: {wall:.2f} s for the fit, {spent['seconds']:.2f} s "
        f"({spent['seconds'] / wall:.0%}) in the objective over {spent['problems']} "
        f"problem evaluations; L-BFGS iterations per value of C and refit: {iterations}"
    )


def time_sweep(n_layers: int, items: int, dim: int, n_classes: int) -> None:
    """Fit every layer of the synthetic sweep and print the objective's calls per width."""
    n_test = items // 5
    features, labels = make_features(items + n_test, dim, n_layers, n_classes, seed=0)
    calls: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    objective = logistic._BatchedLogistic._layer_objective

    def counted(self, layer, theta, penalty):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = objective(self, layer, theta, penalty)
        # Validation fits read the fit part, and the refit reads every train item.
        stage = "refit" if self.x.shape[1] == items else "validation"
        calls[stage, len(theta)].append(time.perf_counter() - start)
        return out

    logistic._BatchedLogistic._layer_objective = counted  # type: ignore[method-assign]
    start = time.perf_counter()
    fit_probes(
        "logistic",
        features[:, :items],
        labels[:items],
        features[:, items:],
        labels[items:],
        layers=list(range(n_layers)),
        params={"C": DEFAULT_C_GRID, "engine": "torch", "dtype": "float32"},
        seed=0,
        device="cpu",
    )
    wall = time.perf_counter() - start
    logistic._BatchedLogistic._layer_objective = objective  # type: ignore[method-assign]
    print("| stage | problems per call | calls | s | ms per call |")
    print("|---|---|---|---|---|")
    for (stage, width), times in sorted(
        calls.items(), key=lambda item: (item[0][0] == "refit", item[0][1])
    ):
        print(
            f"| {stage} | {width} | {len(times)} | {sum(times):.2f} | "
            f"{sum(times) / len(times) * 1e3:.1f} |"
        )
    spent = sum(sum(times) for times in calls.values())
    print(f"{wall:.1f} s for the sweep, {spent:.1f} s ({spent / wall:.0%}) in the objective")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", type=int, default=logistic.CPU_ROW_BLOCK, help="items")
    parser.add_argument("--problems", type=int, default=len(DEFAULT_C_GRID))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=7, help="rounds of 20 calls, best kept")
    parser.add_argument("--layer", type=int, default=12, help="layer of the synthetic sweep")
    parser.add_argument("--layers", type=int, default=25, help="layers of the synthetic sweep")
    parser.add_argument("--items", type=int, default=50000, help="train items of the fit")
    parser.add_argument(
        "--widths", action="store_true", help="time whole evaluations of 1 to --problems problems"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="fit every layer and count the objective's calls"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1)
    torch.manual_seed(0)
    if args.widths:
        # The objective reads its block size from the module.
        logistic.CPU_ROW_BLOCK = args.block
        time_widths(args.items, args.problems, args.classes, args.dim, args.repeat)
        return
    if args.sweep:
        time_sweep(args.layers, args.items, args.dim, args.classes)
        return
    time_block(args.block, args.problems, args.classes, args.dim, args.repeat)
    time_fit(args.layer, args.layers, args.items, args.dim, args.classes)


if __name__ == "__main__":
    main()
