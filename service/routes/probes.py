"""Probes: train on stored feature sets, read metrics and layer curves."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Response, status
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError
from redis import Redis

from service.auth import JobQuotaDep
from service.deps import QueueDep, RedisDep, SettingsDep, StoreDep
from service.jobs import (
    inputs_locked,
    not_complete_message,
    require_complete,
    result_status,
    submit_result_job,
)
from service.plots import confusion_png, figure_png, layer_curve_figure
from service.schemas import CurvePublic, ProbeCreate, ProbeCreated, ProbePublic, ProbesPublic
from store import FeatureSet, NotFoundError, NotReadyError, ProbeSpec, Store, StoreError, check_id
from store.settings import Settings
from store.spec import PROBE_KINDS
from workers.modelref import resolve_model
from workers.probes.settings import (
    AdapterFitShape,
    adapter_fit_shape,
    check_params,
    fit_part_size,
    normalise_params,
)
from workers.probes.task import check_classes

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/probes", tags=["probes"])

# Fields of a feature-set spec that must agree between train and test.
MATCHING_FIELDS = ("model", "model_revision", "processor", "layers", "pooling")


def describe_difference(name: str, train: Any, test: Any) -> str:
    """Return how a spec field differs between train and test, naming only the keys that
    differ when both are objects (such as the processor's settings)."""

    def shown(values: dict[str, Any], key: str) -> str:
        return json.dumps(values[key]) if key in values else "missing"

    if isinstance(train, dict) and isinstance(test, dict):
        keys = sorted(
            key for key in train.keys() | test.keys() if shown(train, key) != shown(test, key)
        )
        return ", ".join(
            f"{name}.{key} ({shown(train, key)} vs {shown(test, key)})" for key in keys
        )
    return f"{name} ({json.dumps(train)} vs {json.dumps(test)})"


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ProbeCreated,
    responses={200: {"model": ProbeCreated, "description": "Already complete: nothing queued."}},
)
def create_probe(
    body: ProbeCreate,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
    quota: JobQuotaDep,
) -> ProbeCreated:
    """Fit probes of one or more kinds on every requested layer, as one job."""
    check_id(body.train_featureset, field="train_featureset")
    check_id(body.test_featureset, field="test_featureset")
    with inputs_locked(queue.connection, [body.train_featureset, body.test_featureset]):
        spec = _probe_spec(body, store, queue.connection, settings)
        probe_id = spec.probe_id()
        submission = submit_result_job(
            store,
            queue,
            quota,
            group="probes",
            result_id=probe_id,
            attrs={
                "probe_id": probe_id,
                "spec": spec.model_dump(),
                "status": "pending",
                "rows": [],
                "best": {},
            },
            func="workers.jobs.run_probe",
            kind="probe",
            total=len(spec.kinds) * len(spec.layers),
            timeout=settings.probe_timeout,
        )
    if submission.status == "complete":
        response.status_code = status.HTTP_200_OK
    return ProbeCreated(
        probe_id=probe_id,
        job_id=submission.job_id,
        status=submission.status,
        created=submission.created,
    )


