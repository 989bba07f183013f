"""The rq job functions. The API enqueues them by dotted path, so it never imports this module.

Every job catches the project's own errors, records a readable message in the rq job's meta
(``meta["error"]`` with message, field and value) and re-raises, so the job is marked failed.

A job canceled through the API (``POST /v1/jobs/{id}/cancel``) has a cancel time in its layerbank
job record. Each rq job reads it when it starts, and probes, projections and pretraining read it
again while they run, at most once per `CANCEL_CHECK_SECONDS`. On finding it they raise
`JobCanceledError`, which rq records as a failure without retrying.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from redis.exceptions import RedisError
from rq import get_current_job
from rq.job import Job

from store import NotReadyError, Store, StoreError
from store.settings import Settings, get_settings
from workers.errors import JobCanceledError, ProbeError, WorkersError

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
_stores: dict[str, Store] = {}

# Redis hash the API's GET /metrics reads; key and field names must match service.metrics, which
# this module cannot import (nothing imports service).
METRICS_KEY = "layerbank:metrics"
# Hash of a layerbank job and its field that contains the time of a cancel. The names must match
# service.jobs, which this module cannot import.
JOB_RECORD_KEY = "layerbank:job:{}"
CANCELED_FIELD = "canceled"
# Fields of the same hash that record when the job's work ended and, for an extraction, the
# feature set's progress then. A job reads finished from them after its target is deleted.
FINISHED_FIELD = "finished"
FINISHED_PROGRESS_FIELD = "finished_progress"
# Sets fields of a job record only while the record exists, so that a late worker never
# writes a partial record of a job whose record was removed.
_HSET_IF_EXISTS = """
if redis.call('exists', KEYS[1]) == 1 then
    redis.call('hset', KEYS[1], unpack(ARGV))
    return 1
end
return 0
"""
# Minimum seconds between two reads of the cancel time by a running job.
CANCEL_CHECK_SECONDS = 1.0
# Minimum seconds between two warnings of a failed progress update, and when the next may come.
META_WARNING_SECONDS = 30
_next_meta_warning = 0.0


def _store(settings: Settings) -> Store:
    store = _stores.get(settings.store)
    if store is None:
        store = _stores[settings.store] = Store(settings.store)
    return store


def _set_meta(**values: Any) -> None:
    """Update the current rq job's meta; a Redis error is logged and the job goes on."""
    job = get_current_job()
    if job is None:
        return
    job.meta.update(values)
    try:
        job.save_meta()
    except RedisError as exc:
        # Progress is for display only: a Redis outage must not fail the block or fit.
        global _next_meta_warning
        if time.monotonic() >= _next_meta_warning:
            _next_meta_warning = time.monotonic() + META_WARNING_SECONDS
            logger.warning(
                "job %s (rq %s): progress not saved (%s); the next such warning comes %d s "
                "later at the earliest",
                job.meta.get("layerbank_job", "-"),
                job.id,
                exc,
                META_WARNING_SECONDS,
            )


def _publish_metrics(increments: dict[str, float], latest: dict[str, float]) -> None:
    """Add ``increments`` to and set ``latest`` in the metrics hash; a Redis error is logged."""
    job = get_current_job()
    if job is None:
        return
    pipe = job.connection.pipeline(transaction=False)
    for field, amount in increments.items():
        if isinstance(amount, int):
            pipe.hincrby(METRICS_KEY, field, amount)
        else:
            pipe.hincrbyfloat(METRICS_KEY, field, amount)
    if latest:
        pipe.hset(METRICS_KEY, mapping=latest)
    try:
        pipe.execute()
    except RedisError:
        # The job's result matters more than its metrics: log and carry on.
        logger.exception(
            "job %s (rq %s): metrics not published", job.meta.get("layerbank_job", "-"), job.id
        )


def _record_finished(progress: dict[str, int] | None = None) -> None:
    """Record in the current job's layerbank job record that its work ended complete.

    A Redis error is logged: the stored result already shows the end, and the record only
    keeps the job reading finished after its target is deleted.
    """
    job = get_current_job()
    job_id = job.meta.get("layerbank_job") if job is not None else None
    if job is None or not job_id:
        return
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    fields: list[str] = [FINISHED_FIELD, now]
    if progress is not None:
        fields += [FINISHED_PROGRESS_FIELD, json.dumps(progress)]
    try:
        job.connection.eval(_HSET_IF_EXISTS, 1, JOB_RECORD_KEY.format(job_id), *fields)
    except RedisError:
        logger.exception("job %s (rq %s): end not recorded", job_id, job.id)


