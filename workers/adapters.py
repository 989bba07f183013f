"""Houlsby bottleneck adapters on a frozen ImageGPT, trained as a probe of one layer.

An adapter maps a sub-layer's output ``h`` to ``h + W_up act(W_down h + b_down) + b_up`` with
``W_down`` of shape (m, d) and ``W_up`` of shape (d, m): 2md + d + m parameters. Following
Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (ICML 2019), one adapter sits
after the attention and one after the feed-forward sub-layer of every block, before the
residual addition, and the layer norms are trained as well. Here only the blocks up to the
probed layer get adapters, and a linear head reads the pooled hidden state of that layer,
standardised by a batch norm without parameters (as linear probes standardise features).
``W_up`` and ``b_up`` start at zero, so at step 0 every adapter is the identity and the
network computes exactly the frozen model's hidden states.

The forward pass mirrors `workers.imagegpt.pooled_hidden_states` (same layer norm, causal
``scaled_dot_product_attention``, pooling) but keeps gradients for the adapters.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ImageGPTConfig, ImageGPTModel
from transformers.activations import ACT2FN
from transformers.models.imagegpt.modeling_imagegpt import ImageGPTBlock

from store.settings import get_settings
from workers.errors import ProbeError
from workers.imagegpt import _layer_norm, _pool
from workers.probes.metrics import accuracy, classification_metrics
from workers.probes.settings import (
    ADAPTER_PARAMS,
    adapter_fit_shape,
    check_adapter_memory,
    read_adapter_settings,
    read_val_fraction,
    require_validation_items,
)
from workers.probes.task import stratified_split

__all__ = [
    "ADAPTER_PARAMS",
    "AdaptedImageGPT",
    "BottleneckAdapter",
    "adapter_parameter_count",
    "fit_adapter",
]

logger = logging.getLogger(__name__)


def adapter_parameter_count(dim: int, bottleneck: int) -> int:
    """Return the parameters of one adapter: 2 * dim * bottleneck + dim + bottleneck."""
    return 2 * dim * bottleneck + dim + bottleneck


class BottleneckAdapter(nn.Module):
    """d -> m -> d with GELU and a residual; the zero up-projection makes it start as identity."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map (..., dim) to (..., dim)."""
        return hidden + self.up(F.gelu(self.down(hidden)))


