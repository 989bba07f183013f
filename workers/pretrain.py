"""Pretrain a small ImageGPT on a stored dataset with the next-pixel objective.

The checkpoint is a plain Hugging Face directory (``ImageGPTForCausalImageModeling`` weights in
safetensors, an ``ImageGPTImageProcessor`` config with the palette) plus ``layerbank.json`` with
the training record, so the same loading code serves it and hub checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from store.settings import get_settings
from workers.datasets import load_split
from workers.pretrain_memory import EVAL_BATCH_SIZE, PretrainShape, check_pretrain_memory

logger = logging.getLogger(__name__)


class PretrainParams(BaseModel):
    """Model size and optimisation settings of a pretraining run."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "digits"
    split: str = "train"
    n_layer: int = Field(4, ge=1, le=48)
    n_embd: int = Field(64, ge=8, le=2048)
    n_head: int = Field(4, ge=1, le=64)
    n_colors: int = Field(16, ge=2, le=1024)
    steps: int = Field(1000, ge=1, le=1_000_000)
    batch_size: int = Field(64, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    dropout: float = Field(0.1, ge=0, le=0.9)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)
    seed: int = 0


def fit_palette(images: np.ndarray, n_colors: int, seed: int) -> np.ndarray:
    """Return a palette of ``n_colors`` RGB colours in [-1, 1], array of shape (n_colors, 3).

    k-means on the training pixels; colours are sorted by brightness so equal data and seed give
    an identical palette.
    """
    from sklearn.cluster import KMeans

    pixels = images.reshape(-1, 3).astype(np.float64) / 127.5 - 1.0
    unique = np.unique(pixels, axis=0)
    if len(unique) < n_colors:
        # Fewer distinct colours than palette entries: pad with the existing ones, jittered apart.
        # k-means would otherwise warn and return duplicates.
        reps = unique[np.arange(n_colors) % len(unique)]
        offsets = (np.arange(n_colors) // len(unique))[:, None] * 1e-3
        centers = np.clip(reps + offsets, -1.0, 1.0)
    else:
        rng = np.random.default_rng(seed)
        sample = pixels[rng.choice(len(pixels), size=min(len(pixels), 100_000), replace=False)]
        kmeans = KMeans(n_clusters=n_colors, n_init=4, random_state=seed).fit(sample)
        centers = kmeans.cluster_centers_
    order = np.argsort(centers.sum(axis=1), kind="stable")
    return centers[order].astype(np.float32)


def pretrain_imagegpt(
    params: PretrainParams,
    output_dir: Path,
    *,
    device: str = "cpu",
    data_roots: list[Path] | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    check_canceled: Callable[[], None] | None = None,
    memory_limit: int | None = None,
) -> dict[str, Any]:
    """Train a small ImageGPT and save it under ``output_dir``; return the training record.

    The directory appears complete or not at all: training writes to a temporary sibling that is
    renamed at the end. With ``params.checkpoint_every`` set, the model is also saved at step 0
    and every that many steps, each with its validation loss, under
    ``output_dir/checkpoints/step-<N>/`` (loadable as ``store:<name>@step<N>``).

    ``check_canceled`` is called before every step, so it must be cheap. When it raises, the
    step checkpoints written so far are deleted, ``output_dir`` is left as it was and the error
    propagates.

    Before anything is trained or written, `PretrainMemoryError` is raised when the estimated
    memory of the run exceeds ``memory_limit`` bytes (by default LAYERBANK_PRETRAIN_MEMORY_GIB).
    """
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessor

    from workers.imagegpt import build_input_ids, quantize

    started = time.perf_counter()
    _remove_leftovers(output_dir)
    torch.manual_seed(params.seed)
    split = load_split(params.dataset, params.split, allowed_roots=data_roots)
    n, height, width, _ = split.images.shape
    if memory_limit is None:
        memory_limit = int(get_settings().pretrain_memory_gib * 2**30)
    # The API checks the same before queueing. This check covers jobs queued some other way or
    # under a larger limit, which would otherwise end in the out-of-memory killer.
    memory = check_pretrain_memory(PretrainShape.of_run(params, split.images.shape), memory_limit)
    logger.info(
        "pretrain: estimated memory %.2f GiB of the %.2f GiB limit",
        memory.total_bytes / 2**30,
        memory_limit / 2**30,
    )

    # Validation part for the generative loss, seeded.
    rng = np.random.default_rng(params.seed)
    order = rng.permutation(n)
    n_val = max(1, int(round(n * params.val_fraction)))
    val_index, train_index = np.sort(order[:n_val]), np.sort(order[n_val:])

    palette = fit_palette(split.images[train_index], params.n_colors, params.seed)
    tokens = quantize(torch.from_numpy(split.images), torch.from_numpy(palette))  # (n, H*W)
    inputs = build_input_ids(tokens, policy="sos", sos_token=params.n_colors)

    config = ImageGPTConfig(
        vocab_size=params.n_colors + 1,
        n_positions=height * width,
        n_embd=params.n_embd,
        n_layer=params.n_layer,
        n_head=params.n_head,
        resid_pdrop=params.dropout,
        embd_pdrop=params.dropout,
        attn_pdrop=params.dropout,
    )
    model = ImageGPTForCausalImageModeling(config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(params))
    generator = torch.Generator().manual_seed(params.seed)
    train_inputs, train_targets = inputs[train_index], tokens[train_index]
    history: list[dict[str, float]] = []
    checkpoints_dir = output_dir.parent / f".{output_dir.name}.{uuid.uuid4().hex}.checkpoints"
    checkpoint_steps = _checkpoint_steps(params)

    def save_checkpoint(step: int, val_loss: float) -> None:
        checkpoint = {
            "objective": "next_pixel",
            "input_policy": "sos",
            "params": params.model_dump(),
            "dataset_fingerprint": split.fingerprint,
            "checkpoint": {"step": step},
            "val_loss": val_loss,
            "val_bits_per_token": val_loss / math.log(2),
        }
        _save(
            model,
            palette,
            (height, width),
            checkpoint,
            checkpoints_dir / f"step-{step}",
            ImageGPTImageProcessor,
        )

    if 0 in checkpoint_steps:
        save_checkpoint(0, _evaluate(model, inputs[val_index], tokens[val_index], device))

    model.train()
    for step in range(1, params.steps + 1):
        if check_canceled is not None:
            _check_canceled(check_canceled, checkpoints_dir, step)
        batch = torch.randint(len(train_index), (params.batch_size,), generator=generator)
        logits = model(input_ids=train_inputs[batch].to(device)).logits  # (batch, seq, n_colors)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), train_targets[batch].to(device).reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % params.eval_every == 0 or step == params.steps or step in checkpoint_steps:
            train_loss = loss.item()
            val_loss = _evaluate(model, inputs[val_index], tokens[val_index], device)
            record = {
                "step": step,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_bits_per_token": val_loss / math.log(2),
            }
            history.append(record)
            logger.info(
                "pretrain: step %d/%d train loss %.4f val loss %.4f",
                step,
                params.steps,
                train_loss,
                val_loss,
            )
            if progress is not None:
                progress(step, params.steps, record)
            if step in checkpoint_steps:
                save_checkpoint(step, val_loss)
            model.train()
        elif progress is not None and step % max(1, params.steps // 100) == 0:
            # Between evaluations, report the step and training loss only (cheap).
            progress(step, params.steps, {"step": step, "train_loss": loss.item()})

    model.eval()
    record = {
        "objective": "next_pixel",
        "input_policy": "sos",
        "params": params.model_dump(),
        "dataset_fingerprint": split.fingerprint,
        "n_train": int(len(train_index)),
        "n_val": int(len(val_index)),
        "history": history,
        "final_val_loss": history[-1]["val_loss"],
        "final_val_bits_per_token": history[-1]["val_bits_per_token"],
        "seconds": round(time.perf_counter() - started, 2),
        "device": device,
    }
    _save(
        model.cpu(),
        palette,
        (height, width),
        record,
        output_dir,
        ImageGPTImageProcessor,
        checkpoints=checkpoints_dir if checkpoint_steps else None,
    )
    return record


def _remove_leftovers(output_dir: Path) -> None:
    """Delete the step checkpoints and partial saves that earlier runs for ``output_dir`` left.

    A run whose worker was killed leaves them beside the model folder. The API starts one run
    per model name at a time, so no other run still writes them.
    """
    pattern = re.compile(
        rf"^\.{re.escape(output_dir.name)}\.[0-9a-f]{{32}}\.(checkpoints|partial)$"
    )
    if not output_dir.parent.is_dir():
        return
    for path in output_dir.parent.iterdir():
        if pattern.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
            logger.info("pretrain: deleted %s, left by an earlier run that stopped", path)


def _check_canceled(check: Callable[[], None], checkpoints_dir: Path, step: int) -> None:
    """Call ``check``; if it raises, delete the run's step checkpoints and raise again."""
    try:
        check()
    except Exception:
        shutil.rmtree(checkpoints_dir, ignore_errors=True)
        logger.info("pretrain: stopped before step %d; step checkpoints deleted", step)
        raise


def _checkpoint_steps(params: PretrainParams) -> set[int]:
    if params.checkpoint_every is None:
        return set()
    return {0, *range(params.checkpoint_every, params.steps + 1, params.checkpoint_every)}


def _warmup_cosine(params: PretrainParams) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < params.warmup_steps:
            return (step + 1) / params.warmup_steps
        span = max(1, params.steps - params.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - params.warmup_steps) / span)))

    return factor


