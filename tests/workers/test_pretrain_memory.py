"""The memory estimate of a pretraining run and the worker's check before it trains."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue

from service.demo import DEMO_PRETRAIN
from service.jobs import enqueue_single, job_state, load_job
from service.launcher import start_worker
from store import Store
from store.settings import Settings
from tests.conftest import rq_starts
from workers.pretrain import PretrainParams, pretrain_imagegpt
from workers.pretrain_memory import (
    PretrainMemoryError,
    PretrainShape,
    check_pretrain_memory,
    count_parameters,
    estimate_pretrain_memory,
)

# A Redis database of the session's server that only this module uses.
PRETRAIN_MEMORY_DB = 13
# The default of LAYERBANK_PRETRAIN_MEMORY_GIB, in bytes.
LIMIT = int(Settings().pretrain_memory_gib * 2**30)
# digits: 8x8 images, 1,797 of them in all splits.
DIGITS_TOKENS = 64
DIGITS_TRAIN_ITEMS = 1297
# A request that each field's own range accepts, but that needs far more memory than a worker.
HUGE = {
    "dataset": "digits",
    "split": "train",
    "n_layer": 48,
    "n_embd": 2048,
    "n_head": 64,
    "n_colors": 1024,
    "batch_size": 4096,
    "steps": 1,
}


def _shape(params: dict[str, Any]) -> PretrainShape:
    full = PretrainParams.model_validate(params)
    return PretrainShape(
        n_layer=full.n_layer,
        n_embd=full.n_embd,
        n_head=full.n_head,
        n_colors=full.n_colors,
        batch_size=full.batch_size,
        seq_len=DIGITS_TOKENS,
        n_items=DIGITS_TRAIN_ITEMS,
    )


@pytest.mark.parametrize(
    ("n_layer", "n_embd", "n_colors", "seq_len"),
    [(1, 16, 8, 64), (4, 64, 16, 64), (3, 96, 512, 1024)],
)
def test_parameter_count_matches_model(
    n_layer: int, n_embd: int, n_colors: int, seq_len: int
) -> None:
    import torch
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    config = ImageGPTConfig(
        vocab_size=n_colors + 1,
        n_positions=seq_len,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
    )
    with torch.device("meta"):
        model = ImageGPTForCausalImageModeling(config)
    shape = PretrainShape(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=4,
        n_colors=n_colors,
        batch_size=1,
        seq_len=seq_len,
        n_items=10,
    )

    assert count_parameters(shape) == sum(p.numel() for p in model.parameters())


def test_huge_request_over_limit() -> None:
    shape = _shape(HUGE)
    memory = estimate_pretrain_memory(shape)

    # About 2.4 billion parameters, 16 bytes each with gradients and AdamW state.
    assert 2.3e9 < memory.parameters < 2.5e9
    assert memory.state_bytes > 35 * 2**30
    with pytest.raises(PretrainMemoryError) as info:
        check_pretrain_memory(shape, LIMIT)
    error = info.value
    assert error.permanent
    assert error.field == "n_embd"
    assert error.value == 2048
    assert f"{memory.total_bytes / 2**30:.1f} GiB" in error.message
    assert "LAYERBANK_PRETRAIN_MEMORY_GIB" in error.message
    assert "smaller n_embd, n_layer or n_head" in error.message


def test_batch_too_large_names_largest() -> None:
    shape = _shape({"n_layer": 4, "n_embd": 64, "n_head": 4, "batch_size": 4096})

    with pytest.raises(PretrainMemoryError) as info:
        check_pretrain_memory(shape, LIMIT)

    error = info.value
    assert error.field == "batch_size"
    assert error.value == 4096
    largest = int(error.message.split("pass batch_size <= ")[1].split(",")[0])
    assert 1 <= largest < 4096
    fitting = _shape({"n_layer": 4, "n_embd": 64, "n_head": 4, "batch_size": largest})
    check_pretrain_memory(fitting, LIMIT)
    over = _shape({"n_layer": 4, "n_embd": 64, "n_head": 4, "batch_size": largest + 1})
    assert estimate_pretrain_memory(over).total_bytes > LIMIT


@pytest.mark.parametrize(
    "params",
    [{}, {key: value for key, value in DEMO_PRETRAIN.items() if key != "dataset"}],
    ids=["defaults", "demo"],
)
def test_defaults_well_inside_limit(params: dict[str, Any]) -> None:
    memory = check_pretrain_memory(_shape(params), LIMIT)

    assert memory.total_bytes < LIMIT / 4


def test_run_over_limit_fails_before_training(tmp_path: Path) -> None:
    params = PretrainParams(
        n_layer=1, n_embd=16, n_head=2, n_colors=8, steps=2, batch_size=512, warmup_steps=0
    )
    shape = _shape(params.model_dump())
    limit = 640 * 2**20
    assert estimate_pretrain_memory(shape).total_bytes > limit

    with pytest.raises(PretrainMemoryError) as info:
        pretrain_imagegpt(
            params, tmp_path / "models" / "tiny", device="cpu", data_roots=[], memory_limit=limit
        )

    assert info.value.field == "batch_size"
    assert "limit of 0.625 GiB" in info.value.message
    assert not (tmp_path / "models").exists()


@pytest.fixture
def memory_db(redis_server: Any) -> Iterator[Redis]:
    connection = Redis.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{PRETRAIN_MEMORY_DB}")
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


def test_queued_job_over_limit_fails_once(
    memory_db: Redis, redis_server: Any, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """A job queued without the API's check fails with the estimate and is not retried."""
    queue_name = "layerbank-pretrain-memory"
    queue = Queue(queue_name, connection=memory_db)
    # Over the 1 GiB limit set below through batch_size alone, so that a worker without the
    # check trains it in seconds instead of running out of memory.
    params = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_colors": 8, "batch_size": 4096}
    params |= {"steps": 1, "eval_every": 1}
    job_id = enqueue_single(
        queue,
        "workers.jobs.pretrain",
        ("large-batch", params),
        kind="pretrain",
        target="model-large-batch",
        timeout=600,
        total=1,
    )
    rq_id = load_job(memory_db, job_id)["rq_ids"][0]
    env = {
        **stack_env,
        "LAYERBANK_STORE": str(tmp_path / "store"),
        "LAYERBANK_QUEUE": queue_name,
        "LAYERBANK_PRETRAIN_MEMORY_GIB": "1",
    }
    url = redis_server.url.rsplit("/", 1)[0] + f"/{PRETRAIN_MEMORY_DB}"
    log = tmp_path / "worker-0.log"

    process = start_worker(url, env=env, burst=True, log_file=log, name="pretrain-memory")

    assert process.wait(timeout=180) == 0, log.read_text()
    state = job_state(memory_db, Store(tmp_path / "store"), job_id)
    assert state["status"] == "failed", state
    assert state["error"]["field"] == "batch_size"
    assert "limit of 1 GiB" in state["error"]["message"]
    assert "LAYERBANK_PRETRAIN_MEMORY_GIB" in state["error"]["message"]
    assert not (tmp_path / "store" / "models" / "large-batch").exists()
    assert rq_starts(tmp_path, rq_id) == 1


def test_small_run_over_limit_shows_its_sizes() -> None:
    """A small model over a small limit prints its sizes in full and in MiB, not as zero."""
    with pytest.raises(PretrainMemoryError) as caught:
        check_pretrain_memory(_shape({}), 2**20)

    message = caught.value.message
    assert f"{count_parameters(_shape({})):,} parameters" in message
    assert " MiB" in message
    assert "0.00 billion" not in message
    assert "0.0 GiB" not in message


def test_limit_below_fixed_part_says_raise_limit() -> None:
    """Below the fixed part no model fits, so the fix is a larger limit, printed readably."""
    with pytest.raises(PretrainMemoryError) as caught:
        check_pretrain_memory(_shape({}), 107_374)

    message = caught.value.message
    assert "more than the limit of 0.1 MiB" in message
    assert "raise LAYERBANK_PRETRAIN_MEMORY_GIB" in message
    assert "e-05" not in message
