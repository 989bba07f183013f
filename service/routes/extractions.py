"""POST /v1/extractions: resolve a request to a feature set and queue its blocks."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response, status
from redis import Redis

from service.auth import (
    JobQuotaDep,
    LimitExceededError,
    check_block_count,
    check_extraction_size,
)
from service.deps import QueueDep, RedisDep, SettingsDep, StoreDep
from service.jobs import active_job_id, busy_job, enqueue_extraction, job_state, target_lock
from service.schemas import ExtractionCreate, ExtractionPublic
from store import FeatureSetSpec, NotReadyError, Store, create_featureset
from store.logs import escape_nonprintable
from store.settings import Settings
from workers.datasets import canonical_reference, load_split
from workers.errors import ModelError
from workers.modelref import ModelRef, check_pooling, processor_spec, resolve_model

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/extractions", tags=["extractions"])


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExtractionPublic,
    responses={
        200: {"model": ExtractionPublic, "description": "Already complete: nothing queued."}
    },
)
def create_extraction(
    body: ExtractionCreate,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    redis: RedisDep,
    queue: QueueDep,
    quota: JobQuotaDep,
) -> ExtractionPublic:
    """Start extracting pooled hidden states, or return the feature set of an identical request."""
    try:
        ref = resolve_model(
            body.model,
            models_dir=store.models_dir() if store.local_root else None,
            allowed_roots=settings.model_roots,
            allow_hub=settings.allow_hub,
            allow_list=settings.model_allow_list,
        )
    except ModelError:
        raise_if_pretraining(redis, store, body.model)
        raise
    layers = ref.check_layers(body.layers)
    pooling = check_pooling(ref, body.pooling)
    processor = processor_spec(ref, body.input_policy)
    # One spelling per local path, so that the same file gives the same feature set id.
    dataset = canonical_reference(body.dataset)
    split = load_split(
        dataset,
        body.split,
        limit=body.limit,
        seed=body.seed,
        image_column=body.image_column,
        label_column=body.label_column,
        allowed_roots=settings.data_roots,
    )
    limit, seed = body.limit, body.seed
    if limit is not None:
        whole = load_split(
            dataset,
            body.split,
            image_column=body.image_column,
            label_column=body.label_column,
            allowed_roots=settings.data_roots,
        )
        if whole.fingerprint == split.fingerprint:
            limit = None  # the limit covers the whole split: same feature set as no limit
    if limit is None:
        seed = 0  # the seed only picks the subset, so it must not change the id otherwise
    check_extraction_size(len(layers), len(split.labels), settings)
    if body.block_rows is not None:
        check_block_count(len(split.labels), body.block_rows, settings)
    token_layers = _check_token_layers(ref, body.token_layers)
    spec = FeatureSetSpec(
        model=ref.ref,
        model_revision=ref.revision,
        model_family=ref.family,
        processor=processor,
        dataset=dataset,
        dataset_fingerprint=split.fingerprint,
        split=body.split,
        limit=limit,
        seed=seed,
        image_column=body.image_column,
        label_column=body.label_column,
        layers=layers,
        pooling=pooling,
        dtype=body.dtype,
        token_layers=token_layers,
    )
    featureset_id = spec.featureset_id()
    dim = int(split.images[0].size) if ref.family == "pixels" else ref.dim
    itemsize = 4 if body.dtype == "float32" else 2
    token_bytes = len(token_layers) * len(split.labels) * (ref.n_tokens or 0) * dim * itemsize
    estimated_bytes = len(layers) * len(split.labels) * dim * itemsize + token_bytes
    _check_token_bytes(token_bytes, settings, token_layers, len(split.labels), ref, dim, itemsize)
    sizes = {"estimated_bytes": estimated_bytes, "token_bytes": token_bytes}

    with target_lock(redis, featureset_id):
        featureset = store.find_featureset(featureset_id)
        existing_job = active_job_id(redis, featureset_id)
        # The job's state is read before the feature set's status: the finalize job marks the
        # set complete before rq marks the job finished, so a finished job is never mistaken
        # for a lost one (which would queue a second job).
        state = (
            job_state(redis, store, existing_job)
            if featureset is not None and existing_job is not None
            else None
        )
        if featureset is not None and featureset.is_complete:
            response.status_code = status.HTTP_200_OK
            return ExtractionPublic(
                featureset_id=featureset_id,
                job_id=existing_job,
                status="complete",
                created=False,
                **sizes,
            )
        if state is not None and existing_job is not None:
            if state["status"] in ("queued", "running"):
                return ExtractionPublic(
                    featureset_id=featureset_id,
                    job_id=existing_job,
                    status=state["status"],
                    created=False,
                    **sizes,
                )
        quota.check()
        created = featureset is None
        if featureset is None:
            featureset = create_featureset(
                store,
                spec,
                layer_map=ref.layer_map(layers, pooling),
                dim=dim,
                labels=split.labels,
                item_ids=split.item_ids,
                class_names=split.class_names,
                ids_span_splits=split.ids_span_splits,
                block_rows=body.block_rows,
                n_tokens=ref.n_tokens if token_layers else None,
                max_blocks=settings.max_blocks_per_extraction,
            )
            if body.batch_size is not None:
                store.write_result("featuresets", featureset_id, {"batch_size": body.batch_size})
                store.forget(featureset_id)
        # A failed or lost earlier job is resumed: only missing blocks are queued again.
        job_id = enqueue_extraction(queue, featureset, timeout=settings.block_timeout)
        quota.record(job_id)
    # The model, dataset and split resolved before this point, but their names are the request's.
    logger.info(
        "extraction %s: job %s for %s on %s/%s",
        featureset_id,
        job_id,
        escape_nonprintable(ref.ref),
        escape_nonprintable(dataset),
        escape_nonprintable(body.split),
    )
    return ExtractionPublic(
        featureset_id=featureset_id, job_id=job_id, status="queued", created=created, **sizes
    )


def raise_if_pretraining(
    redis: Redis, store: Store, model: str, *, field: str = "model", value: str | None = None
) -> None:
    """Raise NotReadyError when ``model`` is ``store:<name>`` and a job still pretrains it.

    The error names ``field`` with ``value``, the request's own value (``model`` by default).
    """
    model = model.strip()
    name = model.removeprefix("store:").partition("@step")[0].strip()
    if not model.startswith("store:") or not name:
        return
    busy = busy_job(redis, store, f"model-{name}")
    if busy is not None:
        job_id, state = busy
        raise NotReadyError(
            f"model {model!r} is not ready: its pretraining job {job_id!r} is {state}; wait for "
            f"the job to finish (GET /v1/jobs/{job_id}), then send this request again",
            field=field,
            value=model if value is None else value,
        )


def _check_token_layers(ref: ModelRef, token_layers: list[int]) -> list[int]:
    """Return the validated token layers, sorted; an empty list stores no token features."""
    if not token_layers:
        return []
    if ref.n_tokens is None:
        raise ModelError(
            f"token_layers is not available for {ref.ref!r}, which has no tokens; "
            "drop token_layers",
            field="token_layers",
            value=token_layers,
        )
    last = ref.n_hidden_states - 1
    for layer in token_layers:
        if not 0 <= layer <= last:
            raise ModelError(
                f"token_layers entry {layer} is out of range for {ref.ref} (0..{last}); "
                "list hidden-state indices in that range",
                field="token_layers",
                value=layer,
            )
    return ref.check_layers(token_layers)


def _check_token_bytes(
    token_bytes: int,
    settings: Settings,
    token_layers: list[int],
    n_items: int,
    ref: ModelRef,
    dim: int,
    itemsize: int,
) -> None:
    """Raise `LimitExceededError` (413) if token features exceed LAYERBANK_MAX_TOKEN_BYTES."""
    if token_bytes <= settings.max_token_bytes:
        return
    raise LimitExceededError(
        f"token_layers {token_layers!r} need {token_bytes} bytes ({len(token_layers)} layers x "
        f"{n_items} items x {ref.n_tokens} tokens x {dim} dim x {itemsize} bytes), more than "
        f"LAYERBANK_MAX_TOKEN_BYTES={settings.max_token_bytes}; request fewer token_layers, a "
        "smaller limit or dtype float16",
        field="token_layers",
        value=token_layers,
    )
