"""Load models once per worker and turn batches of images into pooled hidden states.

Each family has an explicit adapter that states its input key, its number of hidden states and
whether the final norm is inside the last state (see `workers.modelref.FAMILIES`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from workers.errors import ModelError
from workers.modelref import PIXELS, ModelRef

logger = logging.getLogger(__name__)

_cache: dict[tuple[str, str, str], PooledModel] = {}
_cache_lock = threading.Lock()
MAX_CACHED_MODELS = 2


class PooledModel(Protocol):
    """What extraction needs from a model of any family."""

    ref: ModelRef

    def pooled(self, images: np.ndarray, layers: Sequence[int], pooling: str) -> torch.Tensor:
        """Return pooled hidden states, tensor of shape (len(layers), batch, dim) float32.

        ``images`` is an array of shape (batch, H, W, 3) uint8.
        """
        ...


def load_model(ref: ModelRef, *, device: str = "cpu", input_policy: str | None = None) -> PooledModel:
    """Return the loaded model of ``ref``, reusing the one this process already holds."""
    key = (ref.location, ref.revision, f"{device}:{input_policy}")
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
    if ref.family == PIXELS:
        model: PooledModel = PixelsModel(ref)
    elif ref.family == "imagegpt":
        model = ImageGPTAdapter(ref, device=device, input_policy=input_policy)
    else:
        model = HiddenStatesAdapter(ref, device=device)
    with _cache_lock:
        while len(_cache) >= MAX_CACHED_MODELS:
            _cache.pop(next(iter(_cache)))
        _cache[key] = model
    logger.info("model %s (%s) loaded on %s", ref.ref, ref.revision, device)
    return model


def _from_pretrained_kwargs(ref: ModelRef) -> dict[str, object]:
    # trust_remote_code is never enabled: only classes that ship with transformers are built.
    kwargs: dict[str, object] = {"trust_remote_code": False}
    if ref.source == "hub":
        kwargs["revision"] = ref.revision
    return kwargs


class PixelsModel:
    """Raw pixels as a single layer: the baseline every curve is compared with."""

    def __init__(self, ref: ModelRef) -> None:
        self.ref = ref

    def pooled(self, images: np.ndarray, layers: Sequence[int], pooling: str) -> torch.Tensor:
        flat = torch.from_numpy(images.reshape(len(images), -1)).float() / 255.0  # (batch, H*W*3)
        return flat.unsqueeze(0)


class ImageGPTAdapter:
    """ImageGPT: palette tokens in, ``n_layer + 1`` hidden states out, ln_f inside the last one."""

    input_key = "input_ids"

    def __init__(self, ref: ModelRef, *, device: str, input_policy: str | None) -> None:
        from transformers import ImageGPTModel

        self.ref = ref
        self.device = torch.device(device)
        self.input_policy = input_policy or ref.default_input_policy
        try:
            model = ImageGPTModel.from_pretrained(ref.location, **_from_pretrained_kwargs(ref))
        except (OSError, ValueError) as exc:
            raise ModelError(f"model {ref.ref!r} could not be loaded: {exc}", field="model",
                             value=ref.ref) from exc
        self.model = model.to(self.device).eval()
        clusters = np.asarray(ref.processor["clusters"], dtype=np.float32)
        self.palette = torch.from_numpy(clusters).to(self.device)  # (n_colors, 3) in [-1, 1]
        size = ref.processor.get("size", {"height": 32, "width": 32})
        self.size = (int(size["height"]), int(size["width"]))
        self.sos_token = int(clusters.shape[0])

    def tokens(self, images: np.ndarray) -> torch.Tensor:
        """Return palette tokens, tensor of shape (batch, H*W) int64."""
        from workers.imagegpt import quantize

        images = resize_images(images, self.size)
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return quantize(batch, self.palette)

    def pooled(self, images: np.ndarray, layers: Sequence[int], pooling: str) -> torch.Tensor:
        from workers.imagegpt import build_input_ids, pooled_hidden_states

        input_ids = build_input_ids(self.tokens(images), policy=self.input_policy,
                                    sos_token=self.sos_token)
        autocast = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            pooled = pooled_hidden_states(self.model, input_ids, layers, pooling)
        return pooled.float()


class HiddenStatesAdapter:
    """Vision encoders loaded by ``AutoModel``: ``pixel_values`` in, ``hidden_states`` out."""

    input_key = "pixel_values"

    def __init__(self, ref: ModelRef, *, device: str) -> None:
        from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel

        self.ref = ref
        self.device = torch.device(device)
        kwargs = _from_pretrained_kwargs(ref)
        try:
            cls = CLIPVisionModel if ref.family == "clip_vision_model" else AutoModel
            self.model = cls.from_pretrained(ref.location, **kwargs).to(self.device).eval()
            self.processor = AutoImageProcessor.from_pretrained(ref.location, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model {ref.ref!r} could not be loaded: {exc}", field="model",
                             value=ref.ref) from exc

    @torch.no_grad()
    def pooled(self, images: np.ndarray, layers: Sequence[int], pooling: str) -> torch.Tensor:
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device)
        # NOTE: these families return every hidden state at once; the memory cost is
        # n_layers x batch x tokens x dim, unlike ImageGPT's pooled-as-produced forward pass.
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        states = outputs.hidden_states
        norm = getattr(self.model, "layernorm", None) or getattr(
            getattr(self.model, "vision_model", None), "post_layernorm", None)
        pooled = []
        for layer in layers:
            hidden = states[layer]  # (batch, tokens, dim)
            if pooling == "mean_ln_f" and norm is not None:
                hidden = norm(hidden)
            if pooling == "cls":
                pooled.append(hidden[:, 0])
            elif pooling == "last_token":
                pooled.append(hidden[:, -1])
            else:
                pooled.append(hidden.mean(dim=1))
        return torch.stack(pooled).float()


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Return ``images`` (batch, H, W, 3) uint8 resized to ``size`` with bilinear filtering."""
    if images.shape[1:3] == size:
        return images
    from PIL import Image

    height, width = size
    return np.stack(
        [np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR)) for image in images]
    )
