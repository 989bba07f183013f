"""Tests of the ImageGPT extraction kernel against Hugging Face's own model and processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTModel
from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil

from workers.imagegpt import (
    LAYER_POOLINGS,
    build_input_ids,
    pooled_hidden_states,
    quantize,
)

N_LAYER = 3
VOCAB = 17
SEQ = 64

# Weights far larger than Hugging Face's default init (std 0.02), so attention is far from
# uniform and a wrong scale or mask moves the pooled states well beyond the 1e-5 tolerance.
WEIGHT_STD = 0.3

CONFIGS = {
    "default": {},
    "inverse_layer_scale": {"scale_attn_by_inverse_layer_idx": True},
    "other_settings": {
        "scale_attn_weights": False,
        "reorder_and_upcast_attn": True,
        "activation_function": "gelu_new",
        "n_inner": 48,
        "layer_norm_epsilon": 1e-3,
    },
}


def tiny_config(**overrides: object) -> ImageGPTConfig:
    return ImageGPTConfig(
        n_layer=N_LAYER, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ, **overrides
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Draw every weight and bias at random, layer-norm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if ".ln_" in name or name.startswith("ln_"):
                parameter.copy_(1 + 0.3 * noise)
            else:
                parameter.copy_(WEIGHT_STD * noise)


def make_model(seed: int = 0, **overrides: object) -> ImageGPTModel:
    """Build a tiny random ImageGPT in eval mode."""
    model = ImageGPTModel(tiny_config(**overrides)).eval()
    randomize(model, seed)
    return model


def reference_pooled(model: ImageGPTModel, input_ids: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool Hugging Face's ``output_hidden_states``, shape (n_layer + 1, batch, dim)."""
    pooled = []
    with torch.no_grad():
        hidden_states = model(input_ids, output_hidden_states=True).hidden_states
        for index, hidden in enumerate(hidden_states):  # (batch, seq, dim) each
            if pooling == "last_token":
                pooled.append(hidden[:, -1])
            elif pooling == "mean_ln_f" and index < N_LAYER:
                pooled.append(model.ln_f(hidden).mean(dim=1))
            else:
                pooled.append(hidden.mean(dim=1))
    return torch.stack(pooled)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return max |actual - expected| / max |expected|."""
    return float((actual - expected).abs().max() / expected.abs().max())


def random_input_ids(batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=generator)


def processor_input_ids(images: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Quantise with Hugging Face's NumPy processor, shape (batch, H*W)."""
    processor = ImageGPTImageProcessorPil(clusters=palette, do_resize=False)
    return np.stack(processor(list(images))["input_ids"])


@pytest.fixture(scope="module")
def digits_rgb() -> np.ndarray:
    """All 1,797 scikit-learn digits as uint8 RGB images, shape (1797, 8, 8, 3)."""
    gray = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)  # (n, 8, 8)
    return np.repeat(gray[..., None], 3, axis=-1)


