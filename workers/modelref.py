"""Resolve a model reference to a family, a location and an exact revision, without torch.

The API process uses this to compute feature-set ids and to reject unknown models before any job
is queued; workers use it again and check that the revision still matches.

References:

``store:<name>``
    a checkpoint the service pretrained itself, under the store's ``models/<name>``.
``/abs/path`` or ``./path``
    a local Hugging Face checkpoint directory (``config.json`` + weights).
``<org>/<name>``
    a Hugging Face Hub id, resolved to its commit hash (needs hub access or a local hub cache).
``pixels``
    raw pixel values scaled to [0, 1], one layer: the baseline every curve is compared with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.ids import canonical_path, has_control_characters
from workers.errors import ModelError, PathNotAllowedError, absolute_path_hint

logger = logging.getLogger(__name__)

PIXELS = "pixels"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HASHED_FILES = ("config.json", "preprocessor_config.json", *WEIGHT_FILES)
INPUT_POLICIES = ("sos", "plain")
# Families with an explicit adapter in workers.models: the model input, the config key that
# counts blocks (``hidden_states`` has that many plus one entries), the module name of the final
# layer norm, whether Hugging Face's last hidden state has already passed it, and what index 0 is.
# Checked against transformers 5.x: ViT and DINOv2 apply ``layernorm`` only to
# ``last_hidden_state``, and CLIP's ``post_layernorm`` only to the pooled CLS output.
FAMILIES: dict[str, dict[str, Any]] = {
    "imagegpt": {
        "input_key": "input_ids",
        "layers_key": "n_layer",
        "final_norm": "ln_f",
        "final_norm_in_last_state": True,
        "embeddings": "embeddings (token + position), before block 1",
    },
    "vit": {
        "input_key": "pixel_values",
        "layers_key": "num_hidden_layers",
        "final_norm": "layernorm",
        "final_norm_in_last_state": False,
        "embeddings": "embeddings (CLS + patch + position), before block 1",
    },
    "dinov2": {
        "input_key": "pixel_values",
        "layers_key": "num_hidden_layers",
        "final_norm": "layernorm",
        "final_norm_in_last_state": False,
        "embeddings": "embeddings (CLS + patch + position), before block 1",
    },
    "clip_vision_model": {
        "input_key": "pixel_values",
        "layers_key": "num_hidden_layers",
        "final_norm": "post_layernorm",
        "final_norm_in_last_state": False,
        "embeddings": "embeddings (CLS + patch + position) after pre_layrnorm, before block 1",
    },
    PIXELS: {
        "input_key": "pixels",
        "layers_key": None,
        "final_norm": None,
        "final_norm_in_last_state": False,
        "embeddings": "raw pixel values scaled to [0, 1], flattened (H*W*3)",
    },
}

_hash_cache: dict[tuple[str, float, int], str] = {}
_hash_lock = threading.Lock()


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: what to load and which exact weights it means."""

    ref: str
    family: str
    source: str  # "store", "local", "hub" or "builtin"
    location: str  # a directory or a hub id
    revision: str
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    processor: dict[str, Any] = field(default_factory=dict, repr=False)
    training: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_hidden_states(self) -> int:
        """Number of entries of ``hidden_states``: embeddings plus one per block."""
        if self.family == PIXELS:
            return 1
        config = self.vision_config
        layers_key = FAMILIES[self.family]["layers_key"]
        n_layers = config.get(layers_key)
        if n_layers is None:
            n_layers = config.get("n_layer", config.get("num_hidden_layers"))
        if n_layers is None:
            raise ModelError(
                f"the config of model {self.ref!r} is missing {layers_key!r}, the number of "
                "transformer blocks; add it to the model's config.json",
                field="model",
                value=self.ref,
            )
        return int(n_layers) + 1

    @property
    def dim(self) -> int:
        config = self.vision_config
        return int(config.get("n_embd", config.get("hidden_size", 0)))

    @property
    def vision_config(self) -> dict[str, Any]:
        if self.config.get("model_type") == "clip":
            return dict(self.config.get("vision_config", {}))
        return self.config

    @property
    def default_input_policy(self) -> str:
        return str(self.training.get("input_policy", "plain"))

    @property
    def n_tokens(self) -> int | None:
        """Sequence length of one image's hidden states, or None for the raw-pixel baseline.

        ImageGPT has one token per pixel of the processor's size. Patch encoders have one CLS
        token plus one per patch of the processed image: the crop size when the processor
        crops, else its resize target.
        """
        if self.family == PIXELS:
            return None
        if self.family == "imagegpt":
            size = self.processor.get("size", {"height": 32, "width": 32})
            return int(size["height"]) * int(size["width"])
        config = self.vision_config
        default = int(config.get("image_size", 224))
        size = self.processor.get("size") or {}
        if self.processor.get("do_center_crop") and self.processor.get("crop_size"):
            size = self.processor["crop_size"]
        if isinstance(size, int):
            height = width = size
        elif "height" in size:
            height, width = int(size["height"]), int(size["width"])
        else:
            # NOTE: a shortest_edge resize without a crop keeps the aspect ratio, so this count
            # holds for square images only; extraction rejects a batch whose length differs.
            height = width = int(size.get("shortest_edge", default))
        patch = int(config.get("patch_size", 16))
        return (height // patch) * (width // patch) + 1

    def layer_map(self, layers: Sequence[int], pooling: str) -> list[dict[str, Any]]:
        """Describe what each stored hidden-state index means for this model."""
        last = self.n_hidden_states - 1
        family = FAMILIES.get(self.family, FAMILIES[PIXELS])
        norm = family["final_norm"]
        rows = []
        for layer in layers:
            if self.family == PIXELS or layer == 0:
                text = family["embeddings"]
            elif layer == last and family["final_norm_in_last_state"]:
                text = f"output of block {layer} after the final layer norm ({norm})"
            elif layer == last:
                text = f"output of block {layer}, before the final layer norm ({norm})"
            else:
                text = f"output of block {layer}"
            norm_inside = layer == last and family["final_norm_in_last_state"]
            if pooling == "mean_ln_f" and norm is not None and not norm_inside:
                text += f", final layer norm ({norm}) applied to every token before pooling"
            rows.append({"layer": int(layer), "description": text})
        return rows

    def check_layers(self, layers: Sequence[int] | str) -> list[int]:
        """Return the explicit layer list for ``layers`` ("all" or indices), validated."""
        last = self.n_hidden_states - 1
        if layers == "all":
            return list(range(last + 1))
        if isinstance(layers, str) or not layers:
            raise ModelError(
                f'layers {layers!r} is invalid; pass "all" or a non-empty list of indices '
                f"0..{last}",
                field="layers",
                value=layers,
            )
        checked: list[int] = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= last:
                raise ModelError(
                    f"layer {layer!r} is out of range for {self.ref} (0..{last}); pass a value "
                    'in that range or "all"',
                    field="layers",
                    value=layer,
                )
            if layer not in checked:
                checked.append(layer)
        return sorted(checked)


def resolve_model(
    ref: str,
    *,
    models_dir: Path | None,
    allowed_roots: Sequence[Path] | None = None,
    allow_hub: bool = True,
    allow_list: Sequence[str] | None = None,
) -> ModelRef:
    """Resolve ``ref`` to a `ModelRef`, raising `ModelError` that lists everything tried.

    Parameters
    ----------
    models_dir
        The store's directory of pretrained checkpoints (for ``store:<name>``).
    allowed_roots
        Directories local checkpoints may be read from; None allows any local path.
    allow_list
        If given, only these references (and ``pixels``) are accepted.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ModelError(
            "model is empty; pass a hub id, a local directory, store:<name> or pixels",
            field="model",
            value=ref,
        )
    ref = ref.strip()
    if has_control_characters(ref):
        raise ModelError(
            f"model {ref!r} contains control characters or a lone surrogate; pass a hub id, "
            "a local directory, store:<name> or pixels",
            field="model",
            value=ref,
        )
    looks_like_path = ref.startswith(("/", ".", "~")) or os.sep in ref and Path(ref).exists()
    if looks_like_path:
        # One spelling per directory, so that one checkpoint gives one feature-set id.
        ref = _path_spelling(ref)
    if allow_list is not None and ref != PIXELS and ref not in _allowed_spellings(allow_list):
        raise ModelError(
            f"model {ref!r} is not in the allow-list of this service; allowed: "
            f"{', '.join(sorted(allow_list))}",
            field="model",
            value=ref,
        )
    if ref == PIXELS:
        return ModelRef(ref, PIXELS, "builtin", PIXELS, "pixels-v1")

    if ref.startswith("store:"):
        name = ref.removeprefix("store:")
        if models_dir is None or not name or "/" in name or ".." in name:
            raise ModelError(
                f"model {ref!r} is not a valid store model name", field="model", value=ref
            )
        name, _, step = name.partition("@step")
        if step:
            if step.isdigit():
                # One spelling per checkpoint, so that @step020 and @step20 give one
                # feature-set id.
                step = str(int(step))
                ref = f"store:{name}@step{step}"
            return _resolve_checkpoint(ref, models_dir / name, step)
        path = models_dir / name
        if not (path / "config.json").is_file():
            available = (
                sorted(p.name for p in models_dir.iterdir() if p.is_dir())
                if (models_dir.is_dir())
                else []
            )
            raise ModelError(
                f"model {ref!r} not found in the store's models ({', '.join(available) or 'none'}"
                "); pretrain it with POST /v1/pretrain first, or resume its pretraining job if "
                "it was canceled or failed (GET /v1/jobs lists them)",
                field="model",
                value=ref,
            )
        return _resolve_directory(ref, path, source="store")

    tried: list[str] = []
    if looks_like_path:
        path = Path(ref).expanduser()
        if allowed_roots is not None and not path.is_absolute():
            # It would be resolved against the API's working directory, which a client cannot
            # know and which the error messages would then reveal.
            hint = absolute_path_hint("model", allowed_roots, "LAYERBANK_MODEL_ROOTS")
            raise PathNotAllowedError(
                f"model path {ref!r} is relative; {hint}",
                field="model",
                value=ref,
            )
        resolved = path.resolve()
        if allowed_roots is not None and not any(
            resolved == root.resolve() or root.resolve() in resolved.parents
            for root in allowed_roots
        ):
            fix = (
                f"outside the allowed model roots ({', '.join(str(r) for r in allowed_roots)}); "
                "copy the checkpoint under one of them"
                if allowed_roots
                else "not readable: this service reads no local models (LAYERBANK_MODEL_ROOTS is "
                "empty); set LAYERBANK_MODEL_ROOTS to a folder that contains it"
            )
            raise PathNotAllowedError(
                f"model path {ref!r} is {fix}",
                field="model",
                value=ref,
            )
        if not path.is_dir() and resolved.is_dir():
            # Path.resolve() removes "missing/.." as text, while the system's lookup fails.
            tried.append(
                f"local path {ref!r}: no such directory (a folder in it is missing); write it "
                f"as {str(resolved)!r}"
            )
        elif (resolved / "config.json").is_file():
            return _resolve_directory(ref, resolved, source="local")
        else:
            tried.append(f"local path {ref!r}: no config.json there")
    else:
        tried.append(f"local path {ref!r}: no such directory")

    if not allow_hub:
        tried.append("hub: disabled on this service")
    elif ref.startswith(("/", ".", "~")) or ref.count("/") > 1:
        tried.append(f"hub: {ref!r} is not a hub id (<org>/<name>)")
    else:
        try:
            return _resolve_hub(ref)
        except ModelError as exc:
            tried.append(exc.message)
    tried.append(_describe_store_candidate(ref, models_dir))
    raise ModelError(
        f"model {ref!r} could not be resolved; tried: {'; '.join(tried) or 'nothing matched'}. "
        "Pass a hub id reachable from the workers, a local checkpoint directory, "
        "store:<name> or pixels",
        field="model",
        value=ref,
    )


def _describe_store_candidate(ref: str, models_dir: Path | None) -> str:
    """Say whether the last part of ``ref`` names a checkpoint in the store's models."""
    name = ref.rstrip("/").rsplit("/", 1)[-1]
    if models_dir is None or not models_dir.is_dir():
        return "store: this service's store has no models directory"
    try:
        exists = bool(name) and (models_dir / name / "config.json").is_file()
    except (OSError, ValueError):  # a name too long or invalid for the file system
        exists = False
    if exists:
        return f"store: store:{name} exists, pass that reference to use it"
    available = sorted(p.name for p in models_dir.iterdir() if p.is_dir())
    return f"store: no store:{name} among the store's models ({', '.join(available) or 'none'})"


def _resolve_checkpoint(ref: str, model_dir: Path, step: str) -> ModelRef:
    """Resolve ``store:<name>@step<N>``: a checkpoint saved during pretraining."""
    checkpoints = model_dir / "checkpoints"
    available = (
        sorted(
            (
                p.name.removeprefix("step-")
                for p in checkpoints.iterdir()
                if p.name.startswith("step-")
            ),
            key=int,
        )
        if checkpoints.is_dir()
        else []
    )
    path = checkpoints / f"step-{int(step)}" if step.isdigit() else None
    if path is None or not (path / "config.json").is_file():
        if available:
            fix = (
                f"has checkpoints at steps {', '.join(available)}; use one of them, such as "
                f"store:{model_dir.name}@step{available[-1]}"
            )
        else:
            fix = "saved no step checkpoints; pretrain again with checkpoint_every to save some"
        last = _last_step(model_dir)
        if last is not None:
            fix += f"; the weights of its last step, {last}, are store:{model_dir.name}"
        raise ModelError(
            f"model {ref!r} not found: {model_dir.name!r} {fix}", field="model", value=ref
        )
    return _resolve_directory(ref, path, source="store")


def _last_step(model_dir: Path) -> int | None:
    """Return the last step of the finished pretraining run in ``model_dir``, if any."""
    try:
        record = json.loads((model_dir / "layerbank.json").read_text())
        return int(record["params"]["steps"]) if "final_val_loss" in record else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _path_spelling(ref: str) -> str:
    """Return a local model path written one way.

    A relative path keeps a leading ``./``, because without it the path would read as a hub id.
    """
    if not ref.startswith(("/", ".", "~")) and os.sep in ref:
        return canonical_path(ref)
    spelled = canonical_path(ref)
    return spelled if spelled.startswith(("/", ".", "~")) else f"./{spelled}"


def _allowed_spellings(allow_list: Sequence[str]) -> set[str]:
    """Return the allow-list with each local path written as `_path_spelling` writes it."""
    return {
        _path_spelling(item) if item.startswith(("/", ".", "~")) else item for item in allow_list
    }


def _resolve_directory(ref: str, path: Path, *, source: str) -> ModelRef:
    config = _read_json(path / "config.json", ref)
    processor_path = path / "preprocessor_config.json"
    processor = _read_json(processor_path, ref) if processor_path.is_file() else {}
    training_path = path / "layerbank.json"
    training = _read_json(training_path, ref) if training_path.is_file() else {}
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(
            f"model {ref!r} has no weights ({' or '.join(WEIGHT_FILES)}) in its directory",
            field="model",
            value=ref,
        )
    family = _family(config, ref)
    return ModelRef(
        ref, family, source, str(path), _hash_directory(path), config, processor, training
    )


def _resolve_hub(ref: str) -> ModelRef:
    try:
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise ModelError("hub: huggingface_hub is not installed", field="model", value=ref) from exc

    try:
        validate_repo_id(ref)
    except HFValidationError as exc:
        raise ModelError(f"hub id {ref!r} is invalid ({exc})", field="model", value=ref) from exc

    try:
        revision = HfApi().model_info(ref).sha or "main"
    except Exception as exc:
        # The hub client raises HTTP, DNS and connection errors of several libraries; any of
        # them means the hub is not usable now. Offline machines can still use the hub cache.
        logger.warning("hub lookup of %r failed: %s: %s", ref, type(exc).__name__, exc)
        cached_revision = _cached_revision(ref)
        if cached_revision is None:
            raise ModelError(
                f"hub id {ref!r}: not reachable and not in the local hub cache "
                f"({type(exc).__name__})",
                field="model",
                value=ref,
            ) from exc
        revision = cached_revision
    try:
        config = _read_json(Path(hf_hub_download(ref, "config.json", revision=revision)), ref)
        try:
            processor_file = hf_hub_download(ref, "preprocessor_config.json", revision=revision)
            processor = _read_json(Path(processor_file), ref)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError):
            processor = {}
    except Exception as exc:
        logger.warning("hub download of %r config failed: %s: %s", ref, type(exc).__name__, exc)
        raise ModelError(
            f"hub id {ref!r}: config.json could not be read ({type(exc).__name__})",
            field="model",
            value=ref,
        ) from exc
    return ModelRef(ref, _family(config, ref), "hub", ref, revision, config, processor)


