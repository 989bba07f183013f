"""Benchmark ImageGPT feature extraction: Hugging Face's eager path against layerbank's kernel.

Both paths turn uint8 images into mean-pooled hidden states of every layer and save them with
``np.save``:

- naive: the NumPy ``ImageGPTImageProcessorPil`` quantises each batch, ``ImageGPTModel`` runs in
  eager float32 with ``output_hidden_states=True``, every full hidden state is kept on the
  CPU, then mean-pooled and saved.
- layerbank: ``workers.imagegpt.quantize`` on the device, ``pooled_hidden_states`` (causal
  SDPA, pooling inside the pass) in ``--dtype``, then the pooled array is saved.

Runs alternate (naive, layerbank, naive, ...) in one process and the median of ``--rounds``
is reported, followed by each step on its own: SDPA against eager attention, torch against
NumPy quantisation, pooling inside the pass against keeping every state. The model has random
weights (the shape of imagegpt-small by default) and the images are random uniform uint8,
which is the worst case for quantisation because almost every pixel is a distinct colour.

FLOPs are counted analytically per image: 2 * (12 * dim**2) per token per layer for the
matrix products with weights (4 * dim**2 for attention in/out, 8 * dim**2 for the MLP when
n_inner = 4 * dim), plus 4 * seq * dim per token per layer for attention scores and weighted
values with the dense (non-causal) count. A causal kernel does about half that attention
work, so the causal count is printed as well. The ceiling is the best GFLOP/s of a large
``torch.matmul`` in the same dtype on the same device, measured before and after the
end-to-end runs; the higher of the two is used.

Example::

    python bench/extract.py --images 8 --batch 4 --rounds 3 --device cpu --dtype fp32
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

# A direct run (python bench/extract.py) puts bench/ first on sys.path, where bench/store.py
# would shadow the store package, so the repository root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import ImageGPTConfig, ImageGPTModel  # noqa: E402
from transformers.models.imagegpt.image_processing_pil_imagegpt import (  # noqa: E402
    ImageGPTImageProcessorPil,
)

from workers.imagegpt import (  # noqa: E402
    _block_forward,
    _layer_norm,
    pooled_hidden_states,
    quantize,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="number of blocks (n_layer)")
    parser.add_argument("--width", type=int, default=512, help="hidden size (n_embd)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (n_head)")
    parser.add_argument("--seq", type=int, default=1024, help="pixels per image, a square")
    parser.add_argument("--vocab", type=int, default=513, help="vocabulary: palette + SOS")
    parser.add_argument("--images", type=int, default=8, help="images per timed run")
    parser.add_argument("--batch", type=int, default=4, help="images per forward pass")
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs per path")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype of layerbank"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Run ``fn`` once and return its wall time in seconds, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(
    runs: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, float]:
    """Warm up each run once, then time them in turn ``rounds`` times; return median seconds."""
    for fn in runs.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            seconds[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in seconds.items()}


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int = 2048) -> float:
    """Return the best GFLOP/s of a (size, size) @ (size, size) matmul over a few repeats."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    repeats = 50 if device.type == "cuda" else 3
    best = math.inf
    for _ in range(5):
        best = min(best, timed(lambda: [a @ b for _ in range(repeats)], device) / repeats)
    return 2 * size**3 / best / 1e9


def forward_flops(config: ImageGPTConfig, seq: int) -> tuple[float, float]:
    """Return (dense, causal) forward FLOPs per image, matrix products only."""
    dim = config.n_embd
    inner = config.n_inner or 4 * dim
    weights = 2 * (4 * dim * dim + 2 * dim * inner)  # per token per layer
    attention = 4 * seq * dim  # scores + weighted values, per token per layer, dense
    per_layer = seq * (weights + attention)
    causal_per_layer = seq * (weights + attention / 2)
    return config.n_layer * per_layer, config.n_layer * causal_per_layer


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention as Hugging Face's eager ImageGPT computes it, (batch, heads, seq, head_dim)."""
    seq = q.shape[-2]
    weights = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(v.shape[-1])  # (b, h, seq, seq)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    weights = torch.where(causal, weights, torch.finfo(weights.dtype).min)
    return torch.matmul(weights.softmax(dim=-1).to(v.dtype), v)


