"""Pretraining on the worker side: what a run leaves in the models folder."""

from __future__ import annotations

import uuid
from pathlib import Path

from workers.pretrain import PretrainParams, pretrain_imagegpt


def test_run_deletes_leftovers_of_killed_runs(tmp_path: Path) -> None:
    """A run whose worker was killed leaves step checkpoints and partial saves beside the model
    folder. The next run of the same name deletes them, and those of other names stay."""
    models = tmp_path / "models"
    mine = [models / f".tiny.{uuid.uuid4().hex}.{kind}" for kind in ("checkpoints", "partial")]
    other = models / f".tiny.v2.{uuid.uuid4().hex}.checkpoints"
    for path in (*mine, other):
        (path / "step-0").mkdir(parents=True)
    params = PretrainParams(
        n_layer=1, n_embd=16, n_head=2, n_colors=8, steps=2, batch_size=8, warmup_steps=0
    )

    pretrain_imagegpt(params, models / "tiny", device="cpu", data_roots=[])

    assert (models / "tiny" / "config.json").is_file()
    assert [path for path in mine if path.exists()] == []
    assert other.is_dir()
