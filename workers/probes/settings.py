"""Hyper-parameters of each probe kind: names, defaults and validation, without torch.

The engines read their settings here, and the API calls :func:`check_params` with the same
readers, so a bad parameter is rejected before a job is queued.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from workers.errors import ProbeError
from workers.probes.params import (
    MAX_GRID_VALUES,
    check_known,
    format_json,
    integral_to_int,
    read_choice,
    read_float,
    read_grid,
    read_int,
)


class TrainSizes(Protocol):
    """What the kNN settings need to know about the train set: its labels and its fit part."""

    @property
    def y_train(self) -> np.ndarray: ...

    @property
    def fit_part(self) -> np.ndarray: ...


# -- logistic --------------------------------------------------------------------------------------

ENGINES = ("sklearn", "torch")
DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
# Smallest C. The features are standardised, so on digits every C up to about 1e-6 already
# keeps the weights near zero (chance-level accuracy). Below about 1e-310 the penalty
# 1 / (2 C n) overflows and no fit can start.
MIN_C = 1e-12
DEFAULT_MAX_ITER = {"sklearn": 5000, "torch": 1000}
# Largest max_iter: 20 times the sklearn default. Each L-BFGS iteration evaluates the objective
# on the whole fit part at least once, for every layer and value of C, so an unbounded value
# could hold a worker for days.
MAX_LOGISTIC_ITER = 100_000
# Max-norm of the gradient (scikit-learn's lbfgs "gtol"). scikit-learn's default 1e-4 stops
# large-C fits far from the optimum: on digits their validation accuracy still moves by up to
# 4 items as tol shrinks, and the two engines then choose different values of C. At 1e-5 the
# validation accuracies of both engines still differ from those at the exact optima by 1-2
# items on digits, enough to break a tie between values of C either way. From 3e-6 on, both
# engines choose the optimum's C there. The torch engine's iterations are cheap, so it
# defaults to 1e-6.
DEFAULT_TOL = {"sklearn": 1e-5, "torch": 1e-6}
# Parameters of the torch engine that the sklearn engine has no use for.
TORCH_ONLY_PARAMS = ("dtype", "layer_batch", "history_size", "c_batch")
LOGISTIC_PARAMS = ("C", "max_iter", "tol", "dtype", "layer_batch", "history_size", "c_batch")
DEFAULT_HISTORY = 20
# L-BFGS curvature pairs per problem. Each pair stores two vectors of the problem's size, so the
# history dominates the solver's memory; beyond a few dozen pairs L-BFGS gains little.
MAX_HISTORY_SIZE = 100
# Layers fitted together by the torch engine: more than the hidden states of any supported
# model (ImageGPT-large has 49). An explicit layer_batch bypasses the memory budget.
MAX_LAYER_BATCH = 128


@dataclass(frozen=True)
class LogisticSettings:
    """Validated hyper-parameters of a logistic probe."""

    engine: str
    c_grid: list[float]
    max_iter: int
    tol: float
    dtype: str  # torch engine only
    layer_batch: int | None  # torch engine only; None sizes batches to the memory budget
    history_size: int  # torch engine only
    c_batch: int | None = None  # torch engine only; values of C per L-BFGS run, None = all


def read_logistic_settings(params: dict[str, Any]) -> LogisticSettings:
    """Validate ``params`` of a logistic probe (see :func:`workers.probes.fit_probes`)."""
    check_known(params, "logistic", LOGISTIC_PARAMS)
    engine = read_choice(params, "engine", "sklearn", ENGINES)
    if engine != "torch":
        for name in TORCH_ONLY_PARAMS:
            if name in params:
                raise ProbeError(
                    f'logistic param {name!r} applies to engine "torch" only, and engine is '
                    f'{format_json(engine)}; add "engine": "torch" or remove {name!r}',
                    field=name,
                    value=params[name],
                )
    # Any number passes here, so that C <= 0 gets the message below with the real floor.
    c_grid, _ = read_grid(params, "C", DEFAULT_C_GRID, low=-math.inf, low_open=False)
    if c_grid[0] < MIN_C:
        reason = (
            "C must be positive"
            if c_grid[0] <= 0
            else "the penalty then holds every weight at zero and the probe cannot beat chance"
        )
        raise ProbeError(
            f"C={format_json(c_grid[0])} is below the smallest accepted value {MIN_C:g}: "
            f"{reason}; pass C >= {MIN_C:g}",
            field="C",
            value=c_grid[0],
        )
    max_iter = read_int(params, "max_iter", DEFAULT_MAX_ITER[engine], high=MAX_LOGISTIC_ITER)
    tol = read_float(params, "tol", DEFAULT_TOL[engine], low=0.0, low_open=True)
    # float64 by default on every device: in float32 the summed objective stalls near a
    # gradient max-norm of 2e-5 (digits), short of the default tol.
    dtype = read_choice(params, "dtype", "float64", ("float32", "float64"))
    layer_batch = params.get("layer_batch")
    if layer_batch is not None:
        layer_batch = read_int(params, "layer_batch", 1, high=MAX_LAYER_BATCH)
    history = read_int(params, "history_size", DEFAULT_HISTORY, high=MAX_HISTORY_SIZE)
    c_batch = params.get("c_batch")
    if c_batch is not None:
        # A run never takes more values of C than the grid holds.
        c_batch = read_int(params, "c_batch", 1, high=MAX_GRID_VALUES)
        if c_batch >= len(c_grid):
            # One run takes the whole grid, which is what no c_batch does.
            c_batch = None
    return LogisticSettings(engine, c_grid, max_iter, tol, dtype, layer_batch, history, c_batch)


# -- knn -------------------------------------------------------------------------------------------

DEFAULT_K_GRID = (1, 5, 10, 20, 50, 100, 200)
DEFAULT_TEMPERATURE = 0.07
DEFAULT_TRAIN_EVAL_ITEMS = 5000
# Largest similarity block an explicit chunk_size may ask for: 2**28 float32 values, 1 GiB.
MAX_SIMILARITY_ELEMENTS = 2**28
KNN_PARAMS = ("k", "temperature", "chunk_size", "train_eval_items")


@dataclass(frozen=True)
class KnnSettings:
    """Validated hyper-parameters of a kNN probe."""

    k_grid: list[int]  # values the validation part can score, increasing
    temperature: float
    chunk_size: int | None  # query rows per similarity block; None sizes it to the budget
    train_eval_items: int
    notes: list[str]  # warnings shared by every layer (grid values dropped)


def read_knn_settings(params: dict[str, Any], task: TrainSizes) -> KnnSettings:
    """Validate ``params`` of a kNN probe against the sizes of ``task``."""
    check_known(params, "knn", KNN_PARAMS)
    read_choice(params, "engine", "torch", ("torch",))
    k_grid, explicit = read_grid(params, "k", DEFAULT_K_GRID, integer=True)
    temperature = read_float(params, "temperature", DEFAULT_TEMPERATURE, low=0.0, low_open=True)
    chunk_size = params.get("chunk_size")
    if chunk_size is not None:
        chunk_size = read_int(params, "chunk_size", 1)
    n_train, n_fit = len(task.y_train), len(task.fit_part)
    # The train accuracy scores at most every train item.
    train_eval_items = min(
        read_int(params, "train_eval_items", DEFAULT_TRAIN_EVAL_ITEMS), max(n_train, 1)
    )
    if chunk_size is not None and chunk_size * n_train > MAX_SIMILARITY_ELEMENTS:
        largest = max(1, MAX_SIMILARITY_ELEMENTS // n_train)
        raise ProbeError(
            f"chunk_size={chunk_size} rows against {n_train} train items makes similarity "
            f"blocks of {chunk_size * n_train * 4 / 2**30:.1f} GiB; pass chunk_size <= "
            f"{largest}, or leave it out to size blocks to the memory budget",
            field="chunk_size",
            value=chunk_size,
        )
    if explicit and k_grid[-1] > n_train:
        raise ProbeError(
            f"k={k_grid[-1]} is larger than the train set ({n_train} items); pass k <= "
            f"{n_fit}, the items left for fitting after the validation split",
            field="k",
            value=k_grid[-1],
        )
    notes = []
    dropped = [k for k in k_grid if k > n_fit]
    if dropped:
        notes.append(
            f"k values {dropped} exceed the {n_fit} items of the fit part used for "
            "validation and were left out of the grid"
        )
    k_grid = [k for k in k_grid if k <= n_fit]
    if not k_grid:
        raise ProbeError(
            f"every k in {dropped} exceeds the {n_fit} items left for fitting after the "
            f"validation split; pass k <= {n_fit} or a smaller val_fraction",
            field="k",
            value=dropped,
        )
    return KnnSettings(k_grid, temperature, chunk_size, train_eval_items, notes)


# -- mlp -------------------------------------------------------------------------------------------

MLP_PARAMS = ("hidden", "dropout", "lr", "weight_decay", "max_epochs", "patience", "batch_size")
# Largest hidden width: with a 1,280-wide layer (ViT-H) that is 21 M weights, and the Adam state
# of the whole network stays under 1 GiB.
MAX_MLP_HIDDEN = 16384
# Maximum number of epochs of an MLP or adapter probe.
MAX_EPOCHS = 10_000
# Largest MLP mini-batch: with the largest hidden width, each of its activation tensors takes
# 0.5 GiB.
MAX_MLP_BATCH_SIZE = 8192
# Largest learning rate of the AdamW fits (MLP and adapter). Adam moves each weight by about
# lr per step, so a larger rate only makes the fit diverge.
MAX_LR = 1.0
# AdamW multiplies each weight by 1 - lr * weight_decay per step. With lr <= MAX_LR this bound
# keeps the factor between 0 and 1, so weight decay cannot flip or blow up the weights.
MAX_WEIGHT_DECAY = 1.0


@dataclass(frozen=True)
class MlpSettings:
    """Validated hyper-parameters of an MLP probe."""

    hidden: int
    dropout: float
    lr: float
    weight_decay: float
    max_epochs: int
    patience: int
    batch_size: int

    def as_params(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden,
            "dropout": self.dropout,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "batch_size": self.batch_size,
        }


def read_mlp_settings(params: dict[str, Any]) -> MlpSettings:
    """Validate ``params`` of an MLP probe (see :func:`workers.probes.fit_probes`)."""
    check_known(params, "mlp", MLP_PARAMS)
    read_choice(params, "engine", "torch", ("torch",))
    return MlpSettings(
        hidden=read_int(params, "hidden", 256, high=MAX_MLP_HIDDEN),
        dropout=read_float(params, "dropout", 0.2, low=0.0, high=1.0, high_open=True),
        lr=read_float(params, "lr", 1e-3, low=0.0, high=MAX_LR, low_open=True),
        weight_decay=read_float(params, "weight_decay", 1e-2, low=0.0, high=MAX_WEIGHT_DECAY),
        max_epochs=read_int(params, "max_epochs", 200, high=MAX_EPOCHS),
        patience=read_int(params, "patience", 20, high=MAX_EPOCHS),
        batch_size=read_int(params, "batch_size", 256, high=MAX_MLP_BATCH_SIZE),
    )


# -- adapter ---------------------------------------------------------------------------------------

ADAPTER_PARAMS = ("bottleneck", "epochs", "lr", "weight_decay", "batch_size")
DEFAULT_BOTTLENECK = 64
DEFAULT_EPOCHS = 10
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 64
# A bottleneck is meant to be narrower than the model; ImageGPT-large is 1,536 wide.
MAX_BOTTLENECK = 4096
# Items per adapter mini-batch; each item is a whole image sequence through the model.
MAX_ADAPTER_BATCH_SIZE = 4096
# The memory limit of one adapter fit, as `adapter_fit_bytes` estimates it, is the setting
# LAYERBANK_ADAPTER_FIT_GIB (default 4 GiB: a CPU worker shares its machine with the API, Redis
# and other workers). Without it, batch_size and bottleneck within their own caps can request
# hundreds of GiB. The out-of-memory killer then stops the worker, and the next one on rq's
# retry.
# Bytes the fit allocates regardless of its sizes (allocator arenas, thread pools).
ADAPTER_FIT_OVERHEAD_BYTES = 64 * 2**20


@dataclass(frozen=True)
class AdapterSettings:
    """Validated hyper-parameters of an adapter probe."""

    bottleneck: int
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int


def read_adapter_settings(params: dict[str, Any]) -> AdapterSettings:
    """Validate ``params`` of an adapter probe (see :func:`workers.adapters.fit_adapter`)."""
    check_known(params, "adapter", ADAPTER_PARAMS)
    read_choice(params, "engine", "torch", ("torch",))
    return AdapterSettings(
        bottleneck=read_int(params, "bottleneck", DEFAULT_BOTTLENECK, low=1, high=MAX_BOTTLENECK),
        epochs=read_int(params, "epochs", DEFAULT_EPOCHS, low=1, high=MAX_EPOCHS),
        lr=read_float(params, "lr", DEFAULT_LR, low=0.0, high=MAX_LR, low_open=True),
        weight_decay=read_float(params, "weight_decay", 0.0, low=0.0, high=MAX_WEIGHT_DECAY),
        batch_size=read_int(
            params, "batch_size", DEFAULT_BATCH_SIZE, low=1, high=MAX_ADAPTER_BATCH_SIZE
        ),
    )


@dataclass(frozen=True)
class AdapterFitShape:
    """The sizes of an adapter fit that its memory grows with, apart from its parameters."""

    seq_len: int  # tokens per image: height x width of the processor's size
    dim: int  # model width, n_embd
    inner_dim: int  # feed-forward width, n_inner (4 * n_embd when the config leaves it out)
    layer: int  # deepest probed hidden-state index: the blocks that get adapters
    max_batch_items: int  # max items per batch: the larger of the fit part and the test split


def adapter_fit_shape(
    config: Mapping[str, Any], *, seq_len: int, layer: int, max_batch_items: int
) -> AdapterFitShape:
    """Return the fit sizes of an ImageGPT with ``config`` (its config.json as a mapping)."""
    dim = int(config["n_embd"])
    return AdapterFitShape(
        seq_len=seq_len,
        dim=dim,
        inner_dim=int(config.get("n_inner") or 4 * dim),
        layer=layer,
        max_batch_items=max_batch_items,
    )


def adapter_fit_bytes(shape: AdapterFitShape, batch_size: int, bottleneck: int) -> int:
    """Estimate the peak memory in bytes of `workers.adapters.fit_adapter` on ``shape.layer``.

    Autograd keeps about 18 * dim + 3 * inner_dim float32 values per item and token for each
    block up to ``layer``, and the backward pass needs about one block more for gradients.
    The two adapters of a block add 4 * bottleneck values (down-projection and GELU outputs),
    and the backward pass one bottleneck-wide gradient. The adapter parameters exist six
    times: weights, gradients, two AdamW moments and two copies of the best state. The
    coefficients come from counting the saved tensors. Measured peak RSS of real CPU fits
    stays below the estimate (docs/probes.md, "Adapter memory").
    """
    items = min(batch_size, shape.max_batch_items)
    blocks = shape.layer
    per_block = 18 * shape.dim + 3 * shape.inner_dim
    if blocks:
        per_token = (blocks + 1) * per_block + (4 * blocks + 1) * bottleneck
    else:
        # Only the head trains: the embeddings are computed without a backward pass.
        per_token = 3 * shape.dim
    activations = 4 * items * shape.seq_len * per_token
    adapter_weights = 2 * blocks * (2 * shape.dim * bottleneck + shape.dim + bottleneck)
    return activations + 6 * 4 * adapter_weights + ADAPTER_FIT_OVERHEAD_BYTES


def _largest_fitting(upper: int, fits: Callable[[int], bool]) -> int:
    """Return the largest value in [1, upper] for which ``fits`` holds, or 0 if none does."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def check_adapter_memory(settings: AdapterSettings, shape: AdapterFitShape, limit: int) -> None:
    """Raise `ProbeError` when the estimated peak memory of the fit exceeds ``limit`` bytes.

    The error names ``bottleneck`` when the requested one is above the default and the default
    would fit, else ``batch_size``, with the largest value that fits.
    """
    batch_size, bottleneck = settings.batch_size, settings.bottleneck
    needed = adapter_fit_bytes(shape, batch_size, bottleneck)
    if needed <= limit:
        return

    def fits_batch(value: int) -> bool:
        return adapter_fit_bytes(shape, value, bottleneck) <= limit

    def fits_bottleneck(value: int) -> bool:
        return adapter_fit_bytes(shape, batch_size, value) <= limit

    largest_batch = _largest_fitting(min(batch_size, shape.max_batch_items), fits_batch)
    largest_bottleneck = _largest_fitting(bottleneck, fits_bottleneck)
    if bottleneck > DEFAULT_BOTTLENECK and largest_bottleneck >= DEFAULT_BOTTLENECK:
        field, value, fix = "bottleneck", bottleneck, f"pass bottleneck <= {largest_bottleneck}"
        if largest_batch:
            fix += f" (or batch_size <= {largest_batch})"
    elif largest_batch:
        field, value, fix = "batch_size", batch_size, f"pass batch_size <= {largest_batch}"
    else:
        field, value = "batch_size", batch_size
        fix = (
            "even batch_size 1 does not fit at this bottleneck; pass a smaller bottleneck, "
            "probe a lower layer, or use kind logistic, knn or mlp"
        )
    raise ProbeError(
        f"an adapter fit on layer {shape.layer} with batch_size={batch_size} and "
        f"bottleneck={bottleneck} needs an estimated {needed / 2**30:.1f} GiB "
        f"({min(batch_size, shape.max_batch_items)} items x {shape.seq_len} tokens, width "
        f"{shape.dim}), more than the limit of {limit / 2**30:g} GiB per fit "
        "(LAYERBANK_ADAPTER_FIT_GIB); "
        f"{fix}",
        field=field,
        value=value,
    )


