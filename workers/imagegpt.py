"""ImageGPT extraction kernel: palette tokens from uint8 images, pooled states of chosen layers.

`quantize` reproduces the colour quantisation of Hugging Face's ``ImageGPTImageProcessor``
in torch, on any device. `pooled_hidden_states` runs its own forward pass over the weights of
an ``ImageGPTModel``: causal ``scaled_dot_product_attention`` in place of the model's
materialised (seq, seq) attention matrix, no KV cache, and a stop after the deepest requested
layer. It pools each requested layer as soon as the layer is computed, so it never keeps more
than one (batch, seq, dim) hidden state at a time.

Layer index *i* follows Hugging Face's ``output_hidden_states``: 0 is the embeddings
(``wte + wpe``), 1..n_layer-1 the output of block *i*, and n_layer the output of the last block
after the final layer norm ``ln_f``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTModel
from transformers.activations import ACT2FN
from transformers.models.imagegpt.modeling_imagegpt import ImageGPTBlock

logger = logging.getLogger(__name__)

__all__ = [
    "INPUT_POLICIES",
    "LAYER_POOLINGS",
    "build_input_ids",
    "pooled_hidden_states",
    "quantize",
]

LAYER_POOLINGS = ("mean", "last_token", "mean_ln_f")
INPUT_POLICIES = ("sos", "plain")

# Elements of one (colours, palette) distance chunk: bounds each float64 temporary to 8 MiB.
_DISTANCE_CHUNK_ELEMENTS = 1 << 20

# The processor's float32 distance a2 - 2 ab + b2 differs from the exact one by at most about
# 10 * eps * (a2 + b2), so a winner ahead by more than twice that is the processor's winner too.
_TIE_MARGIN = 64 * torch.finfo(torch.float32).eps


@functools.lru_cache(maxsize=1)
def _pixel_levels_cpu() -> torch.Tensor:
    """Return the normalised value of each uint8 level, tensor of shape (256,) float32.

    The NumPy ``ImageGPTImageProcessor`` rescales in float64 (``x * (1/255)``), rounds to float32,
    then normalises with mean 0.5 and std 0.5 in float32. Mathematically this is x/127.5 - 1,
    but the float32 result differs from other evaluation orders by one ulp on half the levels,
    and one ulp decides ties.
    """
    rescaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    normalised = (rescaled - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(normalised)


def _fma_float32(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Compute ``x * y + z`` for float32 tensors with a single rounding, as a hardware FMA does.

    Parameters
    ----------
    x, y, z
        Broadcastable float32 tensors.

    Returns
    -------
    torch.Tensor
        The broadcast float32 result, correctly rounded to nearest-even.
    """
    product = x.double() * y.double()  # exact: 24 + 24 significant bits fit in float64's 53
    addend = z.double()
    total = product + addend

    # Knuth's two-sum: `error` is what float64 rounding dropped, so total + error is exact.
    virtual_addend = total - product
    error = (product - (total - virtual_addend)) + (addend - virtual_addend)

    # Rounding `total` to float32 is wrong only when `total` lies exactly halfway between two
    # float32 values and the float64 sum was inexact. The sign of `error` then picks the side.
    rounded = total.float()
    up = torch.nextafter(rounded, torch.full_like(rounded, math.inf))
    down = torch.nextafter(rounded, torch.full_like(rounded, -math.inf))
    neighbour = torch.where(total > rounded.double(), up, down)
    halfway = rounded.double() + neighbour.double() == 2 * total
    past_halfway = (error > 0) == (neighbour > rounded)
    return torch.where(halfway & (error != 0) & past_halfway, neighbour, rounded)


def _squared_norms(colours: torch.Tensor) -> torch.Tensor:
    """Return ``sum(c**2)`` per colour, shape (n,), summed left to right as NumPy does."""
    squares = colours * colours  # (n, 3)
    return (squares[:, 0] + squares[:, 1]) + squares[:, 2]