def _cached_revision(ref: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "config.json")
    if isinstance(cached, str):
        # .../snapshots/<commit>/config.json
        return Path(cached).parent.name
    return None


def _family(config: dict[str, Any], ref: str) -> str:
    model_type = str(config.get("model_type", ""))
    if model_type == "clip":
        model_type = "clip_vision_model"
    if model_type not in FAMILIES or model_type == PIXELS:
        supported = ", ".join(f for f in FAMILIES if f != PIXELS)
        raise ModelError(
            f"model {ref!r} has model_type {model_type!r}, which has no adapter here; "
            f"supported: {supported}",
            field="model",
            value=ref,
        )
    return model_type


def _read_json(path: Path, ref: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model {ref!r}: {path.name} is unreadable ({exc})", field="model", value=ref
        ) from exc
    if not isinstance(data, dict):
        raise ModelError(
            f"model {ref!r}: {path.name} is not a JSON object", field="model", value=ref
        )
    return data


def _hash_directory(path: Path) -> str:
    """Return a sha256 over the config, processor config and weight files of a checkpoint."""
    digest = hashlib.sha256()
    for name in HASHED_FILES:
        file = path / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(_hash_file(file).encode())
    return "sha256:" + digest.hexdigest()


def _hash_file(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_mtime, stat.st_size)
    with _hash_lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _hash_lock:
        _hash_cache[key] = value
    return value


