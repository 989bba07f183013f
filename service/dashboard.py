"""The dashboard page, a static HTML and JavaScript client of the REST API at / and /dashboard.

The page and its assets need no API key because they contain no data. The page reads
everything through the ``/v1`` endpoints and `probe_pairs`, and sends the key that the user
enters as a bearer token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from redis import Redis

from service.auth import public
from service.deps import RedisDep, StoreDep
from service.jobs import require_complete
from service.routes.probes import PairFacts, count_shared_items, pair_mismatch
from store import FeatureSet, NotReadyError, Store, StoreError, check_id

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

router = APIRouter(tags=["dashboard"], include_in_schema=False)


@router.get("/")
@router.get("/dashboard")
@router.get("/dashboard/")  # a trailing slash is not redirected
@public
def read_dashboard() -> FileResponse:
    """Serve the dashboard page."""
    return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html")


@router.get("/dashboard/probe-pairs")
def probe_pairs(
    store: StoreDep,
    redis: RedisDep,
    train: Annotated[
        str | None,
        Query(
            description="id of the complete train feature set whose test candidates to list; "
            "the default pair's train set when left out"
        ),
    ] = None,
) -> dict[str, Any]:
    """List the complete feature sets that one complete train feature set can be probed against.

    The probe form uses this to preselect a pair that POST /v1/probes accepts and to disable
    test sets that it would reject. It needs the read scope, like every GET with data.

    Returns ``{"default": {"train": id, "test": id} or null, "train": id or null, "tests":
    [{"featureset_id", "compatible", "reason"}]}``. ``tests`` has one entry per complete
    feature set, compatible sets first and those of the same dataset and split "test" leading,
    so the response grows linearly with the number of sets.
    """
    if train is not None:
        check_id(train, field="train")
    facts = [PairFacts(featureset) for featureset in _complete_featuresets(store)]
    default = _default_pair(facts)
    train_id = train
    if train_id is None and default is not None:
        train_id = default["train"]
    tests: list[dict[str, Any]] = []
    if train_id is not None:
        train_facts = next((item for item in facts if item.id == train_id), None)
        if train_facts is None:
            _raise_not_complete(redis, store, train_id)
        tests = _test_candidates(train_facts, facts)
    return {"default": default, "train": train_id, "tests": tests}


def _test_candidates(train: PairFacts, facts: list[PairFacts]) -> list[dict[str, Any]]:
    """Return an entry for every set of ``facts`` as a test set of ``train``, best first."""
    ranked = []
    for test in facts:
        reason = incompatibility_reason(train, test)
        entry = {"featureset_id": test.id, "compatible": reason is None, "reason": reason}
        ranked.append(((0 if reason is None else 1, *_test_rank(train, test)), entry))
    # The sort is stable, so sets of equal rank stay in id order.
    ranked.sort(key=lambda item: item[0])
    return [entry for _, entry in ranked]


def _default_pair(facts: list[PairFacts]) -> dict[str, str] | None:
    """Return the pair the probe form preselects, or None when no pair is compatible.

    The train set is the first train split with a compatible test set, else the first set
    with one, and the test set is its best compatible candidate. Only sets with the same
    `PairFacts.match_key` are checked, in rank order, so item ids are read only for sets
    that could be compatible.
    """
    groups: dict[tuple[str, int], list[PairFacts]] = {}
    for item in facts:
        groups.setdefault(item.match_key(), []).append(item)
    trains = sorted(facts, key=lambda item: item.spec["split"] != "train")
    for train in trains:
        candidates = sorted(groups[train.match_key()], key=lambda test: _test_rank(train, test))
        for test in candidates:
            if incompatibility_reason(train, test) is None:
                return {"train": train.id, "test": test.id}
    return None


def _raise_not_complete(redis: Redis, store: Store, featureset_id: str) -> NoReturn:
    """Raise the error of POST /v1/probes for a train set that is missing or not complete."""
    featureset = store.featureset(featureset_id, field="train")  # raises if missing
    require_complete(redis, store, featureset, field="train")
    # Complete after all: it finished after the list above was read.
    raise NotReadyError(
        f"train feature set {featureset_id!r} completed while this request ran; send it again",
        field="train",
        value=featureset_id,
    )


def incompatibility_reason(train: PairFacts, test: PairFacts) -> str | None:
    """Return why POST /v1/probes would reject ``train`` with ``test``, or None.

    The checks are those of POST /v1/probes before it reads labels: a different set,
    `service.routes.probes.pair_mismatch` and `service.routes.probes.count_shared_items`.
    Test labels missing from train are found by POST /v1/probes only.
    """
    if train.id == test.id:
        return "the train feature set itself"
    mismatch = pair_mismatch(train, test)
    if mismatch is not None:
        return f"train and test {mismatch[0]}"
    shared = count_shared_items(train, test)
    if shared:
        return (
            f"train and test share {shared} of the test set's {test.n_items} items, so its "
            "accuracy would count items the probe was trained on"
        )
    return None


def _test_rank(train: PairFacts, test: PairFacts) -> tuple[int, ...]:
    """Sort key of a test candidate: same dataset first, then split "test", then another split."""
    return (
        0 if test.spec["dataset"] == train.spec["dataset"] else 1,
        0 if test.spec["split"] == "test" else 1,
        0 if test.spec["split"] != train.spec["split"] else 1,
    )


def _complete_featuresets(store: Store) -> list[FeatureSet]:
    """Return the complete feature sets of ``store`` in id order, skipping unreadable ones."""
    complete = []
    for featureset_id in store.featureset_ids():
        try:
            featureset = store.find_featureset(featureset_id)
            if featureset is not None and featureset.attrs.get("status") == "complete":
                complete.append(featureset)
        except (KeyError, OSError, StoreError) as exc:
            # Deleted while listing, or its creation did not finish: GET /v1/featuresets
            # logs those, so one debug line is enough here.
            logger.debug("probe pairs: feature set %s skipped: %s", featureset_id, exc)
    return complete


def install_dashboard(app: FastAPI) -> None:
    """Add the dashboard routes to ``app`` and serve its assets under /static."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
