"""Model references built from config dicts, without torch or checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.errors import ModelError, PathNotAllowedError
from workers.modelref import ModelRef, resolve_model


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


def _checkpoint(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")


def test_missing_step_lists_saved_steps(tmp_path: Path) -> None:
    for step in (0, 20):
        _checkpoint(tmp_path / "mid" / "checkpoints" / f"step-{step}")

    with pytest.raises(ModelError) as caught:
        resolve_model("store:mid@step999", models_dir=tmp_path)

    message = caught.value.message
    assert "has checkpoints at steps 0, 20" in message
    assert "use one of them, such as store:mid@step20" in message
    assert "checkpoint_every" not in message


def test_final_step_named_by_the_run(tmp_path: Path) -> None:
    """The last step of a run is saved as the run itself, not under checkpoints/."""
    _checkpoint(tmp_path / "ck1")
    (tmp_path / "ck1" / "layerbank.json").write_text(
        '{"params": {"steps": 5}, "final_val_loss": 1.5}'
    )
    for step in (0, 2, 4):
        _checkpoint(tmp_path / "ck1" / "checkpoints" / f"step-{step}")

    for ref in ("store:ck1@step5", "store:ck1@step3"):
        with pytest.raises(ModelError) as caught:
            resolve_model(ref, models_dir=tmp_path)
        assert "has checkpoints at steps 0, 2, 4" in caught.value.message
        assert "the weights of its last step, 5, are store:ck1" in caught.value.message


def test_step_written_with_leading_zeros_is_one_reference(tmp_path: Path) -> None:
    """@step20, @step020 and @step0020 load one checkpoint, so they give one reference and
    therefore one feature-set id."""
    folder = tmp_path / "p1" / "checkpoints" / "step-20"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "imagegpt"}')
    (folder / "model.safetensors").write_bytes(b"weights")

    refs = {
        resolve_model(f"store:p1@step{step}", models_dir=tmp_path).ref
        for step in ("20", "020", "0020")
    }

    assert refs == {"store:p1@step20"}


def test_run_without_checkpoints_says_so(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "dig")

    with pytest.raises(ModelError) as caught:
        resolve_model("store:dig@step0", models_dir=tmp_path)

    message = caught.value.message
    assert "'dig' saved no step checkpoints" in message
    assert "steps none" not in message
    assert "pretrain again with checkpoint_every" in message


def test_unknown_store_model_mentions_resume(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as caught:
        resolve_model("store:gone", models_dir=tmp_path)

    assert "resume its pretraining job" in caught.value.message


def test_no_model_roots_names_setting(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "local")

    with pytest.raises(PathNotAllowedError) as caught:
        resolve_model(str(tmp_path / "local"), models_dir=None, allowed_roots=[])

    message = caught.value.message
    assert "LAYERBANK_MODEL_ROOTS is empty" in message
    assert "under one of them" not in message