def _probe_spec(body: ProbeCreate, store: Store, redis: Redis, settings: Settings) -> ProbeSpec:
    check_id(body.train_featureset, field="train_featureset")
    check_id(body.test_featureset, field="test_featureset")
    train = store.featureset(body.train_featureset, field="train_featureset")
    test = store.featureset(body.test_featureset, field="test_featureset")
    for field, featureset in (("train_featureset", train), ("test_featureset", test)):
        require_complete(redis, store, featureset, field=field)
    if test.id == train.id:
        raise StoreError(
            f"test_featureset {test.id!r} is the train_featureset, and test accuracy on the "
            'training rows measures nothing; extract the test split (e.g. split "test" of '
            f"dataset {train.spec.dataset!r} with the same model and settings) and pass that "
            "feature set's id as test_featureset",
            field="test_featureset",
            value=test.id,
        )
    _check_disjoint(train, test)
    mismatch = pair_mismatch(PairFacts(train), PairFacts(test))
    if mismatch is not None:
        reason, fix = mismatch
        raise StoreError(
            f"train and test feature sets {reason}; {fix}",
            field="test_featureset",
            value=body.test_featureset,
        )
    train_labels = train.read_labels()
    check_classes(train_labels, test.read_labels(), "train_featureset", "test_featureset")

    layers = train.layers if body.layers == "all" else body.layers
    if not layers:
        raise StoreError(
            'layers is empty; pass "all" or a list of stored layers',
            field="layers",
            value=body.layers,
        )
    for layer in layers:
        try:
            train.layer_position(layer)
        except StoreError as exc:
            raise StoreError(exc.message, field="layers", value=layer) from exc
    kinds = [body.kind] if isinstance(body.kind, str) else list(body.kind)
    for kind in kinds:
        if kind not in PROBE_KINDS:
            raise StoreError(
                f"kind {kind!r} is not a probe kind; choose from {', '.join(PROBE_KINDS)}",
                field="kind",
                value=kind,
            )
    if not kinds:
        raise StoreError(
            f"kind is an empty list; name at least one probe kind ({', '.join(PROBE_KINDS)})",
            field="kind",
            value=body.kind,
        )
    repeated = sorted({kind for kind in kinds if kinds.count(kind) > 1})
    if repeated:
        raise StoreError(
            f"kind names {', '.join(repeated)} more than once; name each probe kind once",
            field="kind",
            value=body.kind,
        )
    if "adapter" in kinds and train.spec.model_family != "imagegpt":
        raise StoreError(
            f"adapter probes need an ImageGPT model, but feature set {train.id!r} comes from "
            f"{train.spec.model!r}, a {train.spec.model_family} model; use kind logistic, knn "
            "or mlp for it",
            field="kind",
            value="adapter",
        )
    params = _params_by_kind(body.params, kinds)
    for kind, kind_params in params.items():
        adapter_shape = None
        if kind == "adapter":
            n_fit = fit_part_size(kind_params, train_labels)
            adapter_shape = _adapter_fit_shape(
                store, settings, train, max(layers), n_fit, test.n_items
            )
        # The engines' own readers, without torch: a bad parameter fails before queueing.
        check_params(
            kind,
            kind_params,
            train_labels,
            adapter_shape=adapter_shape,
            adapter_limit=int(settings.adapter_fit_gib * 2**30),
        )
        params[kind] = normalise_params(kind, kind_params, train_labels, n_layers=len(set(layers)))
    return ProbeSpec(
        train_featureset=train.id,
        test_featureset=test.id,
        layers=sorted(set(layers)),
        # In name order: the kinds fit one after the other, so their order changes no result.
        kinds=sorted(kinds),
        params=params,
        seed=body.seed,
    )


def _adapter_fit_shape(
    store: Store, settings: Settings, train: FeatureSet, layer: int, n_fit: int, n_test: int
) -> AdapterFitShape:
    """Return the sizes of the adapter fit on ``layer``, from the config of the model that the
    worker loads (resolved with the arguments of `workers.extract.resolve_for_featureset`)."""
    ref = resolve_model(
        train.spec.model,
        models_dir=store.models_dir() if store.local_root else None,
        allowed_roots=settings.model_roots,
        allow_hub=settings.allow_hub,
        allow_list=settings.model_allow_list,
    )
    # The stored width is used as n_embd when the config leaves it out.
    config = {"n_embd": train.features.shape[2], **ref.vision_config}
    return adapter_fit_shape(
        config, seq_len=int(ref.n_tokens or 1), layer=layer, max_batch_items=max(n_fit, n_test)
    )


