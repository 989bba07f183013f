"""Projections: 2-D PCA, t-SNE or UMAP maps of one stored layer, as JSON, .npy and PNG."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from fastapi import APIRouter, Response, status

from service.auth import JobQuotaDep
from service.deps import QueueDep, RedisDep, SettingsDep, StoreDep
from service.jobs import (
    inputs_locked,
    not_complete_message,
    require_complete,
    result_status,
    submit_result_job,
)
from service.plots import figure_png, scatter_figure
from service.schemas import (
    ProjectionCreate,
    ProjectionCreated,
    ProjectionPublic,
    ProjectionsPublic,
)
from store import NotFoundError, NotReadyError, Store, check_id
from store.arrays import group_array
from workers.projections import ProjectionSpec, check_request

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/projections", tags=["projections"])

METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
PNG_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}}}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ProjectionCreated,
    responses={
        200: {"model": ProjectionCreated, "description": "Already complete: nothing queued."}
    },
)
def create_projection(
    body: ProjectionCreate,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
    quota: JobQuotaDep,
) -> ProjectionCreated:
    """Project a stratified subsample of one layer to 2-D, as one job."""
    check_id(body.featureset, field="featureset")
    with inputs_locked(queue.connection, [body.featureset]):
        featureset = store.featureset(body.featureset, field="featureset")
        require_complete(queue.connection, store, featureset, field="featureset")
        featureset.layer_position(body.layer)
        # The job samples items by label: damaged labels fail the POST, not a queued job.
        featureset.read_labels()
        # More points than items means all items; the id is computed from the count used.
        n_points = min(body.n_points, featureset.n_items)
        clamped = n_points < body.n_points
        check_request(body.method, n_points, featureset.n_items if clamped else None, featureset.id)
        spec = ProjectionSpec(
            featureset=featureset.id,
            layer=body.layer,
            method=body.method,
            n_points=n_points,
            seed=body.seed,
        )
        projection_id = spec.projection_id()
        submission = submit_result_job(
            store,
            queue,
            quota,
            group="projections",
            result_id=projection_id,
            attrs={"projection_id": projection_id, "spec": spec.model_dump(), "status": "pending"},
            func="workers.jobs.run_projection",
            kind="projection",
            timeout=settings.probe_timeout,
        )
    job_id = submission.job_id
    if submission.status == "complete":
        response.status_code = status.HTTP_200_OK
        return ProjectionCreated(
            projection_id=projection_id, job_id=job_id, status="complete", created=False
        )
    logger.info(
        "projection %s: job %s, %s of layer %d of %s (%d points)",
        projection_id,
        job_id,
        body.method,
        body.layer,
        featureset.id,
        n_points,
    )
    return ProjectionCreated(
        projection_id=projection_id,
        job_id=job_id,
        status=submission.status,
        created=submission.created,
    )


def _read_projection(
    store: Store, redis: Any, projection_id: str, *, arrays: bool
) -> dict[str, Any]:
    check_id(projection_id, field="projection_id")
    stored = store.read_result("projections", projection_id)
    if stored is None or "spec" not in stored:
        raise NotFoundError(
            f"projection {projection_id!r} not found; list projections with GET /v1/projections",
            field="projection_id",
            value=projection_id,
        )
    status, job_id, error = result_status(redis, store, projection_id, stored.get("status"))
    result: dict[str, Any] = {
        "projection_id": projection_id,
        "status": status,
        "spec": stored["spec"],
        "n_points": stored.get("n_points"),
        "info": stored.get("info", {}),
        "class_names": stored.get("class_names", []),
        "job_id": job_id,
        "error": error,
    }
    if arrays and result["status"] == "complete":
        group = store.result_group("projections", projection_id, mode="r")
        result["coords"] = np.asarray(group_array(group, "coords")[:]).tolist()
        result["item_indices"] = np.asarray(group_array(group, "item_indices")[:]).tolist()
        result["labels"] = np.asarray(group_array(group, "labels")[:]).tolist()
    return result


def _complete_arrays(
    store: Store, redis: Any, projection_id: str
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    projection = _read_projection(store, redis, projection_id, arrays=False)
    if projection["status"] != "complete":
        raise NotReadyError(
            not_complete_message(
                "projection",
                projection_id,
                projection["status"],
                projection["job_id"],
                projection["error"],
            ),
            field="projection_id",
            value=projection_id,
        )
    group = store.result_group("projections", projection_id, mode="r")
    coords = np.asarray(group_array(group, "coords")[:])  # (n_points, 2)
    labels = np.asarray(group_array(group, "labels")[:])  # (n_points,)
    return projection, coords, labels


@router.get("", response_model=ProjectionsPublic)
def list_projections(store: StoreDep, redis: RedisDep) -> ProjectionsPublic:
    """List all projections in the store, without their coordinates."""
    data = []
    for projection_id in store.result_ids("projections"):
        try:
            stored = _read_projection(store, redis, projection_id, arrays=False)
        except NotFoundError:
            # Deleted while listing, or a record whose creation was interrupted.
            logger.warning("projection %s: no readable record, left out of the list", projection_id)
            continue
        data.append(ProjectionPublic.model_validate(stored))
    return ProjectionsPublic(data=data, count=len(data))


def _scatter(store: Store, redis: Any, projection_id: str) -> Response:
    projection, coords, labels = _complete_arrays(store, redis, projection_id)
    spec = projection["spec"]
    featureset = store.featureset(spec["featureset"]).spec
    method = METHOD_NAMES[spec["method"]]
    # A local checkpoint path would overflow the title; its directory name identifies it.
    model = featureset.model
    if model.startswith(("/", ".", "~")):
        model = model.rstrip("/").rsplit("/", 1)[-1]
    title = (
        f"{method} of layer {spec['layer']}: {model} on {featureset.dataset}/"
        f"{featureset.split}\n({len(labels)} points, {featureset.pooling} pooling)"
    )
    png = figure_png(
        scatter_figure(
            coords, labels, class_names=projection["class_names"], title=title, axis_label=method
        )
    )
    return Response(png, media_type="image/png")


@router.get("/{projection_id}.png", responses=PNG_RESPONSE, response_class=Response)
def read_projection_png(projection_id: str, store: StoreDep, redis: RedisDep) -> Response:
    """Scatter plot of a projection, coloured by class, as a PNG."""
    return _scatter(store, redis, projection_id)


@router.get("/{projection_id}/scatter.png", responses=PNG_RESPONSE, response_class=Response)
def read_scatter_png(projection_id: str, store: StoreDep, redis: RedisDep) -> Response:
    """Scatter plot of a projection, coloured by class, as a PNG (same as {id}.png)."""
    return _scatter(store, redis, projection_id)


@router.get(
    "/{projection_id}/coords.npy",
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "float32 array of shape (n_points, 2) as .npy",
        }
    },
    response_class=Response,
)
def read_coords_npy(projection_id: str, store: StoreDep, redis: RedisDep) -> Response:
    """Coordinates of a projection as a (n_points, 2) float32 .npy array."""
    _, coords, _ = _complete_arrays(store, redis, projection_id)
    buffer = io.BytesIO()
    np.save(buffer, coords, allow_pickle=False)
    return Response(
        buffer.getvalue(),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{projection_id}-coords.npy"'},
    )


@router.get("/{projection_id}", response_model=ProjectionPublic)
def read_projection(projection_id: str, store: StoreDep, redis: RedisDep) -> ProjectionPublic:
    """Spec, engine, coordinates, item indices and labels of a projection."""
    return ProjectionPublic.model_validate(
        _read_projection(store, redis, projection_id, arrays=True)
    )
