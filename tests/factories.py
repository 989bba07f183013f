"""Factories for tiny real models and the stack's processes, shared by the tests."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pytest

    from store import FeatureSet, Store


def tiny_imagegpt(
    path: Path,
    *,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    n_colors: int = 16,
    size: int = 8,
    seed: int = 0,
    input_policy: str | None = None,
) -> Path:
    """Save a randomly initialised ImageGPT with a palette fitted on digits pixels to ``path``."""
    import torch
    from transformers import ImageGPTConfig, ImageGPTImageProcessor, ImageGPTModel

    from workers.datasets import load_split
    from workers.pretrain import fit_palette

    torch.manual_seed(seed)
    config = ImageGPTConfig(
        vocab_size=n_colors + 1,
        n_positions=size * size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
    )
    model = ImageGPTModel(config).eval()
    palette = fit_palette(load_split("digits", "train").images, n_colors, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    ImageGPTImageProcessor(
        clusters=palette.tolist(), do_resize=True, size={"height": size, "width": size}
    ).save_pretrained(path)
    if input_policy is not None:
        import json

        (path / "layerbank.json").write_text(json.dumps({"input_policy": input_policy}))
    return path


def reference_pooled(path: Path, images: np.ndarray, *, policy: str = "plain") -> np.ndarray:
    """Pool Hugging Face's own ``output_hidden_states`` of the checkpoint at ``path``.

    Returns an array of shape (n_hidden_states, n_images, dim): the mean over positions of each
    hidden state, computed with the processor's NumPy quantisation and the eager model.
    """
    import torch
    from transformers import ImageGPTImageProcessor, ImageGPTModel

    processor = ImageGPTImageProcessor.from_pretrained(path)
    model = ImageGPTModel.from_pretrained(path, attn_implementation="eager").eval()
    input_ids = processor(images=list(images), return_tensors="pt")["input_ids"]
    if policy == "sos":
        sos = torch.full((len(images), 1), len(processor.clusters), dtype=input_ids.dtype)
        input_ids = torch.cat([sos, input_ids[:, :-1]], dim=1)
    with torch.no_grad():
        states = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    return np.stack([state.mean(dim=1).numpy() for state in states])


def pending_featureset(
    root: Path,
    *,
    n_items: int,
    dim: int,
    layers: tuple[int, ...] = (0,),
    dtype: str = "float32",
    fingerprint: str = "0" * 16,
    **options: object,
) -> FeatureSet:
    """Create a feature set of ``n_items`` two-class items in the store at ``root``, with no
    block written yet. ``options`` go to `create_featureset` (block_rows, max_blocks)."""
    from store import FeatureSetSpec, Store, create_featureset

    spec = FeatureSetSpec(
        model="tiny-vit",
        model_revision="rev-1",
        model_family="vit",
        dataset="digits",
        dataset_fingerprint=fingerprint,
        split="test",
        layers=list(layers),
        pooling="mean",
        dtype=dtype,  # type: ignore[arg-type]
    )
    featureset: FeatureSet = create_featureset(
        Store(root),
        spec,
        layer_map=[{"layer": i, "description": f"h{i}"} for i in layers],
        dim=dim,
        labels=np.arange(n_items) % 2,
        item_ids=np.arange(n_items),
        class_names=["a", "b"],
        **options,  # type: ignore[arg-type]
    )
    return featureset


class MetadataWrites:
    """Records the attribute keys of every write of one group's zarr.json."""

    def __init__(self, store: Store, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.key = key
        self.attribute_keys: list[set[str]] = []
        original = store.zarr_store.set

        async def recording_set(key: str, value: Any) -> None:
            if key == self.key:
                document = json.loads(value.to_bytes())
                self.attribute_keys.append(set(document.get("attributes", {})))
            await original(key, value)

        monkeypatch.setattr(store.zarr_store, "set", recording_set)


def one_error_line(args: list[str], env: dict[str, str]) -> str:
    """Run ``python *args`` in the repository root and return its one stderr line, asserting
    that the command failed with exit code 1 and wrote exactly one line to stderr."""
    result = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@contextlib.contextmanager
def local_http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free 127.0.0.1 port in a thread and yield the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
