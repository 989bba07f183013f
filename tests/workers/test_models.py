"""Family adapters against each model's own ``output_hidden_states``, on tiny local checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from store import FeatureSetSpec, Store, create_featureset
from store.settings import Settings
from tests.factories import reference_pooled, tiny_imagegpt
from workers.errors import ModelError
from workers.modelref import ModelRef, processor_spec, resolve_model

POOLINGS = ("mean", "cls", "last_token", "mean_ln_f")
HIDDEN, LAYERS, IMAGE, PATCH = 32, 2, 16, 8


def _vit(path: Path) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)


def _dinov2(path: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessor(
        size={"shortest_edge": IMAGE},
        crop_size={"height": IMAGE, "width": IMAGE},
        do_center_crop=True,
    ).save_pretrained(path)


def _clip_vision_kwargs() -> dict[str, int]:
    return {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": IMAGE,
        "patch_size": PATCH,
    }


def _clip_processor(path: Path) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    ).save_pretrained(path)


def _clip_vision(path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**_clip_vision_kwargs())).save_pretrained(path)
    _clip_processor(path)


def _clip_full(path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        vision_config=_clip_vision_kwargs(),
        text_config={
            "hidden_size": HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 64,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    _clip_processor(path)


# name: (builder, family, final layer norm module of the reference model)
FAMILY_CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "vit": (_vit, "vit", "layernorm"),
    "dinov2": (_dinov2, "dinov2", "layernorm"),
    "clip_vision": (_clip_vision, "clip_vision_model", "post_layernorm"),
    "clip_full": (_clip_full, "clip_vision_model", "post_layernorm"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny seeded checkpoint with its image processor per non-ImageGPT case."""
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for name, (build, _, _) in FAMILY_CASES.items():
        torch.manual_seed(0)
        paths[name] = root / name
        build(paths[name])
    return paths


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Array of shape (5, IMAGE, IMAGE, 3) uint8, seeded."""
    return np.random.default_rng(0).integers(0, 256, (5, IMAGE, IMAGE, 3), dtype=np.uint8)


def _reference_states(path: Path, images: np.ndarray) -> tuple[list[torch.Tensor], Any]:
    """Return the model's own hidden states and the model, without the adapter."""
    from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel

    model_type = json.loads((path / "config.json").read_text())["model_type"]
    cls = CLIPVisionModel if model_type.startswith("clip") else AutoModel
    model = cls.from_pretrained(path).eval()
    pixel_values = AutoImageProcessor.from_pretrained(path)(
        images=list(images), return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        states = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    return list(states), model


def _reference_pool(state: torch.Tensor, pooling: str, norm: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        if pooling == "cls":
            return state[:, 0].numpy()
        if pooling == "last_token":
            return state[:, -1].numpy()
        if pooling == "mean_ln_f":
            return norm(state).mean(dim=1).numpy()
        return state.mean(dim=1).numpy()


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_adapter_pooled_matches_hidden_states(
    case: str, checkpoints: dict[str, Path], images: np.ndarray
) -> None:
    from workers.models import load_model

    _, family, norm_name = FAMILY_CASES[case]
    ref = resolve_model(str(checkpoints[case]), models_dir=None, allow_hub=False)
    assert ref.family == family
    assert ref.n_hidden_states == LAYERS + 1
    assert ref.dim == HIDDEN
    assert ref.n_tokens == (IMAGE // PATCH) ** 2 + 1

    model = load_model(ref)
    states, reference_model = _reference_states(checkpoints[case], images)
    assert len(states) == ref.n_hidden_states
    norm = getattr(reference_model, norm_name)
    layers = list(range(ref.n_hidden_states))
    for pooling in POOLINGS:
        pooled = model.pooled(images, layers, pooling).numpy()
        assert pooled.shape == (len(layers), len(images), HIDDEN), pooling
        for layer in layers:
            expected = _reference_pool(states[layer], pooling, norm)
            np.testing.assert_allclose(
                pooled[layer],
                expected,
                rtol=1e-5,
                atol=1e-5,
                err_msg=f"{case} {pooling} layer {layer}",
            )


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_adapter_token_states_match_hidden_states(
    case: str, checkpoints: dict[str, Path], images: np.ndarray
) -> None:
    from workers.models import load_model

    ref = resolve_model(str(checkpoints[case]), models_dir=None, allow_hub=False)
    pooled, tokens = load_model(ref).features(images, [0, 2], "mean", [2])
    states, _ = _reference_states(checkpoints[case], images)
    assert pooled.shape == (2, len(images), HIDDEN)
    assert tokens is not None
    assert tokens.shape == (1, len(images), ref.n_tokens, HIDDEN)
    np.testing.assert_allclose(tokens[0].numpy(), states[2].numpy(), rtol=1e-5, atol=1e-5)


def test_last_hidden_state_excludes_final_norm(
    checkpoints: dict[str, Path], images: np.ndarray
) -> None:
    # The families' FAMILIES entries say the final norm is outside hidden_states: check that
    # the model's last_hidden_state differs from hidden_states[-1] (ViT, DINOv2) and that
    # CLIP's post_layernorm only reaches the pooled CLS output.
    from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel

    for case in ("vit", "dinov2", "clip_vision"):
        path = checkpoints[case]
        cls = CLIPVisionModel if case.startswith("clip") else AutoModel
        model = cls.from_pretrained(path).eval()
        pixel_values = AutoImageProcessor.from_pretrained(path)(
            images=list(images), return_tensors="pt"
        )["pixel_values"]
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values, output_hidden_states=True)
        last = outputs.hidden_states[-1]
        if case.startswith("clip"):
            assert torch.equal(outputs.last_hidden_state, last), case
            pooled = model.post_layernorm(last[:, 0])
            assert torch.allclose(outputs.pooler_output, pooled), case
        else:
            assert not torch.allclose(outputs.last_hidden_state, last), case


def test_layer_map_describes_each_family(checkpoints: dict[str, Path]) -> None:
    vit = resolve_model(str(checkpoints["vit"]), models_dir=None, allow_hub=False)
    rows = vit.layer_map([0, 1, 2], "mean")
    assert rows[0]["description"] == "embeddings (CLS + patch + position), before block 1"
    assert rows[1]["description"] == "output of block 1"
    assert rows[2]["description"] == "output of block 2, before the final layer norm (layernorm)"

    clip = resolve_model(str(checkpoints["clip_full"]), models_dir=None, allow_hub=False)
    rows = clip.layer_map([0, 2], "mean_ln_f")
    assert "after pre_layrnorm" in rows[0]["description"]
    assert rows[1]["description"].endswith(
        "final layer norm (post_layernorm) applied to every token before pooling"
    )


def test_layer_map_imagegpt_last_layer(igpt_paths: dict[str, Path]) -> None:
    ref = resolve_model(str(igpt_paths["small"]), models_dir=None, allow_hub=False)
    rows = ref.layer_map([0, 1, 2], "mean_ln_f")
    assert rows[0]["description"].startswith("embeddings (token + position), before block 1")
    assert rows[1]["description"].endswith(
        "final layer norm (ln_f) applied to every token before pooling"
    )
    assert rows[2]["description"] == "output of block 2 after the final layer norm (ln_f)"


# -- ImageGPT ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def igpt_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two checkpoints sharing one palette (different depth) and one with another palette."""
    root = tmp_path_factory.mktemp("igpt")
    return {
        "small": tiny_imagegpt(root / "small", n_layer=2, seed=0),
        "deeper": tiny_imagegpt(root / "deeper", n_layer=3, seed=0),
        "other_palette": tiny_imagegpt(root / "other", n_layer=2, n_colors=8, seed=0),
    }


def _digits_images(n: int) -> np.ndarray:
    from workers.datasets import load_split

    return load_split("digits", "test").images[:n]


@pytest.mark.parametrize("policy", ["plain", "sos"])
def test_imagegpt_pooled_matches_reference(policy: str, igpt_paths: dict[str, Path]) -> None:
    from workers.models import load_model

    path = igpt_paths["small"]
    ref = resolve_model(str(path), models_dir=None, allow_hub=False)
    images = _digits_images(6)
    pooled = load_model(ref, input_policy=policy).pooled(images, [0, 1, 2], "mean").numpy()
    expected = reference_pooled(path, images, policy=policy)
    np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-5)


def test_imagegpt_policies_differ(igpt_paths: dict[str, Path]) -> None:
    from workers.models import load_model

    ref = resolve_model(str(igpt_paths["small"]), models_dir=None, allow_hub=False)
    images = _digits_images(4)
    sos = load_model(ref, input_policy="sos").pooled(images, [2], "mean")
    plain = load_model(ref, input_policy="plain").pooled(images, [2], "mean")
    assert not torch.allclose(sos, plain)


def test_imagegpt_cpu_bf16_close_to_float32(igpt_paths: dict[str, Path]) -> None:
    """With ``cpu_bf16`` the CPU forward pass runs under bfloat16 autocast, as on CUDA."""
    from workers.models import load_model

    ref = resolve_model(str(igpt_paths["small"]), models_dir=None, allow_hub=False)
    images = _digits_images(6)
    exact = load_model(ref, device="cpu").pooled(images, [0, 1, 2], "mean")
    bf16 = load_model(ref, device="cpu", cpu_bf16=True).pooled(images, [0, 1, 2], "mean")

    assert bf16.dtype == torch.float32
    # Layer 0 is the embedding sum, before any matmul: the same in both.
    torch.testing.assert_close(bf16[0], exact[0])
    assert not torch.equal(bf16[1:], exact[1:])
    # bfloat16 keeps 8 bits of mantissa: about 2 significant digits per product.
    torch.testing.assert_close(bf16, exact, rtol=0.05, atol=0.05)


def test_imagegpt_palette_512_clusters(tmp_path: Path) -> None:
    from transformers import ImageGPTConfig, ImageGPTImageProcessor, ImageGPTModel

    from workers.models import load_model

    torch.manual_seed(0)
    palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).round(6)
    config = ImageGPTConfig(vocab_size=513, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    ImageGPTModel(config).save_pretrained(tmp_path)
    ImageGPTImageProcessor(
        clusters=palette.tolist(), size={"height": 8, "width": 8}
    ).save_pretrained(tmp_path)

    ref = resolve_model(str(tmp_path), models_dir=None, allow_hub=False)
    assert processor_spec(ref, "sos")["n_colors"] == 512
    model = load_model(ref, input_policy="sos")
    assert model.sos_token == 512
    assert tuple(model.palette.shape) == (512, 3)
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    pooled = model.pooled(images, [0, 1], "mean").numpy()
    np.testing.assert_allclose(
        pooled, reference_pooled(tmp_path, images, policy="sos"), rtol=1e-4, atol=1e-5
    )


def _spec(ref: ModelRef, split: Any, **options: Any) -> FeatureSetSpec:
    values: dict[str, Any] = {
        "layers": ref.check_layers("all"),
        "pooling": "mean",
        "input_policy": None,
        "token_layers": [],
    }
    values.update(options)
    return FeatureSetSpec(
        model=ref.ref,
        model_revision=ref.revision,
        model_family=ref.family,
        processor=processor_spec(ref, values["input_policy"]),
        dataset="digits",
        dataset_fingerprint=split.fingerprint,
        split="test",
        limit=split_limit(split),
        seed=0,
        layers=values["layers"],
        pooling=values["pooling"],
        token_layers=values["token_layers"],
    )


def split_limit(split: Any) -> int:
    return len(split.labels)


def test_featureset_id_differs_by_policy_and_pooling(igpt_paths: dict[str, Path]) -> None:
    from workers.datasets import load_split

    ref = resolve_model(str(igpt_paths["small"]), models_dir=None, allow_hub=False)
    split = load_split("digits", "test", limit=20, seed=0)
    base = _spec(ref, split, input_policy="plain").featureset_id()
    assert _spec(ref, split, input_policy="sos").featureset_id() != base
    ids = {
        _spec(ref, split, input_policy="plain", pooling=p).featureset_id()
        for p in ("mean", "last_token", "mean_ln_f")
    }
    assert len(ids) == 3
    assert _spec(ref, split, input_policy="plain", token_layers=[1]).featureset_id() != base


@pytest.fixture()
def extraction(tmp_path: Path) -> Callable[..., Any]:
    """Create a feature set in a fresh store and extract its only block in this process."""
    from workers.datasets import load_split
    from workers.extract import extract_block

    store = Store(tmp_path / "store")

    def run(path: Path, *, cpu_bf16: bool = False, **options: Any) -> Any:
        settings = Settings(
            store=str(tmp_path / "store"),
            device="cpu",
            allow_hub=False,
            model_roots=[path.parent],
            cpu_bf16=cpu_bf16,
        )
        ref = resolve_model(str(path), models_dir=None, allow_hub=False)
        split = load_split("digits", "test", limit=20, seed=0)
        spec = _spec(ref, split, **options)
        featureset = create_featureset(
            store,
            spec,
            layer_map=ref.layer_map(spec.layers, spec.pooling),
            dim=ref.dim,
            labels=split.labels,
            item_ids=split.item_ids,
            class_names=split.class_names,
            n_tokens=ref.n_tokens if spec.token_layers else None,
        )
        extract_block(store, featureset.id, 0, settings=settings)
        return store.featureset(featureset.id)

    run.store = store  # type: ignore[attr-defined]
    return run


def test_token_cache_shared_by_one_palette(
    extraction: Callable[..., Any], igpt_paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.imagegpt
    from workers.tokens import list_token_caches

    calls = []
    quantize = workers.imagegpt.quantize

    def counting(images: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return quantize(images, palette)

    monkeypatch.setattr(workers.imagegpt, "quantize", counting)
    extraction(igpt_paths["small"])
    after_first = len(calls)
    extraction(igpt_paths["deeper"])
    caches = list_token_caches(extraction.store)  # type: ignore[attr-defined]
    extraction(igpt_paths["other_palette"])

    assert after_first == 1
    assert len(calls) == 2
    assert len(caches) == 1
    assert caches[0]["n_items"] == 20
    assert len(list_token_caches(extraction.store)) == 2  # type: ignore[attr-defined]


def test_token_cache_extraction_matches_reference(
    extraction: Callable[..., Any], igpt_paths: dict[str, Path]
) -> None:
    from workers.datasets import load_split

    path = igpt_paths["small"]
    first = extraction(path, input_policy="sos")
    # The second extraction reads the palette tokens from the cache the first one wrote.
    second = extraction(path, input_policy="plain", token_layers=[2])
    images = load_split("digits", "test", limit=20, seed=0).images

    for featureset, policy in ((first, "sos"), (second, "plain")):
        expected = reference_pooled(path, images, policy=policy)
        np.testing.assert_allclose(
            np.asarray(featureset.features[:]), expected, rtol=1e-4, atol=1e-5, err_msg=policy
        )
    assert second.token_features is not None
    assert second.token_features.shape == (1, 20, 64, 32)
    np.testing.assert_allclose(
        np.asarray(second.token_features[0]).mean(axis=1),
        reference_pooled(path, images, policy="plain")[2],
        rtol=1e-4,
        atol=1e-5,
    )


def test_extraction_uses_cpu_bf16_setting(
    extraction: Callable[..., Any], igpt_paths: dict[str, Path]
) -> None:
    from workers.datasets import load_split

    path = igpt_paths["small"]
    featureset = extraction(path, cpu_bf16=True, input_policy="plain")
    images = load_split("digits", "test", limit=20, seed=0).images
    features = np.asarray(featureset.features[:]).astype(np.float32)
    expected = reference_pooled(path, images, policy="plain")

    assert not np.allclose(features[1:], expected[1:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features, expected, rtol=0.05, atol=0.05)


def test_resolve_unknown_model_lists_tried(tmp_path: Path) -> None:
    (tmp_path / "tiny-one").mkdir()
    with pytest.raises(ModelError) as caught:
        resolve_model("openai/imagegpt-smal", models_dir=tmp_path, allow_hub=True)
    message = caught.value.message
    assert "'openai/imagegpt-smal'" in message
    assert "local path 'openai/imagegpt-smal': no such directory" in message
    assert "hub id 'openai/imagegpt-smal'" in message
    assert "store: no store:imagegpt-smal among the store's models (tiny-one)" in message


def test_resolve_missing_local_path_lists_tried(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as caught:
        resolve_model(str(tmp_path / "nothing"), models_dir=None, allow_hub=True)
    message = caught.value.message
    assert "no config.json there" in message
    assert "is not a hub id" in message
    assert "store: this service's store has no models directory" in message