class PairFacts:
    """What the pairing and overlap checks compare of one feature set, read once.

    The spec is validated and dumped once, and the item ids are read on first use only, so
    that a request comparing many pairs reads each set's arrays at most once.
    """

    def __init__(self, featureset: FeatureSet) -> None:
        self.featureset = featureset
        self.id = featureset.id
        self.spec: dict[str, Any] = featureset.spec.model_dump()
        self.dim = int(featureset.features.shape[2])
        self.n_items = featureset.n_items
        self.class_names = list(featureset.attrs.get("class_names") or [])
        recorded = featureset.ids_span_splits
        # Created before this was recorded: of the sources, only digits numbers its items
        # across splits.
        self.ids_span_splits = self.spec["dataset"] == "digits" if recorded is None else recorded
        self._item_ids: np.ndarray | None = None

    def item_ids(self) -> np.ndarray:
        """Return the set's item ids, read from the store on the first call."""
        if self._item_ids is None:
            self._item_ids = self.featureset.read_item_ids()
        return self._item_ids

    def match_key(self) -> tuple[str, int]:
        """Return the fields of `MATCHING_FIELDS` and the width as one hashable value.

        Sets that `pair_mismatch` finds equal in those fields and the width have equal keys,
        so a caller looking for compatible pairs may compare only sets with equal keys.
        """
        fields = json.dumps([self.spec[name] for name in MATCHING_FIELDS], sort_keys=True)
        return fields, self.dim


def ids_comparable(train: PairFacts, test: PairFacts) -> bool:
    """Return whether the item ids of ``train`` and ``test`` number the same items.

    They do when both sets come from the same split of the same dataset, by the same reference
    or by another reference to the same content. They also do for two splits of a dataset
    whose ids name the same item in every split (the built-in digits).
    """
    same_split = train.spec["split"] == test.spec["split"]
    same_content = (
        same_split and train.spec["dataset_fingerprint"] == test.spec["dataset_fingerprint"]
    )
    same_dataset = train.spec["dataset"] == test.spec["dataset"]
    return same_content or (
        same_dataset and (same_split or (train.ids_span_splits and test.ids_span_splits))
    )


def count_shared_items(train: PairFacts, test: PairFacts) -> int:
    """Return how many items of ``test`` are items of ``train``, as far as their ids show.

    Returns 0 without reading ids when `ids_comparable` is false. POST /v1/probes rejects a
    pair with shared items, and the dashboard's probe-pairs route marks it incompatible.
    """
    if not ids_comparable(train, test):
        return 0
    return int(np.intersect1d(train.item_ids(), test.item_ids()).size)


def _check_disjoint(train: FeatureSet, test: FeatureSet) -> None:
    """Raise if ``test`` contains items of ``train`` (see `count_shared_items`)."""
    shared = count_shared_items(PairFacts(train), PairFacts(test))
    if shared:
        raise StoreError(
            f"test_featureset {test.id!r} shares {shared} of its {test.n_items} items with "
            f"train_featureset {train.id!r} (dataset {train.spec.dataset!r}, splits "
            f"{train.spec.split!r} and {test.spec.split!r}), so its test accuracy would count "
            "items the probe was trained on; extract a test split with no items in common "
            '(for the built-in digits, split "train" against split "test")',
            field="test_featureset",
            value=test.id,
        )


def pair_mismatch(train: PairFacts, test: PairFacts) -> tuple[str, str] | None:
    """Return why ``train`` and ``test`` cannot be probed together, and the fix, or None.

    Compares what needs no array reads: the fields of ``MATCHING_FIELDS``, the feature width
    and the class names. Names derived from labels ("0", "1", ...) cover the classes up to the
    largest label of each split, so only the names both lists have are compared. The reason
    reads after "train and test feature sets".
    """
    for name in MATCHING_FIELDS:
        if train.spec[name] != test.spec[name]:
            return (
                f"differ in {describe_difference(name, train.spec[name], test.spec[name])}",
                "extract both splits with the same model and settings",
            )
    if train.dim != test.dim:
        return (
            f"differ in dim ({train.dim} vs {test.dim})",
            "extract both splits with the same model, layers and pooling",
        )
    pairs = zip(train.class_names, test.class_names, strict=False)
    for index, (in_train, in_test) in enumerate(pairs):
        if in_train != in_test:
            return (
                f"name class {index} differently ({in_train!r} in dataset "
                f"{train.spec['dataset']!r}, {in_test!r} in dataset {test.spec['dataset']!r})",
                "extract the test split from a dataset with the same classes in the same order",
            )
    return None


