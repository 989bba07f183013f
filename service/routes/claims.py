"""Claim check: probe accuracy of one layer against the generative loss of each checkpoint.

iGPT's claim is that a better generative model (lower validation loss) gives better features
(higher probe accuracy). Pretrain with ``checkpoint_every``, extract and probe the same layer of
each ``store:<name>@step<N>`` checkpoint, then pass the probe ids here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Response

from service.deps import StoreDep
from service.plots import accuracy_vs_loss_png
from service.schemas import ClaimPointPublic, ClaimPublic
from store import FeatureSetSpec, NotFoundError, NotReadyError, Store, StoreError, check_id
from workers.errors import ModelError
from workers.modelref import resolve_model
from workers.probes.params import format_json

router = APIRouter(prefix="/v1/claims", tags=["claims"])

ProbeIds = Annotated[
    list[str], Query(min_length=1, max_length=100, description="Probe ids, one per checkpoint.")
]
KindQuery = Annotated[str, Query(description="Probe kind to read from each probe.")]
LayerQuery = Annotated[
    int | None, Query(ge=0, description="Layer to read; needed when a probe covers several layers.")
]


# Feature-set spec fields that must be equal across the probes of one claim check, so that the
# checkpoint is the only difference. Model, revision and layers differ by design. The
# fingerprint follows the fields it depends on, so that a message names the field that was sent.
_COMPARED_FEATURESET_FIELDS = (
    "dataset",
    "split",
    "limit",
    "seed",
    "image_column",
    "label_column",
    "dataset_fingerprint",
    "pooling",
    "dtype",
    "processor",
)


@dataclass(frozen=True)
class _ProbedCheckpoint:
    """One probe of a claim check: its point, its pretraining run and its compared settings."""

    point: dict[str, Any]
    run: str  # the model without its "@step<N>" suffix, e.g. "store:digits-igpt"
    settings: dict[str, Any]  # description -> value, for the settings held fixed


def _probed_checkpoint(
    store: Store, probe_id: str, kind: str, layer: int | None
) -> _ProbedCheckpoint:
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
    if not rows:
        kinds = sorted({row["kind"] for row in stored["rows"]})
        raise StoreError(
            f"probe {probe_id!r} has no {kind} rows: it was fitted with kinds {kinds}; "
            "pass kind= with one of them",
            field="kind",
            value=kind,
        )
    if layer is not None:
        rows = [row for row in rows if row["layer"] == layer]
    if len(rows) != 1:
        layers = sorted({row["layer"] for row in stored["rows"] if row["kind"] == kind})
        layer_text = "in all" if layer is None else f"for layer {layer}"
        raise StoreError(
            f"probe {probe_id!r} has {len(rows)} {kind} rows {layer_text} (its {kind} "
            f"layers: {layers}); pass layer= with one of them",
            field="layer",
            value=layer,
        )
    row = rows[0]

    spec = stored["spec"]
    train = store.featureset(spec["train_featureset"], field="probe").spec
    test = store.featureset(spec["test_featureset"], field="probe").spec
    model = train.model
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
    point = {
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
    settings = _compared_settings(spec, train, test, kind)
    return _ProbedCheckpoint(point, model.partition("@step")[0], settings)


def _compared_settings(
    spec: dict[str, Any], train: FeatureSetSpec, test: FeatureSetSpec, kind: str
) -> dict[str, Any]:
    """Return the settings of a probe that a claim check keeps fixed, keyed by description."""
    settings: dict[str, Any] = {}
    for role, featureset in (("train", train), ("test", test)):
        for name in _COMPARED_FEATURESET_FIELDS:
            settings[f"{role} feature set's {name}"] = getattr(featureset, name)
    settings[f"{kind} params"] = spec.get("params", {}).get(kind, {})
    settings["probe seed"] = spec.get("seed", 0)
    return settings


def _listed(probe_ids: list[str]) -> str:
    """Name probes in a message: "probe 'a'" or "probes 'a', 'b'"."""
    noun = "probe" if len(probe_ids) == 1 else "probes"
    return f"{noun} {', '.join(map(repr, probe_ids))}"


def _probe_ids_by(
    checked: list[_ProbedCheckpoint], key: Callable[[_ProbedCheckpoint], str]
) -> dict[str, list[str]]:
    """Group the probe ids of ``checked`` by ``key``, groups in the order first seen."""
    groups: dict[str, list[str]] = {}
    for item in checked:
        groups.setdefault(key(item), []).append(item.point["probe_id"])
    return groups


def _setting_text(item: _ProbedCheckpoint, *, name: str) -> str:
    return format_json(item.settings[name])


def _check_one_run(checked: list[_ProbedCheckpoint]) -> None:
    """Raise unless every probe comes from a checkpoint of the same pretraining run.

    The run with the most probes (the first listed one on a tie) is taken as the intended
    one, and the error's value lists the probes of the other runs.
    """
    by_run = _probe_ids_by(checked, lambda item: item.run)
    if len(by_run) == 1:
        return
    main = max(by_run, key=lambda run: len(by_run[run]))
    listing = "; ".join(f"{run}: {_listed(ids)}" for run, ids in by_run.items())
    raise StoreError(
        f"the probes come from different pretraining runs ({listing}), and a claim check "
        f"compares the checkpoints of one run; list only probes of checkpoints of {main}",
        field="probe",
        value=[item.point["probe_id"] for item in checked if item.run != main],
    )


def _check_one_probe_per_step(checked: list[_ProbedCheckpoint]) -> None:
    """Raise when two probes come from the same step of the run.

    The model saved at the end of pretraining (``store:<name>``) contains the weights of its
    last step, so it and ``store:<name>@step<last>`` count as one checkpoint.
    """
    by_step: dict[int, list[_ProbedCheckpoint]] = {}
    for item in checked:
        by_step.setdefault(item.point["step"], []).append(item)
    for step, items in by_step.items():
        if len(items) < 2:
            continue
        probe_ids = [item.point["probe_id"] for item in items]
        models = sorted({item.point["model"] for item in items})
        final = [model for model in models if "@step" not in model]
        checkpoints = [model for model in models if "@step" in model]
        reason = ""
        if final and checkpoints:
            reason = (
                f", because {final[0]} is saved after its last step with the weights of "
                f"{', '.join(checkpoints)}"
            )
        raise StoreError(
            f"{_listed(probe_ids)} come from the same step {step} of {items[0].run}{reason}; "
            "each checkpoint counts once in the correlation, so list one probe per checkpoint",
            field="probe",
            value=probe_ids,
        )


def _check_same_settings(checked: list[_ProbedCheckpoint]) -> None:
    """Raise when the probes differ in anything but the checkpoint (data, pooling, params).

    For each setting, the value of the most probes (the first listed one's on a tie) is taken
    as the intended one, and the error's value lists the probes with another value.
    """
    for name in checked[0].settings:
        by_value = _probe_ids_by(checked, functools.partial(_setting_text, name=name))
        if len(by_value) == 1:
            continue
        main = max(by_value, key=lambda value: len(by_value[value]))
        listing = "; ".join(f"{value} in {_listed(ids)}" for value, ids in by_value.items())
        raise StoreError(
            f"the probes differ in the {name} ({listing}), and a claim check varies only the "
            f"checkpoint; probe every checkpoint with the same {name}, such as {main}",
            field="probe",
            value=[
                item.point["probe_id"]
                for item in checked
                if format_json(item.settings[name]) != main
            ],
        )


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
    checked = [_probed_checkpoint(store, probe_id, kind, layer) for probe_id in probe]
    _check_one_run(checked)
    _check_one_probe_per_step(checked)
    _check_same_settings(checked)
    points = sorted((item.point for item in checked), key=lambda point: point["step"])
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