# -- shared ----------------------------------------------------------------------------------------

DEFAULT_VAL_FRACTION = 0.2


def read_val_fraction(params: Mapping[str, Any]) -> float:
    """Read ``val_fraction``, the share of train held out to choose hyper-parameters."""
    return read_float(
        params,
        "val_fraction",
        DEFAULT_VAL_FRACTION,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    )


def validation_count(class_count: int, fraction: float) -> int:
    """Return how many of a class's ``class_count`` train items the validation part takes:
    ``round(fraction * class_count)``, keeping at least one item for fitting."""
    return min(int(round(fraction * class_count)), class_count - 1)


def require_validation_items(n_val: int, fraction: float, y_train: np.ndarray) -> None:
    """Raise `ProbeError` when the validation split of the train items contains none.

    ``y_train`` contains the train labels. When every class has a single item, no val_fraction
    helps, because `validation_count` keeps one item of each class for fitting. The error
    then requests more train items instead.
    """
    if n_val > 0:
        return
    counts = np.unique(y_train, return_counts=True)[1]
    if len(counts) and counts.max() < 2:
        raise ProbeError(
            f"no val_fraction leaves validation items: each of the {len(counts)} classes has "
            "1 train item, and the validation split keeps one item of every class for "
            "fitting; each class needs at least 2 train items, so extract the train feature "
            "set with a larger limit",
            field="val_fraction",
            value=fraction,
        )
    raise ProbeError(
        f"val_fraction={fraction!r} leaves no validation items out of {len(y_train)}; "
        "pass a larger val_fraction",
        field="val_fraction",
        value=fraction,
    )