def _params_by_kind(params: dict[str, Any], kinds: list[str]) -> dict[str, dict[str, Any]]:
    if params and all(key in PROBE_KINDS for key in params):
        unknown = [key for key in params if key not in kinds]
        if unknown:
            raise StoreError(
                f"params are given for {unknown!r}, which is not in kind {kinds!r}",
                field="params",
                value=unknown,
            )
        for kind, value in params.items():
            if not isinstance(value, dict):
                raise StoreError(
                    f"params.{kind} is {json.dumps(value)}, not an object; pass the "
                    f'{kind} hyper-parameters as an object, e.g. {{"{kind}": {{...}}}}',
                    field="params",
                    value=value,
                )
        return {kind: dict(params.get(kind, {})) for kind in kinds}
    if params and len(kinds) > 1:
        raise StoreError(
            "with several kinds, key params by kind, e.g. "
            '{"logistic": {"C": [1]}, "knn": {"k": [10]}}',
            field="params",
            value=params,
        )
    return {kind: dict(params) for kind in kinds}


def _read_probe(store: Store, redis: Any, probe_id: str) -> dict[str, Any]:
    check_id(probe_id, field="probe_id")
    stored = store.read_result("probes", probe_id)
    # A record without a spec is one whose creation was interrupted: nothing to show.
    if stored is None or "spec" not in stored:
        raise NotFoundError(
            f"probe {probe_id!r} not found; list probes with GET /v1/probes",
            field="probe_id",
            value=probe_id,
        )
    status, job_id, error = result_status(redis, store, probe_id, stored.get("status"))
    return {
        "probe_id": probe_id,
        "status": status,
        "spec": stored["spec"],
        "rows": stored.get("rows", []),
        "best": stored.get("best", {}),
        "job_id": job_id,
        "error": error,
    }


@router.get("", response_model=ProbesPublic)
def list_probes(store: StoreDep, redis: RedisDep) -> ProbesPublic:
    """List all probe results in the store."""
    data = []
    for probe_id in store.result_ids("probes"):
        try:
            data.append(ProbePublic.model_validate(_read_probe(store, redis, probe_id)))
        except NotFoundError:
            # Deleted while listing, or a record whose creation was interrupted.
            logger.warning("probe %s: no readable record, left out of the list", probe_id)
    return ProbesPublic(data=data, count=len(data))


@router.get("/{probe_id}", response_model=ProbePublic)
def read_probe(probe_id: str, store: StoreDep, redis: RedisDep) -> ProbePublic:
    """Per-layer metrics of a probe result."""
    return ProbePublic.model_validate(_read_probe(store, redis, probe_id))


def _complete_probe(store: Store, redis: Any, probe_id: str) -> dict[str, Any]:
    probe = _read_probe(store, redis, probe_id)
    if probe["status"] != "complete":
        raise NotReadyError(
            not_complete_message(
                "probe", probe_id, probe["status"], probe["job_id"], probe["error"]
            ),
            field="probe_id",
            value=probe_id,
        )
    return probe


@router.get("/{probe_id}/curve", response_model=CurvePublic)
def read_curve(probe_id: str, store: StoreDep, redis: RedisDep) -> CurvePublic:
    """Layer-accuracy curve per probe kind as JSON."""
    probe = _complete_probe(store, redis, probe_id)
    kinds: dict[str, list[dict[str, Any]]] = {}
    for row in probe["rows"]:
        kinds.setdefault(row["kind"], []).append(
            {
                k: row.get(k)
                for k in (
                    "layer",
                    "train_accuracy",
                    "val_accuracy",
                    "test_accuracy",
                    "test_accuracy_ci95",
                    "params",
                    "converged",
                )
            }
        )
    return CurvePublic(probe_id=probe_id, kinds=kinds, best=probe["best"])


def _check_accuracy(value: Any) -> Any:
    """Reject a value that is not a finite number from 0 to 1, NaN and infinity included.

    It runs before pydantic's own checks, whose messages for NaN ("should be less than or
    equal to 1") and for text would not name the allowed range.
    """
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number <= 1.0:
        raise PydanticCustomError(
            "accuracy_invalid", "invalid accuracy; pass a finite number from 0 to 1, e.g. 0.9"
        )
    return value