class AdaptedImageGPT(nn.Module):
    """A frozen ImageGPT up to ``layer`` with adapters, trainable layer norms and a linear head.

    Trainable: two adapters per block up to ``layer``, copies of those blocks' layer-norm
    weights (and of ``ln_f`` where the pooled state passes it), and the head's weight and bias.

    Parameters
    ----------
    transformer
        The ``ImageGPTModel``; its parameters are set to ``requires_grad=False`` and never
        changed. The layer-norm weights of the used blocks are copied into trainable parameters.
    layer
        Hidden-state index probed, 0..n_layer, as in `workers.imagegpt.pooled_hidden_states`.
    bottleneck
        Adapter width m.
    n_classes
        Outputs of the head.
    pooling
        ``"mean"``, ``"last_token"`` or ``"mean_ln_f"``, as in extraction.
    """

    def __init__(
        self,
        transformer: ImageGPTModel,
        *,
        layer: int,
        bottleneck: int,
        n_classes: int,
        pooling: str,
    ) -> None:
        super().__init__()
        config: ImageGPTConfig = transformer.config
        if not 0 <= layer <= config.n_layer:
            raise ProbeError(
                f"layer {layer} is out of range for a model with n_layer="
                f"{config.n_layer}; pass 0..{config.n_layer}",
                field="layers",
                value=layer,
            )
        transformer.requires_grad_(False)
        # A plain attribute, not a submodule: the frozen backbone stays out of state_dict() and
        # parameters(), and may be shared with the worker's model cache.
        self.__dict__["transformer"] = transformer
        self.config = config
        self.layer = layer
        self.pooling = pooling
        self.activation = ACT2FN[config.activation_function]
        dim = config.n_embd
        blocks = cast(Sequence[ImageGPTBlock], transformer.h)[:layer]
        self.attention_adapters = nn.ModuleList(BottleneckAdapter(dim, bottleneck) for _ in blocks)
        self.feed_forward_adapters = nn.ModuleList(
            BottleneckAdapter(dim, bottleneck) for _ in blocks
        )
        self.ln_1 = nn.ParameterList(nn.Parameter(b.ln_1.weight.detach().clone()) for b in blocks)
        self.ln_2 = nn.ParameterList(nn.Parameter(b.ln_2.weight.detach().clone()) for b in blocks)
        # ln_f is inside hidden state n_layer and applied per token by mean_ln_f pooling.
        uses_ln_f = layer == config.n_layer or pooling == "mean_ln_f"
        self.ln_f = nn.Parameter(transformer.ln_f.weight.detach().clone()) if uses_ln_f else None
        # Standardises each pooled feature over the batch, without parameters: mean-pooled
        # ImageGPT features share a large offset that a per-sample layer norm would keep.
        self.head_norm = nn.BatchNorm1d(dim, affine=False)
        self.head = nn.Linear(dim, n_classes)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part, and the frozen backbone's total."""
        adapters = [*self.attention_adapters, *self.feed_forward_adapters]
        norms = [*self.ln_1, *self.ln_2, *([self.ln_f] if self.ln_f is not None else [])]
        counts = {
            "per_adapter": adapter_parameter_count(
                self.config.n_embd, self.attention_adapters[0].down.out_features
            )
            if adapters
            else 0,
            "n_adapters": len(adapters),
            "adapters": sum(p.numel() for a in adapters for p in a.parameters()),
            "layer_norms": sum(p.numel() for p in norms),
            "head": sum(p.numel() for p in self.head.parameters()),
        }
        counts["total"] = counts["adapters"] + counts["layer_norms"] + counts["head"]
        counts["backbone_frozen"] = sum(p.numel() for p in self.transformer.parameters())
        return counts

    def _attention(
        self, block: ImageGPTBlock, normed: torch.Tensor, layer_idx: int
    ) -> torch.Tensor:
        batch, seq, dim = normed.shape
        heads = self.config.n_head
        qkv = block.attn.c_attn(normed)  # (batch, seq, 3*dim)
        query, key, value = qkv.view(batch, seq, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        scale = 1 / math.sqrt(dim // heads) if self.config.scale_attn_weights else 1.0
        if self.config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
        return block.attn.c_proj(attended.transpose(1, 2).reshape(batch, seq, dim))

    def hidden_state(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return hidden state ``layer``, tensor of shape (batch, seq, dim); ln_f not applied."""
        transformer = self.transformer
        eps = self.config.layer_norm_epsilon
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = transformer.wte(input_ids) + transformer.wpe(positions)  # (batch, seq, dim)
        blocks = cast(Sequence[ImageGPTBlock], transformer.h)
        for index in range(self.layer):
            block = blocks[index]
            attended = self._attention(block, _layer_norm(hidden, self.ln_1[index], eps), index)
            hidden = hidden + self.attention_adapters[index](attended)
            normed = _layer_norm(hidden, self.ln_2[index], eps)
            feed_forward = block.mlp.c_proj(self.activation(block.mlp.c_fc(normed)))
            hidden = hidden + self.feed_forward_adapters[index](feed_forward)
        return hidden

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the pooled hidden state of ``layer``, shape (batch, dim) float32."""
        hidden = self.hidden_state(input_ids)
        if self.ln_f is None:
            return _pool(hidden, self.pooling, None)
        weight, eps = self.ln_f, self.config.layer_norm_epsilon

        def ln_f(states: torch.Tensor) -> torch.Tensor:
            return _layer_norm(states.float(), weight, eps)

        return _pool(hidden, self.pooling, ln_f)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return class logits, shape (batch, n_classes)."""
        return cast(torch.Tensor, self.head(self.head_norm(self.features(input_ids))))


def _update_feature_statistics(
    model: AdaptedImageGPT, input_ids: torch.Tensor, batch_size: int
) -> None:
    """Set the head's standardisation to the mean and variance of ``input_ids``' features.

    Training updates the batch norm's running statistics by a moving average that lags behind
    the adapters; the features' spread is small next to their common offset, so that lag would
    distort evaluation. One pass with the current weights gives exact averages instead.
    """
    norm = model.head_norm
    norm.reset_running_stats()
    norm.momentum = None  # cumulative average over the pass
    model.train()
    with torch.no_grad():
        for start in range(0, len(input_ids), batch_size):
            batch = input_ids[start : start + batch_size]
            if len(batch) > 1:
                norm(model.features(batch))
    norm.momentum = 0.1


def _train_epoch(
    model: AdaptedImageGPT,
    optimizer: torch.optim.Optimizer,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    epoch: int,
) -> float:
    """Take one optimizer step per batch of the items in ``order``; return the last batch's
    loss. Raises `ProbeError` naming ``lr`` when a loss is NaN or infinite."""
    model.train()
    total = torch.zeros((), device=input_ids.device)
    loss = total
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size].to(input_ids.device)
        loss = F.cross_entropy(model(input_ids[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total = total + loss.detach()
    # NaN and infinity survive the sum, so one check per epoch finds any diverged batch.
    if not math.isfinite(float(total)):
        lr = optimizer.param_groups[0]["lr"]
        raise ProbeError(
            f"the adapter fit diverged at epoch {epoch} (training loss {float(total)}) with "
            f"lr={lr!r}; lower lr",
            field="lr",
            value=lr,
        )
    return float(loss.detach())


def _predict(model: AdaptedImageGPT, input_ids: torch.Tensor, batch_size: int) -> np.ndarray:
    model.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(input_ids), batch_size):
            logits = model(input_ids[start : start + batch_size])
            predictions.append(logits.argmax(dim=1).cpu().numpy())
    return np.concatenate(predictions) if predictions else np.empty(0, dtype=np.int64)


def fit_adapter(
    transformer: ImageGPTModel,
    train_ids: torch.Tensor,
    y_train: np.ndarray,
    test_ids: torch.Tensor,
    y_test: np.ndarray,
    *,
    layer: int,
    pooling: str,
    params: Mapping[str, Any],
    seed: int = 0,
    class_names: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train adapters, layer norms and a head on ``layer`` of a frozen ImageGPT; score on test.

    A stratified, seeded validation part of train (``val_fraction``, default 0.2) picks the
    epoch: the weights of the epoch with the best validation accuracy are kept (the first such
    epoch on ties) and scored on the test items.

    Parameters
    ----------
    transformer
        The frozen ``ImageGPTModel``.
    train_ids, test_ids
        Model inputs, int64 tensors of shape (n_train, seq) and (n_test, seq) on the model's
        device, e.g. from `workers.imagegpt.build_input_ids`.
    y_train, y_test
        Integer labels of shapes (n_train,) and (n_test,); every test label must occur in train.
    params
        ``bottleneck`` (m, default 64), ``epochs`` (10), ``lr`` (1e-3), ``weight_decay`` (0),
        ``batch_size`` (64), ``val_fraction`` (0.2).
    progress
        Called as ``progress(epoch, epochs)`` after each epoch.

    Returns
    -------
    dict
        A probe row like the other kinds' (``kind`` "adapter", ``layer``, accuracies, test
        metrics, ``params``, ``grid`` with the validation accuracy per epoch) plus
        ``trainable_parameters`` (per part, see `AdaptedImageGPT.parameter_counts`).
    """
    settings = read_adapter_settings(params)
    bottleneck, epochs, batch_size = settings.bottleneck, settings.epochs, settings.batch_size
    lr, weight_decay = settings.lr, settings.weight_decay
    fraction = read_val_fraction(params)
    classes = np.unique(y_train)
    unseen = np.setdiff1d(np.unique(y_test), classes)
    if len(classes) < 2 or len(unseen):
        raise ProbeError(
            f"an adapter probe needs at least 2 train classes covering every test "
            f"label; train has {classes.tolist()}, test adds {unseen.tolist()}",
            field="y_test",
            value=unseen.tolist(),
        )
    y_fit_all = torch.from_numpy(np.searchsorted(classes, y_train)).to(train_ids.device)
    y_test_idx = np.searchsorted(classes, y_test)
    fit_part, val_part = stratified_split(np.searchsorted(classes, y_train), fraction, seed)
    require_validation_items(len(val_part), fraction, y_train)

    # Probes stored before the API checked the estimate reach this check only here.
    check_adapter_memory(
        settings,
        adapter_fit_shape(
            transformer.config.to_dict(),
            seq_len=int(train_ids.shape[1]),
            layer=layer,
            max_batch_items=max(len(fit_part), len(test_ids)),
        ),
        int(get_settings().adapter_fit_gib * 2**30),
    )

    started = time.perf_counter()
    torch.manual_seed(seed)
    model = AdaptedImageGPT(
        transformer, layer=layer, bottleneck=bottleneck, n_classes=len(classes), pooling=pooling
    ).to(train_ids.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    fit_index = torch.from_numpy(fit_part)
    val_labels = y_fit_all[val_part].cpu().numpy()
    grid: list[dict[str, Any]] = []
    best_state, best_val, best_epoch = copy.deepcopy(model.state_dict()), -1.0, 0

    for epoch in range(1, epochs + 1):
        order = fit_index[torch.randperm(len(fit_index), generator=generator)]
        loss = _train_epoch(model, optimizer, train_ids, y_fit_all, order, batch_size, epoch)
        _update_feature_statistics(model, train_ids[fit_index], batch_size)
        val_accuracy = accuracy(val_labels, _predict(model, train_ids[val_part], batch_size))
        grid.append({"epoch": epoch, "val_accuracy": val_accuracy, "train_loss": loss})
        logger.debug(
            "adapter layer %d: epoch %d/%d val accuracy %.4f", layer, epoch, epochs, val_accuracy
        )
        if val_accuracy > best_val:
            best_val, best_epoch = val_accuracy, epoch
            best_state = copy.deepcopy(model.state_dict())
        if progress is not None:
            progress(epoch, epochs)

    model.load_state_dict(best_state)
    fit_labels = y_fit_all[fit_part].cpu().numpy()
    train_accuracy = accuracy(fit_labels, _predict(model, train_ids[fit_part], batch_size))
    test_pred = _predict(model, test_ids, batch_size)
    fit_seconds = time.perf_counter() - started
    counts = model.parameter_counts()
    warnings = []
    if best_epoch == epochs and epochs > 1:
        warnings.append(
            f"validation accuracy was highest at the last epoch ({epochs}); it may "
            "still be rising, so pass more epochs"
        )
    logger.info(
        "adapter layer %d: best epoch %d, val %.4f, %d trainable parameters, %.1fs",
        layer,
        best_epoch,
        best_val,
        counts["total"],
        fit_seconds,
    )
    return {
        "kind": "adapter",
        "layer": int(layer),
        "engine": "torch",
        "train_accuracy": train_accuracy,
        "val_accuracy": best_val,
        **classification_metrics(y_test_idx, test_pred, len(classes), seed=seed),
        "params": {
            "bottleneck": bottleneck,
            "epochs": epochs,
            "best_epoch": best_epoch,
            "lr": lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
        },
        "grid": grid,
        "converged": not warnings,
        "n_iter": best_epoch,
        "fit_seconds": fit_seconds,
        "warnings": warnings,
        "classes": classes.tolist(),
        "class_names": None if class_names is None else [str(class_names[c]) for c in classes],
        "n_train": len(y_train),
        "n_val": len(val_part),
        "n_test": len(y_test),
        "seed": seed,
        "trainable_parameters": counts,
    }
