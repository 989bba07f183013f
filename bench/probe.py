"""Benchmark: scikit-learn logistic probes layer by layer vs the batched torch engine.

Run by hand, never in CI::

    .venv/bin/python bench/probe.py --items 10000 --dim 256 --layers 8 --dtype float64 float32 \
        --threads 1

``--sklearn-layers N`` fits only N evenly spaced layers with scikit-learn and estimates its
time for all layers in proportion. ``bench/gpu.sh`` uses it to keep the GPU run short.

Both engines run through :func:`workers.probes.fit_probes` on the same synthetic features
with the same C grid, validation split and seed, so the wall times include the whole
protocol (C chosen on validation, refit on all of train, test metrics).

The features are structured like a model's layers: Gaussian class means shared by all
layers, a low-rank nuisance component that differs per layer, and isotropic noise whose level
dips in the middle layers. The per-layer accuracy curve therefore peaks in the middle, as
linear probes of iGPT do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

# fit_probes imports the engines lazily. Import the logistic engine here, so that scikit-learn,
# scipy and their BLAS and OpenMP libraries are loaded before threadpool_limits in main().
import workers.probes.logistic  # noqa: F401
from workers.probes import fit_probes

DEFAULT_C_GRID = [float(c) for c in np.logspace(-3, 2, 8)]


def make_features(
    n_items: int, dim: int, n_layers: int, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Features of shape (n_layers, n_items, dim) float32 and labels of shape (n_items,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=n_items)
    means = rng.standard_normal((n_classes, dim)).astype(np.float32)  # shared class structure
    rank = 16
    features = np.empty((n_layers, n_items, dim), dtype=np.float32)
    for layer in range(n_layers):
        # Noise is lowest in the middle layer: relative depth -1..1, squared.
        depth = 2.0 * layer / max(1, n_layers - 1) - 1.0
        # Class means are ~sqrt(2 dim) apart, so noise scales with sqrt(dim) to keep the
        # accuracy in a realistic range at any width.
        noise = np.sqrt(dim) * (0.2 + 0.3 * depth**2)
        mixing = rng.standard_normal((rank, dim)).astype(np.float32) * 2.0
        nuisance = rng.standard_normal((n_items, rank)).astype(np.float32) @ mixing
        features[layer] = means[labels] + nuisance
        features[layer] += noise * rng.standard_normal((n_items, dim), dtype=np.float32)
    return features, labels


def run_engine(
    name: str,
    params: dict[str, Any],
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    args: argparse.Namespace,
    layers: list[int] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Fit ``layers`` (default: every layer) with one engine and return timings and results.

    ``threads`` limits torch's pool and every BLAS and OpenMP pool of numpy, scipy and
    scikit-learn for this run only; None leaves each library's own default.
    """
    with contextlib.ExitStack() as stack:
        if threads:
            stack.enter_context(threadpool_limits(threads))
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, previous)
        pools = ", ".join(
            f"{p['internal_api']} ({_package(p['filepath'])}) {p['num_threads']}"
            for p in threadpool_info()
        )
        print(f"{name}: torch {torch.get_num_threads()} threads; thread pools: {pools}")
        return _timed_fit(name, params, data, args, layers)


def _timed_fit(
    name: str,
    params: dict[str, Any],
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    args: argparse.Namespace,
    layers: list[int] | None,
) -> dict[str, Any]:
    train, y_train, test, y_test = data
    start, cpu_start = time.perf_counter(), time.process_time()
    results = fit_probes(
        "logistic",
        train,
        y_train,
        test,
        y_test,
        layers=layers if layers is not None else list(range(args.layers)),
        params={"C": args.c_grid, **({"tol": args.tol} if args.tol else {}), **params},
        seed=args.seed,
        device=args.device,
    )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    load = os.getloadavg()[0]
    print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU, load average after {load:.2f}")
    return {"name": name, "params": params, "wall": wall, "cpu": cpu, "results": results}


def torch_variants(
    args: argparse.Namespace,
) -> list[tuple[str, dict[str, Any], int | None]]:
    """Return (name, engine params, threads) of one torch run per combination of
    ``--torch-threads``, ``--c-batch``, ``--dtype`` and ``--torch-tol`` values."""
    variants = []
    for threads in args.torch_threads or [args.threads]:
        variants += [(name, params, threads) for name, params in _torch_params(args, threads)]
    return variants