@router.get(
    "/{probe_id}/curve.png",
    responses={200: {"content": {"image/png": {}}}},
    response_class=Response,
)
def read_curve_png(
    probe_id: str,
    store: StoreDep,
    redis: RedisDep,
    baseline: Annotated[
        float | None,
        Query(ge=0, le=1, description="reference accuracy line"),
        BeforeValidator(_check_accuracy),
    ] = None,
    reference: Annotated[
        str | None,
        Query(
            max_length=2000,
            description="reference points layer:accuracy, comma-separated, e.g. 13:0.782,16:0.786",
        ),
    ] = None,
) -> Response:
    """Layer-accuracy curve as a PNG, best layer by validation accuracy marked."""
    probe = _complete_probe(store, redis, probe_id)
    rows_by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in probe["rows"]:
        rows_by_kind.setdefault(row["kind"], []).append(row)
    train = store.featureset(probe["spec"]["train_featureset"]).spec
    title = f"{train.model} on {train.dataset}: probe accuracy per layer ({train.pooling} pooling)"
    points = _reference_points(reference)
    _check_reference_layers(points, reference, [row["layer"] for row in probe["rows"]])
    png = figure_png(
        layer_curve_figure(rows_by_kind, title=title, baseline=baseline, reference=points)
    )
    return Response(png, media_type="image/png")


def _reference_points(text: str | None) -> list[tuple[int, float]]:
    """Parse ``"13:0.782,16:0.786"`` into [(13, 0.782), (16, 0.786)]."""
    points: list[tuple[int, float]] = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        layer, _, value = part.partition(":")
        try:
            point = (int(layer), float(value))
        except ValueError:
            point = (-1, -1.0)
        if point[0] < 0 or not 0.0 <= point[1] <= 1.0:
            raise StoreError(
                f"reference point {part.strip()!r} is invalid; pass layer:accuracy "
                "pairs with accuracy in [0, 1], e.g. 13:0.782,16:0.786",
                field="reference",
                value=text,
            )
        points.append(point)
    return points


def _check_reference_layers(
    points: list[tuple[int, float]], text: str | None, layers: list[int]
) -> None:
    """Raise unless every reference point lies within the probe's layer range (the x-axis)."""
    if not layers:
        return
    low, high = min(layers), max(layers)
    for layer, _ in points:
        if not low <= layer <= high:
            raise StoreError(
                f"reference point at layer {layer} is outside the probe's layers {low}..{high}; "
                f"pass reference points at layers {low}..{high}",
                field="reference",
                value=text,
            )


@router.get(
    "/{probe_id}/confusion.png",
    responses={200: {"content": {"image/png": {}}}},
    response_class=Response,
)
def read_confusion_png(
    probe_id: str,
    store: StoreDep,
    redis: RedisDep,
    layer: Annotated[int, Query(ge=0, description="hidden-state index")],
    kind: Annotated[str, Query(description="probe kind")] = "logistic",
) -> Response:
    """Test confusion matrix of one probe kind on one layer as a PNG."""
    probe = _complete_probe(store, redis, probe_id)
    kind_rows = [row for row in probe["rows"] if row["kind"] == kind]
    if not kind_rows:
        fitted_kinds = sorted({row["kind"] for row in probe["rows"]})
        raise StoreError(
            f"probe {probe_id!r} has no {kind!r} rows; pass kind as one of {fitted_kinds}",
            field="kind",
            value=kind,
        )
    rows = [row for row in kind_rows if row["layer"] == layer]
    if not rows:
        fitted_layers = sorted(row["layer"] for row in kind_rows)
        raise StoreError(
            f"layer {layer} is not among the layers of {kind} probe {probe_id!r}; pass one of "
            f"{fitted_layers}",
            field="layer",
            value=layer,
        )
    row = rows[0]
    names = row.get("class_names") or [str(c) for c in row["classes"]]
    train = store.featureset(probe["spec"]["train_featureset"]).spec
    title = (
        f"{train.model} on {train.dataset}: {kind} probe, layer {layer}\n"
        f"test accuracy {100 * row['test_accuracy']:.1f}% ({row['n_test']} items)"
    )
    png = confusion_png(np.asarray(row["confusion_matrix"]), class_names=names, title=title)
    return Response(png, media_type="image/png")