@pytest.mark.parametrize("pooling", LAYER_POOLINGS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_pooled_hidden_states_matches_hugging_face(config_name: str, pooling: str) -> None:
    model = make_model(**CONFIGS[config_name])
    input_ids = random_input_ids(batch=5)
    expected = reference_pooled(model, input_ids, pooling)

    layers = list(range(N_LAYER + 1))
    actual = pooled_hidden_states(model, input_ids, layers, pooling)

    assert actual.shape == (N_LAYER + 1, 5, 32)
    assert actual.dtype == torch.float32
    for layer in layers:
        assert relative_error(actual[layer], expected[layer]) < 1e-5, f"layer {layer}"


def test_pooled_hidden_states_detects_wrong_scale() -> None:
    # Guards the reference test itself: a model whose only difference is the attention scale
    # must produce pooled states far outside the 1e-5 tolerance.
    input_ids = random_input_ids(batch=5)
    plain = pooled_hidden_states(make_model(), input_ids, [N_LAYER - 1])
    scaled = pooled_hidden_states(
        make_model(scale_attn_by_inverse_layer_idx=True), input_ids, [N_LAYER - 1]
    )
    assert relative_error(scaled, plain) > 1e-2


def test_pooled_hidden_states_follows_layer_order() -> None:
    model = make_model()
    input_ids = random_input_ids(batch=3)
    every = pooled_hidden_states(model, input_ids, [0, 1, 2, 3])
    shuffled = pooled_hidden_states(model, input_ids, [3, 1, 1, 0])
    assert torch.equal(shuffled[0], every[3])
    assert torch.equal(shuffled[1], every[1])
    assert torch.equal(shuffled[2], every[1])
    assert torch.equal(shuffled[3], every[0])


def test_pooled_hidden_states_stops_after_deepest_layer() -> None:
    model = make_model()
    calls = [0] * N_LAYER

    def counter(index: int):
        def hook(*_: object) -> None:
            calls[index] += 1

        return hook

    for index, block in enumerate(model.h):
        block.mlp.c_fc.register_forward_hook(counter(index))
    pooled_hidden_states(model, random_input_ids(batch=2), [1])

    assert calls[0] == 1
    assert calls[1] == 0
    assert calls[2] == 0


def test_pooled_hidden_states_accepts_causal_lm() -> None:
    lm = ImageGPTForCausalImageModeling(tiny_config()).eval()
    randomize(lm, seed=0)
    input_ids = random_input_ids(batch=2)
    from_lm = pooled_hidden_states(lm, input_ids, [0, 2, 3])
    from_transformer = pooled_hidden_states(lm.transformer, input_ids, [0, 2, 3])
    assert torch.equal(from_lm, from_transformer)


def test_pooled_hidden_states_ignores_training_mode() -> None:
    model = make_model()
    input_ids = random_input_ids(batch=2)
    evaluated = pooled_hidden_states(model, input_ids, [3])
    model.train()
    trained = pooled_hidden_states(model, input_ids, [3])
    assert torch.equal(trained, evaluated)


def test_pooled_hidden_states_batch_invariant() -> None:
    model = make_model()
    input_ids = random_input_ids(batch=64, seed=5)
    layers = list(range(N_LAYER + 1))
    alone = pooled_hidden_states(model, input_ids[:1], layers)[:, 0]  # (n_layers, dim)
    in_eight = pooled_hidden_states(model, input_ids[:8], layers)[:, 0]
    in_sixty_four = pooled_hidden_states(model, input_ids, layers)[:, 0]
    assert relative_error(in_eight, alone) < 1e-5
    assert relative_error(in_sixty_four, alone) < 1e-5


def test_pooled_hidden_states_float32_under_autocast() -> None:
    model = make_model()
    input_ids = random_input_ids(batch=4)
    exact = pooled_hidden_states(model, input_ids, [0, 1, 3], "mean_ln_f")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pooled_hidden_states(model, input_ids, [0, 1, 3], "mean_ln_f")
    assert mixed.dtype == torch.float32
    # bf16 keeps 8 significant bits, so a few percent is the expected difference.
    assert relative_error(mixed, exact) < 5e-2


@pytest.mark.parametrize(
    ("layers", "pooling", "input_ids", "message"),
    [
        ([4], "mean", random_input_ids(2), "layer 4 is out of range"),
        ([-1], "mean", random_input_ids(2), "layer -1 is out of range"),
        ([], "mean", random_input_ids(2), "layers is empty"),
        ([1], "max", random_input_ids(2), "pooling 'max' is unknown"),
        ([1], "mean", torch.zeros(2, SEQ + 1, dtype=torch.int64), "sequence length 65"),
        ([1], "mean", torch.full((2, SEQ), VOCAB), "contain token 17"),
        ([1], "mean", torch.zeros(2, 3, SEQ, dtype=torch.int64), "shape (batch, seq)"),
    ],
)
def test_pooled_hidden_states_rejects_invalid_request(
    layers: list[int], pooling: str, input_ids: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pooled_hidden_states(make_model(), input_ids, layers, pooling)


def test_pooled_hidden_states_rejects_unknown_activation() -> None:
    model = make_model()
    model.config.activation_function = "swishy"
    with pytest.raises(ValueError, match="activation_function 'swishy'"):
        pooled_hidden_states(model, random_input_ids(2), [1])


def test_quantize_matches_processor_on_digits(digits_rgb: np.ndarray) -> None:
    gray_values = digits_rgb[..., :1].reshape(-1, 1).astype(np.float64) / 127.5 - 1
    kmeans = KMeans(n_clusters=16, n_init=1, random_state=0).fit(gray_values)
    palette = np.repeat(kmeans.cluster_centers_, 3, axis=1).astype(np.float32)  # (16, 3)

    expected = processor_input_ids(digits_rgb, palette)
    actual = quantize(torch.from_numpy(digits_rgb), torch.from_numpy(palette))

    assert actual.dtype == torch.int64
    assert actual.shape == (len(digits_rgb), 64)
    assert np.array_equal(actual.numpy(), expected)


def test_quantize_matches_processor_on_random_images() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    palette = rng.uniform(-1, 1, (512, 3)).astype(np.float32)

    expected = processor_input_ids(images, palette)
    actual = quantize(torch.from_numpy(images), torch.from_numpy(palette))

    assert np.array_equal(actual.numpy(), expected)


def test_quantize_matches_processor_on_ties() -> None:
    # Every colour appears twice, so every distance ties exactly, and the grays sit on pixel
    # levels 10 apart, so gray pixels halfway between two of them tie up to rounding.
    levels = (np.arange(0, 256, 10) / 127.5 - 1).astype(np.float32)
    grays = np.repeat(levels[:, None], 3, axis=1)  # (26, 3)
    palette = np.concatenate([grays, grays])[np.random.default_rng(1).permutation(52)]
    gray_image = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=-1)
    rng = np.random.default_rng(2)
    images = np.concatenate(
        [gray_image[None], rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)]
    )

    expected = processor_input_ids(images, palette)
    actual = quantize(torch.from_numpy(images), torch.from_numpy(palette))

    assert np.array_equal(actual.numpy(), expected)


