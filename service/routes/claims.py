"""Claim check: probe accuracy of one layer against the generative loss of each checkpoint.

iGPT's claim is that a better generative model (lower validation loss) gives better features
(higher probe accuracy). Pretrain with ``checkpoint_every``, extract and probe the same layer of
each ``store:<name>@step<N>`` checkpoint, then pass the probe ids here.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Response

from service.deps import StoreDep
from service.plots import accuracy_vs_loss_png
from service.schemas import ClaimPointPublic, ClaimPublic
from store import NotFoundError, NotReadyError, Store, StoreError, check_id
from workers.errors import ModelError
from workers.modelref import resolve_model

router = APIRouter(prefix="/v1/claims", tags=["claims"])

ProbeIds = Annotated[
    list[str], Query(min_length=1, max_length=100, description="Probe ids, one per checkpoint.")
]
KindQuery = Annotated[str, Query(description="Probe kind to read from each probe.")]
LayerQuery = Annotated[
    int | None, Query(ge=0, description="Layer to read; needed when a probe covers several layers.")
]


def _point(store: Store, probe_id: str, kind: str, layer: int | None) -> dict[str, Any]:
    check_id(probe_id, field="probe")
    stored = store.read_result("probes", probe_id)
    if stored is None:
        raise NotFoundError(f"probe {probe_id!r} not found", field="probe", value=probe_id)
    if stored.get("status") != "complete":
        raise NotReadyError(
            f"probe {probe_id!r} is not complete yet; wait for its job",
            field="probe",
            value=probe_id,
        )
    rows = [row for row in stored["rows"] if row["kind"] == kind]
    if layer is not None:
        rows = [row for row in rows if row["layer"] == layer]
    if len(rows) != 1:
        layers = sorted({row["layer"] for row in stored["rows"] if row["kind"] == kind})
        layer_text = "in all" if layer is None else f"for layer {layer}"
        raise StoreError(
            f"probe {probe_id!r} has {len(rows)} {kind} rows {layer_text} (its {kind} "
            f"layers: {layers}); pass layer= with one of them, or the kind it was fitted with",
            field="layer",
            value=layer,
        )
    row = rows[0]

    model = store.featureset(stored["spec"]["train_featureset"]).spec.model
    try:
        ref = resolve_model(model, models_dir=store.models_dir(), allow_hub=False)
    except ModelError as exc:
        raise StoreError(
            f"probe {probe_id!r} was fitted on features of {model!r}, which is not "
            f"a pretrained store model ({exc.message}); probe store:<name>@step<N> "
            "checkpoints",
            field="probe",
            value=probe_id,
        ) from exc
    training = ref.training
    if "checkpoint" in training:
        step, val_loss = int(training["checkpoint"]["step"]), float(training["val_loss"])
    elif "final_val_loss" in training:
        step, val_loss = int(training["params"]["steps"]), float(training["final_val_loss"])
    else:
        raise StoreError(
            f"model {model!r} of probe {probe_id!r} has no recorded validation loss; "
            "probe checkpoints saved by POST /v1/pretrain",
            field="probe",
            value=probe_id,
        )
    return {
        "probe_id": probe_id,
        "model": model,
        "step": step,
        "kind": kind,
        "layer": int(row["layer"]),
        "val_loss": val_loss,
        "val_bits_per_token": val_loss / float(np.log(2)),
        "test_accuracy": float(row["test_accuracy"]),
        "test_accuracy_ci95": row.get("test_accuracy_ci95"),
    }


def _spearman(x: list[float], y: list[float]) -> float | None:
    """Rank correlation (no tie correction); None below 3 points or for a constant input."""
    if len(x) < 3:
        return None
    rank_x = np.argsort(np.argsort(x)).astype(np.float64)
    rank_y = np.argsort(np.argsort(y)).astype(np.float64)
    if np.std(rank_x) == 0 or np.std(rank_y) == 0:
        return None
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def _claim(store: Store, probe: list[str], kind: str, layer: int | None) -> ClaimPublic:
    repeated = sorted({probe_id for probe_id in probe if probe.count(probe_id) > 1})
    if repeated:
        raise StoreError(
            f"probe {repeated[0]!r} is listed {probe.count(repeated[0])} times, and each "
            "checkpoint counts once in the correlation; list each probe once",
            field="probe",
            value=repeated[0],
        )
    points = sorted(
        (_point(store, probe_id, kind, layer) for probe_id in probe),
        key=lambda point: point["step"],
    )
    layers = {point["layer"] for point in points}
    if len(layers) > 1:
        raise StoreError(
            f"the probes cover different layers {sorted(layers)}; pass layer= to "
            "compare one layer across checkpoints",
            field="layer",
            value=None,
        )
    spearman = _spearman(
        [p["val_bits_per_token"] for p in points], [p["test_accuracy"] for p in points]
    )
    return ClaimPublic(
        points=[ClaimPointPublic.model_validate(p) for p in points], spearman=spearman
    )


@router.get("/accuracy-vs-loss", response_model=ClaimPublic)
def read_accuracy_vs_loss(
    store: StoreDep, probe: ProbeIds, kind: KindQuery = "logistic", layer: LayerQuery = None
) -> ClaimPublic:
    """Probe test accuracy and validation loss per checkpoint, with their rank correlation."""
    return _claim(store, probe, kind, layer)


@router.get(
    "/accuracy-vs-loss.png",
    responses={200: {"content": {"image/png": {}}}},
    response_class=Response,
)
def read_accuracy_vs_loss_png(
    store: StoreDep, probe: ProbeIds, kind: KindQuery = "logistic", layer: LayerQuery = None
) -> Response:
    """Probe test accuracy against validation bits per token, one point per checkpoint."""
    claim = _claim(store, probe, kind, layer)
    first = claim.points[0]
    name = first.model.removeprefix("store:").split("@step")[0]
    rho = "" if claim.spearman is None else f", Spearman rho {claim.spearman:+.2f}"
    title = (
        f"store:{name}: {kind} probe on layer {first.layer} vs generative loss\n"
        f"({len(claim.points)} checkpoints{rho})"
    )
    png = accuracy_vs_loss_png([p.model_dump() for p in claim.points], title=title)
    return Response(png, media_type="image/png")
