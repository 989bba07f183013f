"""The dashboard page, a static HTML and JavaScript client of the REST API at / and /dashboard.

The page and its assets need no API key because they contain no data. The page reads
everything through the ``/v1`` endpoints and `probe_pairs`, and sends the key that the user
enters as a bearer token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service.auth import public
from service.deps import StoreDep
from service.routes.probes import PairFacts, count_shared_items, pair_mismatch
from store import FeatureSet, Store, StoreError

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
def probe_pairs(store: StoreDep) -> dict[str, Any]:
    """List, for each complete feature set, the complete feature sets it can be probed against.

    The probe form uses this to preselect a pair that POST /v1/probes accepts and to disable
    test sets that it would reject. It needs the read scope, like every GET with data.

    Returns ``{"default": {"train": id, "test": id} or null, "tests": {train id: [{
    "featureset_id", "compatible", "reason"}]}}``, each list with the compatible sets first,
    those of the same dataset and split "test" leading.
    """
    complete = _complete_featuresets(store)
    by_id = {featureset.id: featureset for featureset in complete}
    facts = {featureset.id: PairFacts(featureset) for featureset in complete}
    tests: dict[str, list[dict[str, Any]]] = {}
    for train in complete:
        entries: list[dict[str, Any]] = []
        for test in complete:
            reason = incompatibility_reason(facts[train.id], facts[test.id])
            entries.append(
                {"featureset_id": test.id, "compatible": reason is None, "reason": reason}
            )
        entries.sort(key=lambda entry: _test_rank(train, by_id[entry["featureset_id"]], entry))
        tests[train.id] = entries
    # The first train split with a compatible test set, else any set with one.
    candidates = sorted(
        (train_id for train_id, entries in tests.items() if entries and entries[0]["compatible"]),
        key=lambda train_id: by_id[train_id].spec.split != "train",
    )
    default = None
    if candidates:
        default = {"train": candidates[0], "test": tests[candidates[0]][0]["featureset_id"]}
    return {"default": default, "tests": tests}


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


def _test_rank(train: FeatureSet, test: FeatureSet, entry: dict[str, Any]) -> tuple[int, ...]:
    """Sort key of a test candidate: compatible first, then same dataset, then split "test"."""
    return (
        0 if entry["compatible"] else 1,
        0 if test.spec.dataset == train.spec.dataset else 1,
        0 if test.spec.split == "test" else 1,
        0 if test.spec.split != train.spec.split else 1,
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