def _torch_params(
    args: argparse.Namespace, threads: int | None
) -> list[tuple[str, dict[str, Any]]]:
    variants = []
    for dtype in args.dtype or [None]:
        for c_batch in args.c_batch:
            for tol in args.torch_tol or [None]:
                params: dict[str, Any] = {"engine": "torch"}
                name = f"torch c_batch={c_batch}"
                if args.torch_threads:
                    name += f" threads={threads}"
                if c_batch != "all":
                    params["c_batch"] = int(c_batch)
                if dtype:
                    params["dtype"] = dtype
                    name += f" {dtype}"
                if tol:
                    params["tol"] = tol
                    name += f" tol={tol:g}"
                if args.layer_batch:
                    params["layer_batch"] = args.layer_batch
                if args.max_iter:
                    params["max_iter"] = args.max_iter
                variants.append((name, params))
    return variants


def _package(path: str) -> str:
    """Return the installed package a shared library comes with, from its path."""
    parts = Path(path).parts
    if "site-packages" in parts[:-1]:
        return parts[parts.index("site-packages") + 1]
    return Path(path).name


def evenly_spaced(n_layers: int, count: int) -> list[int]:
    """Return ``count`` layers spread evenly from the first to the last, both included."""
    return sorted({int(i) for i in np.linspace(0, n_layers - 1, min(count, n_layers)).round()})


def report(runs: list[dict[str, Any]], n_layers: int) -> list[dict[str, Any]]:
    """Print the per-layer table and one summary line per torch variant.

    scikit-learn may have fitted only some of the layers (``--sklearn-layers``). Its wall time
    for all of them is then estimated in proportion, and the torch runs are compared with it
    on its layers only.
    """
    ref = runs[0]
    by_layer = {r["layer"]: r for r in ref["results"]}
    n_ref = len(by_layer)
    sklearn_wall = ref["wall"] * n_layers / n_ref
    estimate = "" if n_ref == n_layers else f", estimated from {n_ref} layers"
    all_layers = f" ({sklearn_wall:.1f} s for {n_layers}{estimate})" if estimate else ""
    header = f"{'layer':>5} {'sklearn':>8} {'C':>8}"
    for run in runs[1:]:
        header += f" | {run['name']:>28} {'C':>8} {'diff':>6}"
    print("\n" + header)
    for i in range(n_layers):
        layer = runs[-1]["results"][i]["layer"]
        a = by_layer.get(layer)  # None where scikit-learn skipped the layer
        if a is None:
            line = f"{layer:>5} {'-':>8} {'-':>8}"
        else:
            line = f"{layer:>5} {a['test_accuracy']:>8.4f} {a['params']['C']:>8.3g}"
        for run in runs[1:]:
            b = run["results"][i]
            diff = "-" if a is None else f"{100.0 * (b['test_accuracy'] - a['test_accuracy']):+.2f}"
            line += f" | {b['test_accuracy']:>28.4f} {b['params']['C']:>8.3g} {diff:>6}"
        print(line)

    summaries = []
    print(
        f"\nsklearn: {ref['wall']:.1f} s wall for {n_ref} layers{all_layers}, "
        f"{ref['cpu']:.1f} s CPU, converged "
        f"{sum(r['converged'] for r in ref['results'])}/{n_ref} layers; "
        f"{_iterations(ref['results'])}"
    )
    for run in runs[1:]:
        pairs = [(by_layer[b["layer"]], b) for b in run["results"] if b["layer"] in by_layer]
        summary = {
            "name": run["name"],
            "wall_seconds": run["wall"],
            "cpu_seconds": run["cpu"],
            "sklearn_layers": n_ref,
            "sklearn_over_torch": sklearn_wall / run["wall"],
            "max_abs_diff_points": max(
                100.0 * abs(a["test_accuracy"] - b["test_accuracy"]) for a, b in pairs
            ),
            "same_C_layers": sum(a["params"]["C"] == b["params"]["C"] for a, b in pairs),
            "converged_layers": sum(b["converged"] for b in run["results"]),
            "validation_iterations": max(g["n_iter"] for b in run["results"] for g in b["grid"]),
            "refit_iterations": max(b["n_iter"] for b in run["results"]),
            "total_iterations": sum(_total_iterations(b) for b in run["results"]),
        }
        summaries.append(summary)
        print(
            f"{run['name']}: {run['wall']:.1f} s wall, {run['cpu']:.1f} s CPU; sklearn / torch "
            f"= {summary['sklearn_over_torch']:.2f}{estimate}; max |diff| "
            f"{summary['max_abs_diff_points']:.2f} points; same C on "
            f"{summary['same_C_layers']}/{n_ref} layers; converged "
            f"{summary['converged_layers']}/{n_layers}; {_iterations(run['results'])}"
        )
        for a, b in pairs:
            if a["params"]["C"] != b["params"]["C"]:
                print(
                    f"  layer {a['layer']}: validation accuracy per C, sklearn "
                    f"{[g['val_accuracy'] for g in a['grid']]}, torch "
                    f"{[g['val_accuracy'] for g in b['grid']]}"
                )
    return summaries