def keep_all_hidden_states(model: ImageGPTModel, input_ids: torch.Tensor) -> np.ndarray:
    """Run layerbank's forward but keep every full hidden state, (n_layer + 1, b, seq, dim)."""
    config = model.config
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    hidden = model.wte(input_ids) + model.wpe(positions)  # (batch, seq, dim)
    states = [hidden.float().cpu()]
    for index, block in enumerate(model.h):
        hidden = _block_forward(
            block,
            hidden,
            layer_idx=index,
            config=config,
            activation=block.mlp.act,
        )
        states.append(hidden.float().cpu())
    states[-1] = _layer_norm(states[-1], model.ln_f.weight.float().cpu(), config.layer_norm_epsilon)
    return torch.stack(states).numpy()


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"invalid --device cuda: torch {torch.__version__} finds no CUDA device; "
            "run on a machine with a GPU or use --device cpu"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    side = math.isqrt(args.seq)
    if side * side != args.seq:
        raise SystemExit(f"--seq {args.seq} is not a square number of pixels; use e.g. 1024")
    autocast: Callable[[], AbstractContextManager[object]] = (
        (lambda: torch.autocast(device.type, dtype=dtype))
        if dtype != torch.float32
        else nullcontext
    )

    torch.manual_seed(args.seed)
    config = ImageGPTConfig(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=args.heads,
        n_positions=args.seq,
        vocab_size=args.vocab,
    )
    model = ImageGPTModel(config).to(device).eval()
    rng = np.random.default_rng(args.seed)
    palette_np = rng.uniform(-1, 1, (args.vocab - 1, 3)).astype(np.float32)
    palette = torch.from_numpy(palette_np).to(device)
    images_np = rng.integers(0, 256, (args.images, side, side, 3), dtype=np.uint8)
    processor = ImageGPTImageProcessorPil(clusters=palette_np, do_resize=False)
    layers = list(range(args.layers + 1))
    batches = [
        slice(start, min(start + args.batch, args.images))
        for start in range(0, args.images, args.batch)
    ]
    out_dir = tempfile.mkdtemp(prefix="layerbank-bench-")
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    out_path = os.path.join(out_dir, "features.npy")

    def naive() -> None:
        for rows in batches:
            input_ids = processor(list(images_np[rows]))["input_ids"]
            input_ids = torch.from_numpy(np.stack(input_ids)).to(device)
            with torch.no_grad():
                hidden_states = model(input_ids, output_hidden_states=True).hidden_states
            full = np.stack([h.cpu().numpy() for h in hidden_states])  # (L+1, b, seq, dim)
            np.save(out_path, full.mean(axis=2))

    def layerbank() -> None:
        for rows in batches:
            images = torch.from_numpy(images_np[rows]).to(device)
            input_ids = quantize(images, palette)
            with autocast():
                pooled = pooled_hidden_states(model, input_ids, layers, "mean")
            np.save(out_path, pooled.cpu().numpy())

    print(f"date        {datetime.date.today().isoformat()}")
    print(f"machine     {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor()}")
    print(f"torch       {torch.__version__}, threads {torch.get_num_threads()}")
    if device.type == "cuda":
        print(f"gpu         {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    print(
        f"model       n_layer {args.layers}, n_embd {args.width}, n_head {args.heads}, "
        f"seq {args.seq}, vocab {args.vocab}, random weights"
    )
    print(
        f"run         {args.images} images, batch {args.batch}, {args.rounds} rounds, "
        f"device {args.device}, layerbank dtype {args.dtype}, all {len(layers)} layers, mean"
    )

    def ceilings() -> tuple[float, float]:
        ceiling = matmul_ceiling(device, dtype)
        fp32 = ceiling if dtype == torch.float32 else matmul_ceiling(device, torch.float32)
        return ceiling, fp32

    # The ceiling is measured before and after the end-to-end runs and the higher value is
    # kept: on a shared virtual machine one measurement can come out a third low.
    before = ceilings()
    dense, causal = forward_flops(config, args.seq)
    print(f"forward FLOPs per image: {dense / 1e9:.1f} G dense, {causal / 1e9:.1f} G causal")

    medians = alternate({"naive": naive, "layerbank": layerbank}, args.rounds, device)
    after = ceilings()
    ceiling, ceiling_fp32 = max(before[0], after[0]), max(before[1], after[1])
    print(
        f"\nmatmul ceiling 2048x2048, {args.dtype}: {before[0]:.1f} GFLOP/s before the runs, "
        f"{after[0]:.1f} after; {ceiling:.1f} used"
    )
    if dtype != torch.float32:
        print(f"matmul ceiling 2048x2048, fp32: {before[1]:.1f} before, {after[1]:.1f} after")
    print("\nend to end (median seconds per run, images/s, achieved GFLOP/s dense | causal)")
    for name, seconds in medians.items():
        rate = args.images / seconds
        dense_rate, causal_rate = rate * dense / 1e9, rate * causal / 1e9
        run_ceiling = ceiling_fp32 if name == "naive" else ceiling
        print(
            f"  {name:10s} {seconds:8.2f} s {rate:8.2f} img/s {dense_rate:8.1f} | "
            f"{causal_rate:6.1f} GFLOP/s = {dense_rate / run_ceiling:5.1%} | "
            f"{causal_rate / run_ceiling:5.1%} of ceiling"
        )
    print(f"  speed-up   {medians['naive'] / medians['layerbank']:.2f}x")

    # Each step on its own, one batch, same alternation.
    batch = min(args.batch, args.images)
    head_dim = args.width // args.heads
    shape = (batch, args.heads, args.seq, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    attention = alternate(
        {
            "eager": lambda: eager_attention(q, k, v),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        },
        args.rounds,
        device,
    )
    images_batch = images_np[:batch]
    images_device = torch.from_numpy(images_batch).to(device)
    quantisation = alternate(
        {
            "numpy processor": lambda: processor(list(images_batch)),
            "torch quantize": lambda: quantize(images_device, palette),
        },
        args.rounds,
        device,
    )
    input_ids = quantize(images_device, palette)

    def pooled_inside() -> None:
        with autocast():
            pooled = pooled_hidden_states(model, input_ids, layers, "mean")
        np.save(out_path, pooled.cpu().numpy())

    def keep_all() -> None:
        with torch.no_grad(), autocast():
            full = keep_all_hidden_states(model, input_ids)
        np.save(out_path, full.mean(axis=2))

    pooling = alternate({"keep all": keep_all, "pooled inside": pooled_inside}, args.rounds, device)
    kept_mib = (args.layers + 1) * batch * args.seq * args.width * 4 / 2**20
    print(f"\nsteps (median seconds for one batch of {batch})")
    print(
        f"  attention, one layer, {args.dtype}: eager {attention['eager'] * 1e3:.1f} ms, "
        f"causal SDPA {attention['sdpa'] * 1e3:.1f} ms "
        f"({attention['eager'] / attention['sdpa']:.2f}x); x{args.layers} layers = "
        f"{(attention['eager'] - attention['sdpa']) * args.layers:.2f} s saved per batch"
    )
    print(
        f"  quantisation: NumPy processor {quantisation['numpy processor'] * 1e3:.1f} ms, "
        f"torch {quantisation['torch quantize'] * 1e3:.1f} ms "
        f"({quantisation['numpy processor'] / quantisation['torch quantize']:.2f}x)"
    )
    print(
        f"  pooling ({args.dtype} forward): keep all {pooling['keep all']:.2f} s "
        f"({kept_mib:.0f} MiB of float32 states), pooled inside {pooling['pooled inside']:.2f} s "
        f"({pooling['keep all'] / pooling['pooled inside']:.2f}x)"
    )


if __name__ == "__main__":
    main()