@dataclass(frozen=True)
class _Sizes:
    y_train: np.ndarray
    fit_part: np.ndarray


# The hyper-parameter grid of each kind that has one, and whether its values are integers.
GRID_PARAMS = {"logistic": ("C", False), "knn": ("k", True)}


def normalise_params(
    kind: str,
    params: dict[str, Any],
    y_train: np.ndarray | None = None,
    *,
    n_layers: int | None = None,
) -> dict[str, Any]:
    """Return ``params`` as the engines read them, so that equal requests get one probe id.

    A float with an integral value becomes an int (``100.0`` and ``100`` are one ``max_iter``),
    and the grid becomes its distinct values in increasing order, all of one number type
    (``1`` or ``[1.0, 1.0]``). With the train labels ``y_train``, a parameter that the engine
    would read the same without it (a default written out) is left out. With the number of
    layers ``n_layers``, a logistic ``layer_batch`` above it becomes it, and with one layer
    ``layer_batch`` is left out. Call it after `check_params`.
    """
    params = {name: _integral_to_int(value) for name, value in params.items()}
    if kind == "logistic" and n_layers is not None and "layer_batch" in params:
        if n_layers == 1:
            del params["layer_batch"]
        else:
            params["layer_batch"] = min(params["layer_batch"], n_layers)
    grid = GRID_PARAMS.get(kind)
    if grid is not None and grid[0] in params:
        name, integer = grid
        params[name], _ = read_grid(params, name, (), integer=integer)
    if y_train is None:
        return params
    read = _read_settings(kind, params, y_train)
    for name in list(params):
        rest = {key: value for key, value in params.items() if key != name}
        try:
            same = _read_settings(kind, rest, y_train) == read
        except ProbeError:  # another parameter needs this one, such as c_batch needs engine
            same = False
        if same:
            params = rest
    return params


