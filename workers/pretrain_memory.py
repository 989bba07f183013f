"""Estimate the memory of a pretraining run and check it against LAYERBANK_PRETRAIN_MEMORY_GIB.

This module imports neither torch nor transformers, so the API can check a request before it
queues the job, and the worker checks it again before it builds the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.errors import WorkersError

# Items per validation batch in `workers.pretrain._evaluate`.
EVAL_BATCH_SIZE = 256
# Bytes a run allocates beyond the tensors that `estimate_pretrain_memory` counts: allocator
# arenas, autograd and thread-pool buffers. Chosen so that each peak measured in
# docs/operations.md ("Pretraining memory") stays below the estimate.
PRETRAIN_OVERHEAD_BYTES = 512 * 2**20
# float32 copies of every parameter during training: weights, gradients, two AdamW moments.
STATE_COPIES = 4
FLOAT32_BYTES = 4


class PretrainMemoryError(WorkersError):
    """Raised when the estimated memory of a pretraining run exceeds the configured limit."""

    permanent = True


@dataclass(frozen=True)
class PretrainShape:
    """The sizes of a pretraining run that its memory grows with."""

    n_layer: int
    n_embd: int
    n_head: int
    n_colors: int
    batch_size: int
    seq_len: int  # tokens per image: height x width of the dataset's images
    n_items: int  # images in the split, train and validation parts together
    val_fraction: float = 0.1  # PretrainParams' default, which a request cannot change

    @classmethod
    def of_run(cls, params: Any, images_shape: tuple[int, ...]) -> PretrainShape:
        """Return the shape of a run with ``params`` (a pretraining request or its
        PretrainParams) on images of shape (n, height, width, ...)."""
        n_items, height, width = images_shape[:3]
        return cls(
            n_layer=params.n_layer,
            n_embd=params.n_embd,
            n_head=params.n_head,
            n_colors=params.n_colors,
            batch_size=params.batch_size,
            seq_len=height * width,
            n_items=n_items,
            val_fraction=getattr(params, "val_fraction", cls.val_fraction),
        )


@dataclass(frozen=True)
class PretrainMemory:
    """Estimated peak memory of a pretraining run, in bytes, by part."""

    parameters: int  # number of model parameters
    state_bytes: int  # weights, gradients and the two AdamW moments
    activation_bytes: int  # the larger of a training step's and a validation batch's
    data_bytes: int  # the split as token ids
    total_bytes: int


def count_parameters(shape: PretrainShape) -> int:
    """Return the parameter count of the ImageGPTForCausalImageModeling that pretraining builds.

    Each block has two weight-only layer norms (2 d), attention projections of d x 3d and d x d
    with biases, and a feed-forward of d x 4d and 4d x d with biases: 12 d^2 + 11 d. Around
    the blocks come the token embedding (n_colors + 1 rows, the last for the start token), the
    position embedding (seq_len rows), the final layer norm (d) and the output head without
    bias (d x n_colors). tests/workers/test_pretrain_memory.py checks this against the model.
    """
    d = shape.n_embd
    blocks = shape.n_layer * (12 * d * d + 11 * d)
    embeddings = (shape.n_colors + 1) * d + shape.seq_len * d
    return blocks + embeddings + d + d * shape.n_colors


def training_activation_bytes(shape: PretrainShape, batch_size: int) -> int:
    """Estimate the bytes autograd keeps for one training step of ``batch_size`` images.

    Per image and token, each block saves about 18 d + 3 x 4d float32 values. That is the
    count of the adapter fit's estimate in workers/probes/settings.py, with ImageGPT's inner
    width 4d. Each block also saves 3 n_head x seq_len attention values: the softmax output,
    the dropout mask and the dropout output. The backward pass needs about one block more.
    The logits, their log-softmax and their gradient add 3 n_colors.
    """
    d, tokens = shape.n_embd, shape.seq_len
    per_block = 30 * d + 3 * shape.n_head * tokens
    per_token = (shape.n_layer + 1) * per_block + 3 * shape.n_colors
    return FLOAT32_BYTES * batch_size * tokens * per_token


def validation_activation_bytes(shape: PretrainShape) -> int:
    """Estimate the bytes of one validation batch, which runs without autograd.

    Only one block's tensors are alive at a time: two n_head x seq_len attention maps per token,
    the block's hidden states (counted as 30 d, as in training) and the logits with their
    log-softmax.
    """
    n_val = max(1, round(shape.n_items * shape.val_fraction))
    items = min(EVAL_BATCH_SIZE, n_val)
    per_token = 2 * shape.n_head * shape.seq_len + 30 * shape.n_embd + 2 * shape.n_colors
    return FLOAT32_BYTES * items * shape.seq_len * per_token


def estimate_pretrain_memory(shape: PretrainShape, batch_size: int | None = None) -> PretrainMemory:
    """Estimate the peak memory of a run with ``shape``, at ``batch_size`` if given.

    The estimate adds four parts: the parameter state (4 float32 copies), and the larger of the
    training step's and a validation batch's activations. Then the split as int64 token ids
    (the inputs and targets, and their copies for the train part: 4 x 8 bytes per token), and
    PRETRAIN_OVERHEAD_BYTES.
    """
    batch = shape.batch_size if batch_size is None else batch_size
    parameters = count_parameters(shape)
    state = STATE_COPIES * FLOAT32_BYTES * parameters
    activations = max(training_activation_bytes(shape, batch), validation_activation_bytes(shape))
    data = 4 * 8 * shape.n_items * shape.seq_len
    return PretrainMemory(
        parameters=parameters,
        state_bytes=state,
        activation_bytes=activations,
        data_bytes=data,
        total_bytes=state + activations + data + PRETRAIN_OVERHEAD_BYTES,
    )


def largest_fitting_batch_size(shape: PretrainShape, limit: int) -> int:
    """Return the largest batch_size up to ``shape.batch_size`` that fits ``limit``, or 0."""
    low, high = 0, shape.batch_size
    while low < high:
        middle = (low + high + 1) // 2
        if estimate_pretrain_memory(shape, middle).total_bytes <= limit:
            low = middle
        else:
            high = middle - 1
    return low


def check_pretrain_memory(shape: PretrainShape, limit: int) -> PretrainMemory:
    """Return the estimate of ``shape``, or raise PretrainMemoryError when it exceeds ``limit``.

    The error names batch_size, with the largest value that fits, when a smaller batch fits.
    Otherwise the model alone is too large, and the error names n_embd. When the data and the
    fixed part alone exceed ``limit``, the fix it gives is a larger limit.
    """
    memory = estimate_pretrain_memory(shape)
    if memory.total_bytes <= limit:
        return memory
    largest_batch = largest_fitting_batch_size(shape, limit)
    if limit <= PRETRAIN_OVERHEAD_BYTES + memory.data_bytes:
        field, value = "n_embd", shape.n_embd
        fix = (
            f"no model fits, because the data and the fixed {_size(PRETRAIN_OVERHEAD_BYTES)} "
            "a run allocates take all of it; raise LAYERBANK_PRETRAIN_MEMORY_GIB"
        )
    elif largest_batch:
        field, value = "batch_size", shape.batch_size
        fix = f"pass batch_size <= {largest_batch}, or a smaller n_layer or n_embd"
    else:
        field, value = "n_embd", shape.n_embd
        fix = (
            "even batch_size 1 does not fit; pass a smaller n_embd, n_layer or n_head "
            "(attention maps grow with n_head and the square of the tokens per image)"
        )
    raise PretrainMemoryError(
        f"pretraining with n_layer={shape.n_layer}, n_embd={shape.n_embd}, "
        f"n_head={shape.n_head}, n_colors={shape.n_colors} and batch_size={shape.batch_size} "
        f"on {shape.seq_len} tokens per image needs an estimated "
        f"{_size(memory.total_bytes)} ({_count(memory.parameters)} parameters "
        f"with gradients and AdamW state {_size(memory.state_bytes)}, activations "
        f"{_size(memory.activation_bytes)}, token ids {_size(memory.data_bytes)}, fixed "
        f"{_size(PRETRAIN_OVERHEAD_BYTES)}), more than the limit of {_limit(limit)} "
        f"per run (LAYERBANK_PRETRAIN_MEMORY_GIB); {fix}",
        field=field,
        value=value,
    )


def _count(number: int) -> str:
    """Return a parameter count as people write it: 2.42 billion, 12.5 million or 203,456."""
    if number >= 10**9:
        return f"{number / 1e9:.2f} billion"
    if number >= 10**6:
        return f"{number / 1e6:.1f} million"
    return f"{number:,}"


def _size(size: int) -> str:
    """Return a byte count in GiB from 1 GiB on, in MiB from 0.1 MiB on, in bytes below."""
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    if size >= 2**20 / 10:
        return f"{size / 2**20:.1f} MiB"
    return f"{size:,} bytes"


def _limit(limit: int) -> str:
    """Return the limit as set, in GiB (0.625 GiB), unless that needs an exponent."""
    if limit >= 2**20:
        return f"{limit / 2**30:g} GiB"
    return _size(limit)