@torch.no_grad()
def _evaluate(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: str
) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(inputs), EVAL_BATCH_SIZE):
        stop = start + EVAL_BATCH_SIZE
        logits = model(input_ids=inputs[start:stop].to(device)).logits
        batch_targets = targets[start:stop].to(device)
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch_targets.reshape(-1), reduction="sum"
            )
        )
        count += batch_targets.numel()
    return total / count


def _save(
    model: torch.nn.Module,
    palette: np.ndarray,
    size: tuple[int, int],
    record: dict[str, Any],
    output_dir: Path,
    processor_cls: Any,
    checkpoints: Path | None = None,
) -> None:
    """Write a checkpoint directory atomically; ``checkpoints`` is moved into it, if given."""
    temporary = output_dir.parent / f".{output_dir.name}.{uuid.uuid4().hex}.partial"
    temporary.mkdir(parents=True)
    try:
        model.save_pretrained(temporary, safe_serialization=True)
        processor = processor_cls(
            clusters=palette.tolist(), do_resize=True, size={"height": size[0], "width": size[1]}
        )
        processor.save_pretrained(temporary)
        (temporary / "layerbank.json").write_text(json.dumps(record, indent=2))
        if checkpoints is not None:
            checkpoints.rename(temporary / "checkpoints")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        temporary.rename(output_dir)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    logger.info("pretrain: checkpoint saved to %s", output_dir)