def _integral_to_int(value: Any) -> Any:
    """Return ``value`` through `integral_to_int`, item by item in a list."""
    if isinstance(value, list):
        return [_integral_to_int(item) for item in value]
    return integral_to_int(value)


def fit_part_size(params: Mapping[str, Any], y_train: np.ndarray) -> int:
    """Return the items of the fit part of a train set with labels ``y_train``, as the job
    splits it: each class gives `validation_count` items to the validation part."""
    fraction = read_val_fraction(params)
    counts = np.unique(y_train, return_counts=True)[1]
    n_val = sum(validation_count(int(count), fraction) for count in counts)
    require_validation_items(n_val, fraction, y_train)
    return len(y_train) - n_val


def _read_settings(kind: str, params: dict[str, Any], y_train: np.ndarray) -> tuple[Any, float]:
    """Return the settings a ``kind`` probe reads from ``params``, and its val_fraction."""
    fraction = read_val_fraction(params)
    n_fit = fit_part_size(params, y_train)
    if kind == "logistic":
        return read_logistic_settings(params), fraction
    if kind == "knn":
        return read_knn_settings(params, _Sizes(np.empty(len(y_train)), np.empty(n_fit))), fraction
    if kind == "mlp":
        return read_mlp_settings(params), fraction
    if kind == "adapter":
        return read_adapter_settings(params), fraction
    raise ProbeError(f"unknown probe kind {kind!r}", field="kind", value=kind)


def check_params(
    kind: str,
    params: dict[str, Any],
    y_train: np.ndarray,
    *,
    adapter_shape: AdapterFitShape | None = None,
    adapter_limit: int = 4 * 2**30,
) -> None:
    """Validate ``params`` of a ``kind`` probe on a train set with labels ``y_train``.

    Raises `ProbeError` naming the parameter. The sizes of the validation split come from the
    class counts, as in the job, so a k grid left empty by the split fails here too. With
    ``adapter_shape``, an adapter probe whose estimated memory exceeds ``adapter_limit`` bytes
    fails too.
    """
    settings, _ = _read_settings(kind, params, y_train)
    if isinstance(settings, AdapterSettings) and adapter_shape is not None:
        check_adapter_memory(settings, adapter_shape, adapter_limit)