def _processor_distances(colours: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Return squared distances of colour/palette pairs rounded exactly as the NumPy processor.

    ``colours`` and ``palette`` are float32 tensors of shape (n, 3): row i of each forms a pair.
    The processor computes ``a2 - 2 ab + b2`` in float32, with ``ab`` from a BLAS ``sgemm``
    that computes each 3-term dot product as a chain of fused multiply-adds.

    Returns
    -------
    torch.Tensor
        float32 tensor of shape (n,).
    """
    # NOTE: the FMA chain is what NumPy's OpenBLAS sgemm computes on x86-64 with FMA, checked
    # bit for bit in the tests. A BLAS that sums the dot product in another order can break
    # near-ties differently. So can the torchvision-backed processor, because its pixel levels
    # and its torch.matmul round differently.
    dot = colours[:, 0] * palette[:, 0]  # (n,)
    dot = _fma_float32(colours[:, 1], palette[:, 1], dot)
    dot = _fma_float32(colours[:, 2], palette[:, 2], dot)
    return (_squared_norms(colours) - 2 * dot) + _squared_norms(palette)


def _nearest_palette_index(colours: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Return the index of the nearest palette colour for each colour, shape (n,) int64.

    ``colours`` (n, 3) and ``palette`` (n_colors, 3) are float32. A float64 pass decides every
    colour whose nearest palette entry wins by more than the processor's rounding error. For
    the colours left with near-ties, the candidates get the processor's exact float32 rounding
    and the lowest index among equal distances wins, as with NumPy's ``argmin``.
    """
    n_colors = palette.shape[0]
    palette_norms = _squared_norms(palette)  # (n_colors,)
    # float64 rather than float32 so that neither TF32 nor a BLAS kernel's summation order can
    # push the error of this pass anywhere near the margin.
    # Contiguous and pre-scaled: addmm with a transposed or alpha-scaled operand copies it
    # once per chunk.
    scaled_palette_t = (-2 * palette.double().T).contiguous()  # (3, n_colors)
    palette_norms_64 = palette_norms.double()
    rows = max(1, _DISTANCE_CHUNK_ELEMENTS // n_colors)
    indices = []
    for start in range(0, colours.shape[0], rows):
        chunk = colours[start : start + rows]  # (rows, 3)
        # b2 - 2 ab: a2 is the same for every palette entry, so it cannot change the order.
        distances = torch.addmm(palette_norms_64, chunk.double(), scaled_palette_t)
        # The two smallest per row: a row is a near-tie when the runner-up is within the margin.
        smallest, order = torch.topk(distances, min(2, n_colors), dim=1, largest=False)
        index = order[:, 0]  # (rows,)
        margin = _TIE_MARGIN * float(_squared_norms(chunk).max() + palette_norms.max())
        near_tie = smallest[:, -1] - smallest[:, 0] <= margin  # (rows,)
        if n_colors > 1 and bool(near_tie.any()):
            near_rows = torch.nonzero(near_tie).squeeze(1)  # (n_near,)
            near = distances[near_rows]  # (n_near, n_colors)
            candidates = near <= (smallest[near_rows, 0] + margin)[:, None]
            row, column = torch.nonzero(candidates, as_tuple=True)  # (n_pairs,) each
            exact = _processor_distances(chunk[near_rows[row]], palette[column])  # (n_pairs,)
            row_best = torch.full((len(near_rows),), math.inf, device=exact.device)
            row_best = row_best.scatter_reduce(0, row, exact, "amin")  # (n_near,)
            winners = torch.where(exact == row_best[row], column, n_colors)  # (n_pairs,)
            first = torch.full_like(near_rows, n_colors).scatter_reduce(0, row, winners, "amin")
            index[near_rows] = first
        indices.append(index)
    return torch.cat(indices)


def quantize(images: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Map each pixel to the index of its nearest palette colour, as ImageGPT's processor does.

    Pixels are normalised to [-1, 1] (x/127.5 - 1, evaluated in float32 as the NumPy
    ``ImageGPTImageProcessor`` does) and compared by squared Euclidean distance. Of equal
    distances the lowest palette index wins. The result equals the processor's ``input_ids``
    for the same images without resizing and the palette as float32, ties included.

    Parameters
    ----------
    images
        uint8 tensor of shape (batch, H, W, 3), RGB, on any device.
    palette
        Float tensor of shape (n_colors, 3) with values in [-1, 1]: the processor's
        ``clusters``. It is rounded to float32 and moved to the images' device.

    Returns
    -------
    torch.Tensor
        Token ids, int64 tensor of shape (batch, H*W) on the images' device, row-major pixels.

    Raises
    ------
    ValueError
        If ``images`` is not uint8 of shape (batch, H, W, 3) or ``palette`` is not a non-empty
        float tensor of shape (n_colors, 3).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be a uint8 tensor of shape (batch, H, W, 3), got dtype {images.dtype} "
            f"and shape {tuple(images.shape)}; convert RGB images with .to(torch.uint8)"
        )
    if not palette.is_floating_point() or palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(
            f"palette must be a float tensor of shape (n_colors, 3), got dtype {palette.dtype} "
            f"and shape {tuple(palette.shape)}; pass the processor's clusters"
        )
    if palette.shape[0] == 0:
        raise ValueError("palette is empty (shape (0, 3)); pass at least one colour")

    batch, height, width, _ = images.shape
    device = images.device
    palette = palette.to(device=device, dtype=torch.float32)
    levels = _pixel_levels_cpu().to(device)  # (256,)

    # A pixel's token depends only on its RGB triple, and images repeat colours heavily, so
    # the distances are computed once per distinct colour and gathered back.
    rgb = images.reshape(-1, 3).to(torch.int32)  # (batch*H*W, 3)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]  # (batch*H*W,)
    distinct, inverse = torch.unique(packed, return_inverse=True)  # (n_distinct,), (batch*H*W,)
    channels = torch.stack([(distinct >> 16) & 255, (distinct >> 8) & 255, distinct & 255], 1)
    colours = levels[channels.long()]  # (n_distinct, 3)
    tokens = _nearest_palette_index(colours, palette)[inverse]  # (batch*H*W,)
    return tokens.reshape(batch, height * width)


def build_input_ids(tokens: torch.Tensor, *, policy: str, sos_token: int) -> torch.Tensor:
    """Build the model input from palette tokens under an input policy.

    Parameters
    ----------
    tokens
        int64 tensor of shape (batch, seq), as returned by `quantize`.
    policy
        ``"sos"``: prepend ``sos_token`` and drop the last pixel, as the original iGPT does, so
        the sequence keeps its length. ``"plain"``: the tokens unchanged.
    sos_token
        Id of the start-of-sequence token, the palette size for ImageGPT checkpoints.

    Returns
    -------
    torch.Tensor
        int64 tensor of shape (batch, seq).

    Raises
    ------
    ValueError
        If ``policy`` is unknown or ``tokens`` is not of shape (batch, seq) with seq >= 1.
    """
    if policy not in INPUT_POLICIES:
        raise ValueError(f"input policy {policy!r} is unknown; use one of {INPUT_POLICIES}")
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(
            f"tokens must have shape (batch, seq) with seq >= 1, got {tuple(tokens.shape)}"
        )
    if policy == "plain":
        return tokens

    sos = torch.full((tokens.shape[0], 1), sos_token, dtype=tokens.dtype, device=tokens.device)
    return torch.cat([sos, tokens[:, :-1]], dim=1)  # (batch, seq)


def _layer_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Apply ImageGPT's layer norm over the last axis: no centring and no bias, unlike GPT-2's."""
    return hidden / torch.sqrt(hidden.square().mean(-1, keepdim=True) + eps) * weight


def _validate(
    transformer: ImageGPTModel, input_ids: torch.Tensor, layers: Sequence[int], pooling: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Check the request against the model and return the configured activation function."""
    config: ImageGPTConfig = transformer.config
    n_layer = config.n_layer
    if pooling not in LAYER_POOLINGS:
        raise ValueError(f"pooling {pooling!r} is unknown; use one of {LAYER_POOLINGS}")
    if len(layers) == 0:
        raise ValueError(f"layers is empty; pass indices in 0..{n_layer}")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
            raise ValueError(f"layer {layer!r} is not an integer; pass indices in 0..{n_layer}")
        if not 0 <= layer <= n_layer:
            raise ValueError(
                f"layer {layer} is out of range for a model with n_layer={n_layer} "
                f"(0..{n_layer}); pass indices in that range"
            )

    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"input_ids must be an integer tensor of shape (batch, seq), got dtype "
            f"{input_ids.dtype} and shape {tuple(input_ids.shape)}"
        )
    seq = input_ids.shape[1]
    if not 1 <= seq <= config.n_positions:
        raise ValueError(
            f"input_ids has sequence length {seq}, outside 1..n_positions={config.n_positions}"
        )
    if input_ids.numel() > 0:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"input_ids contain token {low if low < 0 else high}, outside the vocabulary "
                f"0..{config.vocab_size - 1}"
            )

    if config.activation_function not in ACT2FN:
        raise ValueError(
            f"activation_function {config.activation_function!r} is not supported; use one of "
            f"transformers' ACT2FN names"
        )
    inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
    blocks = cast(Sequence[ImageGPTBlock], transformer.h)
    fc_shape = tuple(blocks[0].mlp.c_fc.weight.shape) if n_layer else (config.n_embd, inner)
    if fc_shape != (config.n_embd, inner):
        raise ValueError(
            f"n_inner={config.n_inner!r} does not match the MLP weights of shape {fc_shape}; "
            "load the model with the config it was saved with"
        )
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    return ACT2FN[config.activation_function]


