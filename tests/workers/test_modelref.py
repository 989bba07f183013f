"""Model references built from config dicts, without torch or checkpoints."""

from __future__ import annotations

import pytest

from workers.errors import ModelError
from workers.modelref import ModelRef


def _vit_ref(config: dict[str, object]) -> ModelRef:
    return ModelRef("./vit", "vit", "local", "/models/vit", "abc123", config)


def test_n_hidden_states_counts_blocks() -> None:
    ref = _vit_ref({"model_type": "vit", "num_hidden_layers": 2})
    assert ref.n_hidden_states == 3


def test_config_without_block_count_raises() -> None:
    ref = _vit_ref({"model_type": "vit", "hidden_size": 32})
    with pytest.raises(ModelError, match="num_hidden_layers") as caught:
        _ = ref.n_hidden_states
    assert caught.value.field == "model"
    assert caught.value.value == "./vit"


def test_check_layers_without_block_count_raises() -> None:
    ref = _vit_ref({"model_type": "vit", "hidden_size": 32})
    with pytest.raises(ModelError, match="num_hidden_layers"):
        ref.check_layers("all")