def _raise_if_canceled(job: Job) -> None:
    """Raise `JobCanceledError` if the layerbank job of ``job`` has a cancel time."""
    job_id = job.meta.get("layerbank_job")
    if not job_id:
        return
    canceled_at = job.connection.hget(JOB_RECORD_KEY.format(job_id), CANCELED_FIELD)
    if canceled_at is None:
        return
    # rq retries a failed job while it has retries left, and a canceled job must not run again.
    job.retries_left = 0
    when = canceled_at.decode() if isinstance(canceled_at, bytes) else canceled_at
    raise JobCanceledError(
        f"canceled by request at {when}; resume it with POST /v1/jobs/{job_id}/resume",
        field="job_id",
        value=job_id,
    )


class CancelCheck:
    """A callable that raises `JobCanceledError` once the current rq job's layerbank job is
    canceled.

    It reads Redis at most once per ``interval`` seconds, so a training loop may call it every
    step. A failed read is logged and skipped, so a Redis error never ends a run through this
    check.
    """

    def __init__(self, interval: float = CANCEL_CHECK_SECONDS) -> None:
        self.job = get_current_job()
        self.interval = interval
        self._next_check = 0.0
        self._failures = 0

    def __call__(self, *, now: bool = False) -> None:
        """Read the cancel time, unless it was read less than ``interval`` seconds ago.

        ``now=True`` reads it in any case, as before a result is written. A short fit may end
        between two reads, and a canceled job must not then write its result."""
        clock = time.monotonic()
        if self.job is None or (clock < self._next_check and not now):
            return
        self._next_check = clock + self.interval
        try:
            _raise_if_canceled(self.job)
        except RedisError:
            self._failures += 1
            # One line per failure streak, because a Redis outage fails every check.
            if self._failures == 1:
                logger.exception("job %s: reading its cancel time failed", self.job.id)
            return
        if self._failures:
            logger.info(
                "job %s: cancel time read again after %d failed reads", self.job.id, self._failures
            )
            self._failures = 0