POOLINGS = ("mean", "cls", "last_token", "mean_ln_f")


def check_pooling(ref: ModelRef, pooling: str) -> str:
    """Return ``pooling`` if the model's family supports it, else raise `ModelError`."""
    supported = {
        "imagegpt": ("mean", "last_token", "mean_ln_f"),
        PIXELS: ("mean",),
    }.get(ref.family, ("mean", "cls", "last_token", "mean_ln_f"))
    if pooling not in supported:
        raise ModelError(
            f"pooling {pooling!r} is not available for {ref.family} models; choose one of "
            f"{', '.join(supported)}",
            field="pooling",
            value=pooling,
        )
    return pooling


def processor_spec(ref: ModelRef, input_policy: str | None) -> dict[str, Any]:
    """Return the processor settings that determine the model's inputs, for the feature-set id."""
    if ref.family != "imagegpt" and input_policy is not None:
        raise ModelError(
            f"input_policy applies to ImageGPT models only, not {ref.family}; remove it",
            field="input_policy",
            value=input_policy,
        )
    if ref.family == PIXELS:
        return {"scale": "x/255"}
    if ref.family == "imagegpt":
        policy = input_policy or ref.default_input_policy
        if policy not in INPUT_POLICIES:
            raise ModelError(
                f'input_policy {policy!r} is invalid; choose "sos" (prepend the start token and '
                'drop the last pixel, as iGPT was trained) or "plain" (no start token)',
                field="input_policy",
                value=policy,
            )
        clusters = ref.processor.get("clusters")
        if not clusters:
            raise ModelError(
                f"model {ref.ref!r} has no colour palette (clusters) in its "
                "preprocessor_config.json",
                field="model",
                value=ref.ref,
            )
        size = ref.processor.get("size", {"height": 32, "width": 32})
        return {
            "palette_sha256": hashlib.sha256(json.dumps(clusters).encode()).hexdigest(),
            "n_colors": len(clusters),
            "size": [int(size["height"]), int(size["width"])],
            "input_policy": policy,
        }
    if not ref.processor:
        raise ModelError(
            f"model {ref.ref!r} has no image processor settings (preprocessor_config.json is "
            "missing or empty), so its image size and normalisation are unknown; save the "
            "image processor beside the weights with "
            "AutoImageProcessor.from_pretrained(...).save_pretrained(<model dir>)",
            field="model",
            value=ref.ref,
        )
    keep = {k: v for k, v in ref.processor.items() if not k.startswith("_")}
    return {
        "processor_sha256": hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()
    }