def _total_iterations(result: dict[str, Any]) -> int:
    return sum(g["n_iter"] for g in result["grid"]) + result["n_iter"]


def _iterations(results: list[dict[str, Any]]) -> str:
    """L-BFGS iterations of one engine: the largest per validation fit and per refit, and the
    sum over every fit."""
    return (
        f"L-BFGS iterations: at most {max(g['n_iter'] for r in results for g in r['grid'])} per "
        f"validation fit, {max(r['n_iter'] for r in results)} per refit, "
        f"{sum(_total_iterations(r) for r in results)} in all"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=50000, help="train items")
    parser.add_argument("--test-items", type=int, default=None, help="default: items / 5")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=25)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--c-grid", type=float, nargs="+", default=DEFAULT_C_GRID)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--c-batch",
        nargs="+",
        default=["all"],
        help="torch variants to run: 'all' (every C in one L-BFGS run) and/or a number of C "
        "values per run, e.g. --c-batch all 1",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        nargs="+",
        default=None,
        help="compute dtypes of the torch variants (default: the engine's own)",
    )
    parser.add_argument("--layer-batch", type=int, default=None)
    parser.add_argument(
        "--max-iter", type=int, default=None, help="default: each engine's own (5000 / 1000)"
    )
    parser.add_argument(
        "--tol",
        type=float,
        default=None,
        help="gradient tolerance of both engines (default: each engine's own)",
    )
    parser.add_argument(
        "--torch-tol",
        type=float,
        nargs="+",
        default=None,
        help="gradient tolerances of the torch variants only, e.g. --torch-tol 1e-6 1e-5 "
        "(default: --tol, else the engine's own)",
    )
    parser.add_argument(
        "--sklearn-layers",
        type=int,
        default=None,
        help="fit only this many evenly spaced layers with scikit-learn and estimate its time "
        "for all layers in proportion (default: every layer)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads of torch and numpy/scipy alike (default: each library's own)",
    )
    parser.add_argument(
        "--sklearn-threads",
        type=int,
        default=None,
        help="threads of the scikit-learn run only (default: --threads)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        nargs="+",
        default=None,
        help="threads of the torch variants, one run per value, e.g. --torch-threads 1 2 "
        "(default: --threads)",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        # Checked before the data and the scikit-learn run, which take minutes at full size.
        parser.error(
            f"invalid --device {args.device}: torch {torch.__version__} finds no CUDA device; "
            "run on a machine with a GPU or use --device cpu"
        )
    logging.basicConfig(level=logging.WARNING)
    for name in ("threads", "sklearn_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(
                f"invalid --{name.replace('_', '-')} {getattr(args, name)}: give 1 or more"
            )
    if any(n < 1 for n in args.torch_threads or []):
        parser.error(f"invalid --torch-threads {args.torch_threads}: give 1 or more per value")

    n_test = args.test_items or max(1, args.items // 5)
    start = time.perf_counter()
    features, labels = make_features(
        args.items + n_test, args.dim, args.layers, args.classes, args.seed
    )
    data = (
        features[:, : args.items],
        labels[: args.items],
        features[:, args.items :],
        labels[args.items :],
    )
    print(
        f"data: {args.layers} layers x {args.items} train / {n_test} test items x {args.dim} "
        f"dims, {args.classes} classes, C grid of {len(args.c_grid)} "
        f"({time.perf_counter() - start:.1f} s to generate)"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"(default {torch.get_num_threads()} threads), device {args.device}; "
        f"load average before: {os.getloadavg()[0]:.1f}"
    )

    sklearn_layers = evenly_spaced(args.layers, args.sklearn_layers or args.layers)
    sklearn_threads = args.sklearn_threads or args.threads
    runs = [
        run_engine("sklearn", {"engine": "sklearn"}, data, args, sklearn_layers, sklearn_threads)
    ]
    for name, params, threads in torch_variants(args):
        runs.append(run_engine(name, params, data, args, threads=threads))
    summaries = report(runs, args.layers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summaries": summaries, "runs": runs}, f)


if __name__ == "__main__":
    main()