def recorded_errors(func: F) -> F:
    """Record the message of a failed job in its meta before rq marks it failed."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        job = get_current_job()
        # Every line names the layerbank job, the rq job and the target (feature set and block,
        # probe or model), so one grep over the worker logs follows a job across machines.
        ids = (
            job.meta.get("layerbank_job", "-") if job else "-",
            job.id if job else "-",
            func.__name__,
            ", ".join(repr(arg) for arg in args),
        )
        logger.info("job %s (rq %s): %s(%s) started", *ids)
        started = time.perf_counter()
        try:
            if job is not None:
                _raise_if_canceled(job)
            result = func(*args, **kwargs)
        except JobCanceledError as exc:
            logger.info("job %s (rq %s): %s(%s) stopped: %s", *ids, exc.message)
            _set_meta(error=_error_meta(exc))
            raise
        except (WorkersError, StoreError) as exc:
            logger.exception("job %s (rq %s): %s(%s) failed", *ids)
            _set_meta(error=_error_meta(exc))
            if job is not None and getattr(exc, "permanent", False):
                job.retries_left = 0  # A retry would fail the same way.
            raise
        except Exception as exc:
            logger.exception("job %s (rq %s): %s(%s) failed", *ids)
            _set_meta(
                error={
                    "message": f"{type(exc).__name__}: {exc}",
                    "field": None,
                    "value": None,
                    "type": type(exc).__name__,
                }
            )
            raise
        logger.info("job %s (rq %s): %s(%s) finished in %.2fs", *ids, time.perf_counter() - started)
        return result

    return wrapper  # type: ignore[return-value]


def _error_meta(exc: WorkersError | StoreError) -> dict[str, Any]:
    return {
        "message": exc.message,
        "field": exc.field,
        "value": _jsonable(exc.value),
        "type": type(exc).__name__,
        "permanent": bool(getattr(exc, "permanent", False)),
    }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and len(value) <= 100:
        return [_jsonable(item) for item in value]  # A grid such as [1200] stays a list.
    return repr(value)


@recorded_errors
def extract_block(featureset_id: str, block: int) -> dict[str, Any]:
    """Compute and write one block of a feature set."""
    from workers.extract import extract_block as run

    settings = get_settings()

    def on_batch(done: int, total: int) -> None:
        _set_meta(progress={"rows_done": done, "rows_total": total})

    store = _store(settings)
    result = run(store, featureset_id, block, settings=settings, on_batch=on_batch)
    # The block that completes the set marks it complete. The finalize job does the same, but
    # rq can leave a job whose dependencies finished waiting for a later maintenance pass.
    featureset = store.featureset(featureset_id)
    if not featureset.is_complete and not featureset.missing_blocks():
        featureset.mark_complete()
    if featureset.is_complete:
        _record_finished(featureset.progress().as_dict())
    if not result.skipped:
        _publish_metrics(
            {
                "blocks_written": 1,
                "images_extracted": result.rows,
                "extraction_seconds": result.seconds,
            },
            {"last_block_images_per_second": result.rows / max(result.seconds, 1e-9)},
        )
    return result.as_dict()


@recorded_errors
def finalize_featureset(featureset_id: str) -> dict[str, Any]:
    """Mark a feature set complete once every block is written."""
    store = _store(get_settings())
    featureset = store.find_featureset(featureset_id)
    if featureset is None:
        # rq can run a held-back finalize job late, after the set was deleted.
        logger.info("feature set %s: deleted before its finalize job ran", featureset_id)
        return {"featureset_id": featureset_id, "status": "deleted"}
    if not featureset.mark_complete():
        missing = featureset.missing_blocks()
        progress = featureset.progress()
        raise NotReadyError(
            f"feature set {featureset_id!r} has {len(missing)} missing blocks "
            f"(first: {missing[:5]}); resume its job to re-run them",
            field="featureset_id",
            value=featureset_id,
            progress=progress.as_dict(),
        )
    _record_finished(featureset.progress().as_dict())
    return {"featureset_id": featureset_id, "status": "complete"}


@recorded_errors
def run_probe(probe_id: str) -> dict[str, Any]:
    """Fit every requested probe kind on every requested layer and store the rows."""
    from workers.probes import fit_probes

    store = _store(get_settings())
    settings = get_settings()
    attrs = store.read_result("probes", probe_id)
    if attrs is None:
        raise ProbeError(f"probe {probe_id!r} has no stored spec", field="probe_id", value=probe_id)
    spec = attrs["spec"]
    train = store.featureset(spec["train_featureset"])
    test = store.featureset(spec["test_featureset"])
    train.require_complete()
    test.require_complete()
    positions = [train.layer_position(layer) for layer in spec["layers"]]
    y_train, y_test = train.read_labels(), test.read_labels()
    class_names = train.attrs.get("class_names") or None
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    total = len(spec["kinds"]) * len(positions)
    # Shown from the start: the torch engine reports progress only when a batch of layers ends.
    _set_meta(progress={"done": 0, "total": total})
    check_canceled = CancelCheck()

    # The engines read the Zarr arrays one layer (or one batch of layers) at a time. Memory then
    # contains one layer per split, not layers x items x dim floats, which is about 2.6 GB for
    # CIFAR-10 train with 25 layers of width 512 in float32.
    for kind_index, kind in enumerate(spec["kinds"]):

        def progress(done: int, _total: int, offset: int = kind_index * len(positions)) -> None:
            _set_meta(progress={"done": offset + done, "total": total})
            check_canceled()

        if kind == "adapter":
            kind_rows = _fit_adapters(store, settings, train, test, spec, progress, check_canceled)
        else:
            kind_rows = fit_probes(
                kind,
                train.by_position(),
                y_train,
                test.by_position(),
                y_test,
                layers=positions,
                params=dict(spec["params"].get(kind, {})),
                seed=spec["seed"],
                class_names=class_names,
                device=settings.resolved_device(),
                progress=progress,
                check=check_canceled,
            )
        for row, layer in zip(kind_rows, spec["layers"], strict=True):
            row["layer"] = layer
            rows.append(row)

    best = _best_rows(rows)
    fit_seconds = time.perf_counter() - started
    check_canceled(now=True)
    store.write_result(
        "probes",
        probe_id,
        {
            "status": "complete",
            "rows": rows,
            "best": best,
            "fit_seconds": round(fit_seconds, 3),
        },
    )
    _publish_metrics(
        {"probe_fits": 1, "probe_fit_seconds": fit_seconds}, {"last_probe_fit_seconds": fit_seconds}
    )
    logger.info("probe %s: %d rows stored in %.1fs", probe_id, len(rows), fit_seconds)
    _record_finished()
    return {"probe_id": probe_id, "rows": len(rows)}


def _fit_adapters(
    store: Store,
    settings: Settings,
    train: Any,
    test: Any,
    spec: dict[str, Any],
    progress: Callable[[int, int], None],
    check: Callable[[], None],
) -> list[dict[str, Any]]:
    """Train adapter probes from the images and model behind two feature sets, layer by layer.

    ``check`` runs after each epoch and raises to stop the fit (a canceled job)."""
    from workers.adapters import fit_adapter
    from workers.extract import load_featureset_split, resolve_for_featureset
    from workers.imagegpt import build_input_ids
    from workers.models import ImageGPTAdapter, load_model

    ref = resolve_for_featureset(train, settings, store)
    if ref.family != "imagegpt":
        raise ProbeError(
            f"adapter probes need an ImageGPT model, but {ref.ref!r} is a "
            f"{ref.family} model; use kind logistic, knn or mlp for it",
            field="kind",
            value="adapter",
        )
    model = cast(
        ImageGPTAdapter,
        load_model(
            ref,
            device=settings.resolved_device(),
            input_policy=train.spec.processor.get("input_policy"),
        ),
    )
    # Rows of a feature set are the split's items in order, so labels and inputs line up.
    inputs = [
        build_input_ids(
            model.tokens(load_featureset_split(featureset, settings).images),
            policy=model.input_policy,
            sos_token=model.sos_token,
        )
        for featureset in (train, test)
    ]  # (n_items, seq) each
    rows = []
    for index, layer in enumerate(spec["layers"]):
        rows.append(
            fit_adapter(
                model.model,
                inputs[0],
                train.read_labels(),
                inputs[1],
                test.read_labels(),
                layer=layer,
                pooling=train.spec.pooling,
                params=spec["params"].get("adapter", {}),
                seed=spec["seed"],
                class_names=train.attrs.get("class_names") or None,
                progress=lambda _epoch, _epochs: check(),
            )
        )
        progress(index + 1, len(spec["layers"]))
    return rows


@recorded_errors
def run_projection(projection_id: str) -> dict[str, Any]:
    """Compute a 2-D projection of one stored layer and write its coordinates."""
    from workers.projections import run_projection as run

    # The projection checks twice, the second time right before it writes. Both checks read
    # Redis, so a cancel that arrives while a fast projection runs keeps it from writing.
    check = CancelCheck(interval=0.0)
    result = run(_store(get_settings()), projection_id, check_canceled=check)
    _record_finished()
    return result


def _best_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Return, per probe kind, the row with the highest validation accuracy."""
    best: dict[str, Any] = {}
    for row in rows:
        current = best.get(row["kind"])
        if current is None or row["val_accuracy"] > current["val_accuracy"]:
            best[row["kind"]] = {k: row[k] for k in ("layer", "val_accuracy", "test_accuracy")}
    return best


@recorded_errors
def pretrain(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Pretrain a small ImageGPT and store it as ``store:<name>``."""
    from workers.pretrain import PretrainParams, pretrain_imagegpt

    settings = get_settings()
    store = _store(settings)

    def progress(step: int, steps: int, record: dict[str, float]) -> None:
        _set_meta(progress={"done": step, "total": steps, **record})

    record = pretrain_imagegpt(
        PretrainParams.model_validate(params),
        store.models_dir() / name,
        device=settings.resolved_device(),
        data_roots=settings.data_roots,
        progress=progress,
        check_canceled=CancelCheck(),
    )
    _record_finished()
    return {
        "model": f"store:{name}",
        "final_val_loss": record["final_val_loss"],
        "seconds": record["seconds"],
    }
