"""Load models once per worker and turn batches of images into pooled hidden states.

Each family has an explicit adapter that states its input key, its number of hidden states and
whether the final norm is inside the last state (see `workers.modelref.FAMILIES`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from store.logs import escape_nonprintable
from workers.errors import ModelError
from workers.modelref import FAMILIES, PIXELS, ModelRef

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")

logger = logging.getLogger(__name__)

_cache: dict[tuple[str, str, str], PooledModel] = {}
_cache_lock = threading.Lock()
MAX_CACHED_MODELS = 2


class PooledModel(Protocol):
    """Interface that extraction uses for a model of any family."""

    ref: ModelRef

    def pooled(self, images: np.ndarray, layers: Sequence[int], pooling: str) -> torch.Tensor:
        """Return pooled hidden states, tensor of shape (len(layers), batch, dim) float32.

        ``images`` is an array of shape (batch, H, W, 3) uint8.
        """
        ...

    def features(
        self, images: np.ndarray, layers: Sequence[int], pooling: str, token_layers: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the pooled states and the unpooled states of ``token_layers``.

        The pooled tensor has shape (len(layers), batch, dim), the token tensor
        (len(token_layers), batch, seq, dim), or is None when ``token_layers`` is empty.
        """
        ...


def load_model(
    ref: ModelRef,
    *,
    device: str = "cpu",
    input_policy: str | None = None,
    cpu_bf16: bool = False,
) -> PooledModel:
    """Return the loaded model of ``ref``, reusing the one this process already holds.

    An ImageGPT forward pass runs under bfloat16 autocast on CUDA, and on a CPU too when
    ``cpu_bf16`` is set; otherwise in float32. Other families always run in float32.
    """
    key = (ref.location, ref.revision, f"{device}:{input_policy}:{cpu_bf16}")
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
    if ref.family == PIXELS:
        model: PooledModel = PixelsModel(ref)
    elif ref.family == "imagegpt":
        model = ImageGPTAdapter(ref, device=device, input_policy=input_policy, cpu_bf16=cpu_bf16)
    else:
        model = HiddenStatesAdapter(ref, device=device)
    with _cache_lock:
        while len(_cache) >= MAX_CACHED_MODELS:
            _cache.pop(next(iter(_cache)))
        _cache[key] = model
    logger.info("model %s (%s) loaded on %s", escape_nonprintable(ref.ref), ref.revision, device)
    return model


# Batch sizes chosen when a request gives none. The CPU rule is conservative on purpose: a worker
# shares the machine's memory with the API, Redis and other workers, and beyond a few dozen
# images a larger batch does not make a CPU forward pass faster.
MAX_CPU_BATCH = 64
MAX_CUDA_BATCH = 1024
# Fraction of the free memory one forward pass may use for activations.
CPU_MEMORY_FRACTION = 0.125
CUDA_MEMORY_FRACTION = 0.5
# Live (seq, dim) float32 tensors of one image during a transformer block: residual stream,
# normed copy, q/k/v, attention output, and the 4 x dim MLP hidden layer with its activation.
_LIVE_STATES_PER_BLOCK = 16