def _block_forward(
    block: ImageGPTBlock,
    hidden: torch.Tensor,
    *,
    layer_idx: int,
    config: ImageGPTConfig,
    activation: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run one ImageGPT block in inference mode (no dropout), shape (batch, seq, dim) in and out."""
    batch, seq, dim = hidden.shape
    heads = config.n_head
    eps = config.layer_norm_epsilon

    normed = _layer_norm(hidden, block.ln_1.weight, eps)
    qkv = block.attn.c_attn(normed)  # (batch, seq, 3*dim)
    query, key, value = qkv.view(batch, seq, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    # (batch, heads, seq, head_dim) each

    scale = 1 / math.sqrt(dim // heads) if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= layer_idx + 1
    if config.reorder_and_upcast_attn:
        # The config requests float32 attention scores even under mixed precision.
        with torch.autocast(hidden.device.type, enabled=False):
            attended = F.scaled_dot_product_attention(
                query.float(), key.float(), value.float(), is_causal=True, scale=scale
            ).to(value.dtype)
    else:
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
    attended = attended.transpose(1, 2).reshape(batch, seq, dim)  # (batch, seq, dim)
    # The residual stream stays float32 under autocast: float32 + bf16 promotes to float32.
    hidden = hidden + block.attn.c_proj(attended)

    normed = _layer_norm(hidden, block.ln_2.weight, eps)
    return hidden + block.mlp.c_proj(activation(block.mlp.c_fc(normed)))


def _pool(
    hidden: torch.Tensor, pooling: str, ln_f: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """Pool hidden states (batch, seq, dim) to float32 (batch, dim), applying ``ln_f`` if given."""
    if pooling == "last_token":
        last = hidden[:, -1].float()  # (batch, dim)
        return ln_f(last) if ln_f is not None else last
    if ln_f is not None:
        # ln_f works per position, so it must run before the mean, not after.
        return ln_f(hidden.float()).mean(dim=1)
    return hidden.mean(dim=1, dtype=torch.float32)


@torch.no_grad()
def pooled_hidden_states(
    model: ImageGPTModel | ImageGPTForCausalImageModeling,
    input_ids: torch.Tensor,
    layers: Sequence[int],
    pooling: str = "mean",
) -> torch.Tensor:
    """Compute the pooled hidden states of the requested layers in one truncated forward pass.

    The pass uses causal ``scaled_dot_product_attention``, keeps no KV cache, applies no
    dropout regardless of ``model.training``, and stops after the deepest requested layer.
    Each requested layer is pooled as soon as it is computed. Under ``torch.autocast`` the
    matrix products run in the autocast dtype while the residual stream, the layer norms and
    the pooling stay float32.

    Parameters
    ----------
    model
        An ``ImageGPTModel``, or an ``ImageGPTForCausalImageModeling`` whose ``.transformer``
        is used. Its config's ``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx``,
        ``reorder_and_upcast_attn``, ``activation_function``, ``layer_norm_epsilon`` and
        ``n_inner`` are honoured.
    input_ids
        Integer tensor of shape (batch, seq), seq <= ``n_positions``, e.g. from
        `build_input_ids`. It is moved to the model's device.
    layers
        Layer indices in 0..n_layer, in any order, repeats allowed. 0 is the embeddings
        (``wte + wpe``), 1..n_layer-1 the output of block *i*, n_layer the output of the last
        block after ``ln_f``, as in Hugging Face's ``output_hidden_states``.
    pooling
        ``"mean"``: mean over all positions. ``"last_token"``: the last position.
        ``"mean_ln_f"``: ``ln_f`` applied to each position before the mean; layer n_layer has
        passed ``ln_f`` already and gets it only once.

    Returns
    -------
    torch.Tensor
        float32 tensor of shape (len(layers), batch, n_embd), in the order of ``layers``.

    Raises
    ------
    ValueError
        If ``pooling`` is unknown, a layer is out of range, ``input_ids`` has the wrong shape,
        length or token range, or the config does not match the weights.
    """
    transformer = model.transformer if isinstance(model, ImageGPTForCausalImageModeling) else model
    activation = _validate(transformer, input_ids, layers, pooling)
    config: ImageGPTConfig = transformer.config
    n_layer = config.n_layer
    eps = config.layer_norm_epsilon
    ln_f_weight = transformer.ln_f.weight.float()

    def ln_f(hidden: torch.Tensor) -> torch.Tensor:
        return _layer_norm(hidden.float(), ln_f_weight, eps)

    pool_ln_f = ln_f if pooling == "mean_ln_f" else None
    requested = {int(layer) for layer in layers}
    pooled: dict[int, torch.Tensor] = {}

    input_ids = input_ids.to(transformer.wte.weight.device, torch.int64)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    hidden = transformer.wte(input_ids) + transformer.wpe(positions)  # (batch, seq, dim)
    if 0 in requested:
        pooled[0] = _pool(hidden, pooling, pool_ln_f)

    blocks = cast(Sequence[ImageGPTBlock], transformer.h)
    for index in range(1, max(requested) + 1):
        hidden = _block_forward(
            blocks[index - 1],
            hidden,
            layer_idx=index - 1,
            config=config,
            activation=activation,
        )  # (batch, seq, dim)
        if index not in requested:
            continue
        if index == n_layer:
            # Hugging Face's last hidden state has passed ln_f; apply it exactly once here.
            pooled[index] = _pool(hidden, pooling, ln_f)
        else:
            pooled[index] = _pool(hidden, pooling, pool_ln_f)

    logger.debug(
        "pooled %d layers (deepest %d of %d) for %d sequences of length %d",
        len(requested),
        max(requested),
        n_layer,
        input_ids.shape[0],
        input_ids.shape[1],
    )
    return torch.stack([pooled[int(layer)] for layer in layers])  # (n_layers, batch, dim)