def test_quantize_rounds_float64_palette_to_float32() -> None:
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    palette = torch.from_numpy(rng.uniform(-1, 1, (32, 3)))
    assert torch.equal(quantize(images, palette), quantize(images, palette.float()))


@pytest.mark.parametrize(
    ("images", "palette", "message"),
    [
        (torch.zeros(1, 4, 4, 3), torch.zeros(4, 3), "uint8 tensor"),
        (torch.zeros(1, 4, 4, dtype=torch.uint8), torch.zeros(4, 3), "uint8 tensor"),
        (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), torch.zeros(4, 2), "palette must be"),
        (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), torch.zeros(0, 3), "palette is empty"),
    ],
)
def test_quantize_rejects_invalid_input(
    images: torch.Tensor, palette: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        quantize(images, palette)


def test_build_input_ids_sos_policy() -> None:
    tokens = torch.tensor([[3, 4, 5], [6, 7, 8]])
    input_ids = build_input_ids(tokens, policy="sos", sos_token=16)
    assert torch.equal(input_ids, torch.tensor([[16, 3, 4], [16, 6, 7]]))


def test_build_input_ids_plain_policy() -> None:
    tokens = torch.tensor([[3, 4, 5], [6, 7, 8]])
    input_ids = build_input_ids(tokens, policy="plain", sos_token=16)
    assert torch.equal(input_ids, tokens)


def test_build_input_ids_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="input policy 'shifted' is unknown"):
        build_input_ids(torch.zeros(1, 3, dtype=torch.int64), policy="shifted", sos_token=16)