def activation_bytes_per_image(model: PooledModel) -> int:
    """Estimate the peak activation memory of one image in one forward pass, in bytes.

    ImageGPT pools each layer as it is produced, so it holds one block's temporaries.
    Other transformers return every hidden state at once, so they hold those as well.
    The pixels baseline keeps one float32 copy of the image.
    """
    config = getattr(getattr(model, "model", None), "config", None)
    if config is None:
        height, width = getattr(model, "size", (224, 224))
        return int(height * width * 3 * 4)
    vision = getattr(config, "vision_config", config)
    dim = int(getattr(vision, "n_embd", None) or getattr(vision, "hidden_size", 768))
    n_layer = int(getattr(vision, "n_layer", None) or getattr(vision, "num_hidden_layers", 12))
    if isinstance(model, ImageGPTAdapter):
        seq = int(getattr(config, "n_positions", 1024))
        return _LIVE_STATES_PER_BLOCK * seq * dim * 4
    image_size = getattr(vision, "image_size", 224)
    patch_size = getattr(vision, "patch_size", 16)
    side = int(image_size if isinstance(image_size, int) else image_size[0])
    patch = int(patch_size if isinstance(patch_size, int) else patch_size[0])
    seq = (side // patch) ** 2 + 1
    return (_LIVE_STATES_PER_BLOCK + n_layer + 1) * seq * dim * 4


def available_memory_bytes(device: str) -> int:
    """Return the free memory of ``device`` in bytes: CUDA's free memory, else available RAM."""
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(torch_device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def batch_size_for_memory(per_image_bytes: int, free_bytes: int, *, device_type: str) -> int:
    """Return the largest power-of-two batch whose activations fit the device's memory budget.

    The budget is `CUDA_MEMORY_FRACTION` of the free memory on CUDA and
    `CPU_MEMORY_FRACTION` of the available RAM on the CPU. The batch is capped at
    `MAX_CUDA_BATCH` or `MAX_CPU_BATCH`, and is at least 1 even when one image exceeds the
    budget.
    """
    if per_image_bytes < 1:
        raise ValueError(f"per_image_bytes must be positive, got {per_image_bytes!r}")
    fraction, cap = (
        (CUDA_MEMORY_FRACTION, MAX_CUDA_BATCH)
        if device_type == "cuda"
        else (CPU_MEMORY_FRACTION, MAX_CPU_BATCH)
    )
    fits = int(free_bytes * fraction) // per_image_bytes
    if fits < 1:
        return 1
    return min(cap, 1 << (fits.bit_length() - 1))


def default_batch_size(model: PooledModel, device: str) -> int:
    """Choose the batch size of ``model`` on ``device`` from its free memory."""
    per_image = activation_bytes_per_image(model)
    free = available_memory_bytes(device)
    batch = batch_size_for_memory(per_image, free, device_type=torch.device(device).type)
    logger.info(
        "model %s on %s: batch size %d chosen (%.1f MiB activations per image, %.0f MiB free)",
        model.ref.ref,
        device,
        batch,
        per_image / 2**20,
        free / 2**20,
    )
    return batch


def _from_pretrained_kwargs(ref: ModelRef) -> dict[str, object]:
    # trust_remote_code is never enabled: only classes that ship with transformers are built.
    kwargs: dict[str, object] = {"trust_remote_code": False}
    if ref.source == "hub":
        kwargs["revision"] = ref.revision
    return kwargs


def _safetensors_kwargs(ref: ModelRef) -> dict[str, object]:
    # A pickled pytorch_model.bin can run code when loaded, so it is never read when a
    # safetensors file sits beside it. Hub models keep transformers' own preference.
    if ref.source in ("local", "store"):
        directory = Path(ref.location)
        if any((directory / name).is_file() for name in SAFETENSORS_FILES):
            return {"use_safetensors": True}
    return {}


class PixelsModel:
    """Raw pixels as a single layer: the baseline every curve is compared with."""

    input_key = "pixels"

    def __init__(self, ref: ModelRef) -> None:
        self.ref = ref

    def pooled(self, images: np.ndarray, layers: Sequence[int], pooling: str) -> torch.Tensor:
        flat = torch.from_numpy(images.reshape(len(images), -1)).float() / 255.0  # (batch, H*W*3)
        return flat.unsqueeze(0)

    def features(
        self, images: np.ndarray, layers: Sequence[int], pooling: str, token_layers: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if token_layers:
            raise ModelError(
                "token_layers is not available for the pixels baseline",
                field="token_layers",
                value=list(token_layers),
            )
        return self.pooled(images, layers, pooling), None


class ImageGPTAdapter:
    """ImageGPT: palette tokens in, ``n_layer + 1`` hidden states out, ln_f inside the last one."""

    input_key = "input_ids"

    def __init__(
        self, ref: ModelRef, *, device: str, input_policy: str | None, cpu_bf16: bool = False
    ) -> None:
        from transformers import ImageGPTModel

        self.ref = ref
        self.device = torch.device(device)
        self.autocast = self.device.type == "cuda" or (self.device.type == "cpu" and cpu_bf16)
        self.input_policy = input_policy or ref.default_input_policy
        try:
            model = ImageGPTModel.from_pretrained(
                ref.location, **_from_pretrained_kwargs(ref), **_safetensors_kwargs(ref)
            )
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"model {ref.ref!r} could not be loaded: {exc}", field="model", value=ref.ref
            ) from exc
        self.model = model.to(self.device).eval()
        # The palette is the processor config's "clusters" (512 colours for the OpenAI
        # checkpoints), in [-1, 1]; the start token's id is the palette size.
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
        return self.pooled_tokens(self.tokens(images), layers, pooling)

    def pooled_tokens(
        self, palette_tokens: torch.Tensor, layers: Sequence[int], pooling: str
    ) -> torch.Tensor:
        """Return pooled states of shape (len(layers), batch, dim) from palette tokens.

        ``palette_tokens`` has shape (batch, H*W), as from `tokens` or the token cache.
        """
        from workers.imagegpt import build_input_ids, pooled_hidden_states

        input_ids = build_input_ids(
            palette_tokens.to(self.device, torch.int64),
            policy=self.input_policy,
            sos_token=self.sos_token,
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pooled = pooled_hidden_states(self.model, input_ids, layers, pooling)
        return pooled.float()

    @torch.no_grad()
    def token_states(self, palette_tokens: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """Return unpooled states of shape (len(layers), batch, seq, dim) float32.

        Runs the model's own forward pass with ``output_hidden_states``, so index *i* means the
        same as in the pooled features: the last state has passed ``ln_f``.
        """
        from workers.imagegpt import build_input_ids

        input_ids = build_input_ids(
            palette_tokens.to(self.device, torch.int64),
            policy=self.input_policy,
            sos_token=self.sos_token,
        )
        states = self.model(input_ids=input_ids, output_hidden_states=True).hidden_states
        return torch.stack([states[layer] for layer in layers]).float()

    def features(
        self, images: np.ndarray, layers: Sequence[int], pooling: str, token_layers: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.features_from_tokens(self.tokens(images), layers, pooling, token_layers)

    def features_from_tokens(
        self,
        palette_tokens: torch.Tensor,
        layers: Sequence[int],
        pooling: str,
        token_layers: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return `features` for palette tokens of shape (batch, H*W) instead of images."""
        pooled = self.pooled_tokens(palette_tokens, layers, pooling)
        if not token_layers:
            return pooled, None
        return pooled, self.token_states(palette_tokens, token_layers)


class HiddenStatesAdapter:
    """ViT, DINOv2 and CLIP vision encoders: ``pixel_values`` in, ``hidden_states`` out.

    ``hidden_states`` has ``num_hidden_layers + 1`` entries and none has passed the final layer
    norm (``layernorm`` for ViT and DINOv2, ``post_layernorm`` for CLIP), so ``mean_ln_f``
    applies it to every layer, the last one included.
    """

    input_key = "pixel_values"

    def __init__(self, ref: ModelRef, *, device: str) -> None:
        from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel

        self.ref = ref
        self.device = torch.device(device)
        kwargs = _from_pretrained_kwargs(ref)
        try:
            # A full CLIP checkpoint (model_type "clip") loads its vision tower only: the
            # vision config is read from its nested vision_config.
            cls = CLIPVisionModel if ref.family == "clip_vision_model" else AutoModel
            self.model = cls.from_pretrained(ref.location, **kwargs, **_safetensors_kwargs(ref))
            self.model = self.model.to(self.device).eval()
            self.processor = AutoImageProcessor.from_pretrained(ref.location, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"model {ref.ref!r} could not be loaded: {exc}", field="model", value=ref.ref
            ) from exc
        norm_name = FAMILIES[ref.family]["final_norm"]
        norm = getattr(self.model, norm_name, None)
        if norm is None:
            raise ModelError(
                f"model {ref.ref!r} ({type(self.model).__name__}) has no final layer "
                f"norm {norm_name!r}; its transformers version is not supported",
                field="model",
                value=ref.ref,
            )
        self.final_norm: torch.nn.Module = norm

    @torch.no_grad()
    def hidden_states(self, images: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Return every hidden state, each a tensor of shape (batch, seq, dim)."""
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixel_values = inputs[self.input_key].to(self.device)
        # NOTE: these families return every hidden state at once; the memory cost is
        # n_layers x batch x tokens x dim, unlike ImageGPT's pooled-as-produced forward pass.
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return tuple(outputs.hidden_states)

    def pooled(self, images: np.ndarray, layers: Sequence[int], pooling: str) -> torch.Tensor:
        return self.features(images, layers, pooling, ())[0]

    @torch.no_grad()
    def features(
        self, images: np.ndarray, layers: Sequence[int], pooling: str, token_layers: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        states = self.hidden_states(images)
        pooled = torch.stack([self._pool(states[layer], pooling) for layer in layers]).float()
        if not token_layers:
            return pooled, None
        return pooled, torch.stack([states[layer] for layer in token_layers]).float()

    def _pool(self, hidden: torch.Tensor, pooling: str) -> torch.Tensor:
        """Pool a (batch, seq, dim) state to (batch, dim); position 0 is the CLS token."""
        if pooling == "mean_ln_f":
            return self.final_norm(hidden).mean(dim=1)
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "last_token":
            return hidden[:, -1]
        return hidden.mean(dim=1)


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Return ``images`` (batch, H, W, 3) uint8 resized to ``size`` with bilinear filtering."""
    if images.shape[1:3] == size:
        return images
    from PIL import Image

    height, width = size
    return np.stack(
        [
            np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
            for image in images
        ]
    )
