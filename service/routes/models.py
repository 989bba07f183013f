"""Models: pretrain a small ImageGPT, list what the service can load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Response, status

from service.auth import JobQuotaDep
from service.deps import QueueDep, RedisDep, SettingsDep, StoreDep
from service.jobs import (
    active_job_id,
    enqueue_single,
    job_state,
    require_stopped,
    running_params,
    target_lock,
)
from service.routes.extractions import raise_if_pretraining
from service.schemas import (
    CheckpointPublic,
    CheckpointsPublic,
    ModelPublic,
    ModelsPublic,
    PretrainCreate,
    PretrainPublic,
)
from store import NotFoundError, StoreError, check_name
from workers.datasets import load_split
from workers.errors import ModelError, WorkersError
from workers.modelref import resolve_model
from workers.pretrain_memory import PretrainShape, check_pretrain_memory

router = APIRouter(prefix="/v1", tags=["models"])


@router.post(
    "/pretrain",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PretrainPublic,
    responses={200: {"model": PretrainPublic, "description": "Already complete: nothing queued."}},
)
def create_pretraining(
    body: PretrainCreate,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    redis: RedisDep,
    queue: QueueDep,
    quota: JobQuotaDep,
) -> PretrainPublic:
    """Pretrain a small ImageGPT (next-pixel objective) on a stored dataset as store:<name>."""
    name = check_name(body.name, field="name")
    if body.n_embd % body.n_head:
        raise StoreError(
            f"n_embd {body.n_embd} is not divisible by n_head {body.n_head}; "
            "pick n_head that divides n_embd",
            field="n_head",
            value=body.n_head,
        )
    # Fails early with a 4xx for unknown datasets or splits; the worker loads it again.
    split = load_split(body.dataset, body.split, allowed_roots=settings.data_roots)
    # A 422 with the estimate here, so that a run too large for a worker is never queued. The
    # worker checks again before it trains.
    check_pretrain_memory(
        PretrainShape.of_run(body, split.images.shape), int(settings.pretrain_memory_gib * 2**30)
    )
    params = body.model_dump(exclude={"name"})
    target = f"model-{name}"
    model_dir = store.models_dir() / name
    with target_lock(redis, target):
        record_path = model_dir / "layerbank.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            # The record also contains worker settings that a request cannot set (dropout, ...).
            stored = {k: v for k, v in record["params"].items() if k in params}
            differences = _differences(stored, params, "stored")
            if record.get("dataset_fingerprint") != split.fingerprint:
                # Same dataset name and split, but the stored files have changed since.
                differences.append(
                    f"dataset_fingerprint (stored {record.get('dataset_fingerprint')!r}, "
                    f"requested {split.fingerprint!r})"
                )
            if differences:
                raise ModelError(
                    f"store:{name} already exists with different settings: "
                    f"{', '.join(differences)}; choose another name",
                    field="name",
                    value=name,
                )
            response.status_code = status.HTTP_200_OK
            return PretrainPublic(
                model=f"store:{name}",
                job_id=active_job_id(redis, target),
                status="complete",
                created=False,
            )
        existing = active_job_id(redis, target)
        if existing is not None and job_state(redis, store, existing)["status"] in (
            "queued",
            "running",
        ):
            running = running_params(redis, existing)
            if running != params:
                found = (
                    _differences(running, params, "running") if isinstance(running, dict) else []
                )
                listed = f": {', '.join(found)}" if found else ""
                raise ModelError(
                    f"store:{name} is being pretrained by job {existing} with different "
                    f"settings{listed}; choose another name or wait for that job and use its "
                    "model",
                    field="name",
                    value=name,
                )
            return PretrainPublic(
                model=f"store:{name}", job_id=existing, status="running", created=False
            )
        require_stopped(redis, store, target, field="name", value=name)
        quota.check()
        job_id = enqueue_single(
            queue,
            "workers.jobs.pretrain",
            (name, params),
            kind="pretrain",
            target=target,
            timeout=settings.pretrain_timeout,
            total=body.steps,
        )
        quota.record(job_id)
    return PretrainPublic(model=f"store:{name}", job_id=job_id, status="queued", created=True)


def _differences(existing: dict[str, Any], requested: dict[str, Any], label: str) -> list[str]:
    """Describe each setting that differs between two parameter dicts, with both values.

    ``label`` names the existing side in the text, such as "stored" or "running".
    """
    described = []
    for field in [*requested, *(key for key in existing if key not in requested)]:
        if field in existing and field in requested and existing[field] == requested[field]:
            continue
        existing_text = repr(existing[field]) if field in existing else "not set"
        requested_text = repr(requested[field]) if field in requested else "not set"
        described.append(f"{field} ({label} {existing_text}, requested {requested_text})")
    return described


@router.get("/models", response_model=ModelsPublic)
def list_models(store: StoreDep, settings: SettingsDep) -> ModelsPublic:
    """Models the service pretrained, plus the built-in raw-pixel baseline."""
    data = [
        ModelPublic(
            model="pixels",
            family="pixels",
            source="builtin",
            revision="pixels-v1",
            n_hidden_states=1,
            dim=None,
        )
    ]
    models_dir = store.models_dir() if store.local_root else None
    if models_dir is not None:
        for path in sorted(
            p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            try:
                ref = resolve_model(f"store:{path.name}", models_dir=models_dir, allow_hub=False)
            except ModelError:
                continue
            data.append(
                ModelPublic(
                    model=ref.ref,
                    family=ref.family,
                    source=ref.source,
                    revision=ref.revision,
                    n_hidden_states=ref.n_hidden_states,
                    dim=ref.dim,
                    training={k: v for k, v in ref.training.items() if k != "history"},
                )
            )
    for path in _local_checkpoints(settings.model_roots or []):
        try:
            ref = resolve_model(
                str(path),
                models_dir=None,
                allowed_roots=settings.model_roots,
                allow_hub=False,
                allow_list=settings.model_allow_list,
            )
        except WorkersError:
            continue
        data.append(
            ModelPublic(
                model=ref.ref,
                family=ref.family,
                source=ref.source,
                revision=ref.revision,
                n_hidden_states=ref.n_hidden_states,
                dim=ref.dim,
            )
        )
    return ModelsPublic(data=data, count=len(data))


def _local_checkpoints(roots: list[Path]) -> list[Path]:
    """Return the directories with a config.json directly under each model root."""
    found = []
    for root in roots:
        if root.is_dir():
            found.extend(sorted(p for p in root.iterdir() if (p / "config.json").is_file()))
    return found


@router.get("/models/{name}/checkpoints", response_model=CheckpointsPublic)
def list_checkpoints(name: str, store: StoreDep, redis: RedisDep) -> CheckpointsPublic:
    """Checkpoints saved while pretraining store:<name>, with their validation loss."""
    check_name(name, field="name")
    model_dir = store.models_dir() / name
    if not (model_dir / "config.json").is_file():
        # A running pretraining keeps its step checkpoints aside until its last step.
        raise_if_pretraining(redis, store, f"store:{name}", field="name", value=name)
        raise NotFoundError(
            f"model store:{name} not found; list models with GET /v1/models",
            field="name",
            value=name,
        )
    data = []
    checkpoints = model_dir / "checkpoints"
    for path in checkpoints.iterdir() if checkpoints.is_dir() else []:
        record_path = path / "layerbank.json"
        if not path.name.startswith("step-") or not record_path.is_file():
            continue
        record = json.loads(record_path.read_text())
        step = int(record["checkpoint"]["step"])
        data.append(
            CheckpointPublic(
                model=f"store:{name}@step{step}",
                step=step,
                val_loss=record["val_loss"],
                val_bits_per_token=record["val_bits_per_token"],
            )
        )
    data.sort(key=lambda checkpoint: checkpoint.step)
    return CheckpointsPublic(data=data, count=len(data))
