"""The dashboard page in headless Chromium, driven over the DevTools protocol, against live APIs."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_job

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,1600",
)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


class Page:
    """One browser tab, driven through the DevTools protocol over a WebSocket."""

    def __init__(self, websocket_url: str) -> None:
        from websockets.sync.client import connect

        self._socket = connect(websocket_url, max_size=None, open_timeout=10)
        self._next_id = 0

    def close(self) -> None:
        self._socket.close()

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result; events in between are dropped."""
        self._next_id += 1
        message_id = self._next_id
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=30))
            if message.get("id") != message_id:
                continue
            if "error" in message:
                raise RuntimeError(f"{method} failed: {message['error']}")
            return message["result"]  # type: ignore[no-any-return]

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` until it is truthy and return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still falsy after {timeout:.0f}s")
            time.sleep(0.2)

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Page]]:
    """Headless Chromium with an empty profile; yields a factory of fresh tabs."""
    executable = chromium_path()
    if executable is None:
        pytest.skip("Chromium is not installed; run tests/install_browser.sh to install it")
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = subprocess.Popen(
        [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pages: list[Page] = []
    try:
        # Chromium writes the port it picked to DevToolsActivePort in the profile directory.
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"Chromium did not start (exit code {process.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])

        def new_page() -> Page:
            target = httpx.put(f"http://127.0.0.1:{port}/json/new?about:blank", timeout=10).json()
            page = Page(target["webSocketDebuggerUrl"])
            pages.append(page)
            return page

        yield new_page
    finally:
        for page in pages:
            page.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def dashboard_data(client: Any, tiny_model: Path) -> dict[str, str]:
    """Train and test feature sets of the tiny model on digits and a finished logistic probe."""
    ids = {}
    for split, limit in (("train", 300), ("test", 200)):
        answer = client.extract(
            str(tiny_model),
            "digits",
            split,
            layers="all",
            limit=limit,
            block_rows=100,
            batch_size=50,
        )
        state = wait_job(client, answer["job_id"])
        assert state is None or state["status"] == "finished", state
        ids[split] = answer["featureset_id"]
    answer = client.probe(ids["train"], ids["test"], kind="logistic", params={"C": [1.0]})
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state
    ids["probe"] = answer["probe_id"]
    return ids


@pytest.fixture(scope="module")
def keyed_api(settings: Any, redis_server: Any) -> Iterator[tuple[str, str]]:
    """A second API that requires keys, on Redis database 1, so the session's API stays open.

    Yields (base URL, read key). It shares the store with the session's API but has no workers.
    """
    import uvicorn
    from redis import Redis

    from service.app import create_app
    from service.auth import KeyStore
    from service.launcher import free_port, wait_for_http

    redis_url = redis_server.url.rsplit("/", 1)[0] + "/1"
    keyed_settings = settings.model_copy(update={"redis_url": redis_url, "auth": "required"})
    key = KeyStore(Redis.from_url(redis_url)).create("dashboard-test", "read")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(keyed_settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz")
    yield url, key
    server.should_exit = True
    thread.join(timeout=10)


def featureset_row(featureset_id: str) -> str:
    return f"document.querySelector('#featuresets tr[data-id=\"{featureset_id}\"]') !== null"


CURVE_LOADED = (
    "(() => { const img = document.getElementById('curve'); "
    "return img.complete && img.naturalWidth > 0 ? img.naturalWidth : 0; })()"
)


def test_dashboard_served_at_root_and_path(api_url: str) -> None:
    for path in ("/", "/dashboard", "/dashboard/"):
        response = httpx.get(f"{api_url}{path}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "<title>layerbank dashboard</title>" in response.text
    script = httpx.get(f"{api_url}/static/dashboard.js")
    assert script.status_code == 200


def test_dashboard_lists_featureset_and_curve(
    browser: Callable[[], Page], api_url: str, dashboard_data: dict[str, str], tmp_path: Path
) -> None:
    page = browser()
    page.open(f"{api_url}/dashboard")
    assert page.wait_for(featureset_row(dashboard_data["train"]))
    status = page.evaluate(
        f"document.querySelector('#featuresets tr[data-id="
        f'"{dashboard_data["train"]}"] td:nth-child(2)\').textContent'
    )
    assert status == "complete"
    page.evaluate(
        f"document.querySelector('#probes tr[data-id=\"{dashboard_data['probe']}\"]').click()"
    )
    assert page.wait_for(CURVE_LOADED) > 0
    layers = page.evaluate(
        "[...document.querySelectorAll('#probe-rows tbody tr')].map(r => r.children[1].textContent)"
    )
    assert layers == ["0", "1", "2"]
    page.screenshot(tmp_path / "dashboard.png")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_dashboard_probe_form_starts_job(
    browser: Callable[[], Page], api_url: str, client: Any, dashboard_data: dict[str, str]
) -> None:
    page = browser()
    page.open(f"{api_url}/dashboard")
    page.wait_for(
        f"document.querySelector('#probe-train option[value="
        f'"{dashboard_data["train"]}"]\') !== null'
    )
    # As a user's pick does: the test list then contains this train set's candidates, and a
    # test set disabled for the previous train set would not be submitted.
    select_train(page, dashboard_data["train"])
    page.evaluate(f"""(() => {{
        const form = document.getElementById('probe-form');
        form.test.value = {json.dumps(dashboard_data["test"])};
        for (const box of form.querySelectorAll('input[name=kind]')) {{
            box.checked = box.value === 'knn';
        }}
        form.layers.value = '1,2';
        form.querySelector('button[type=submit]').click();
    }})()""")
    job_id = page.wait_for(
        "(document.querySelector('#jobs tbody tr') || {dataset: {}}).dataset.jobId"
    )
    state = wait_job(client, job_id)
    assert state is not None
    assert state["kind"] == "probe"
    assert state["status"] == "finished"
    result = client.probe_result(state["target_id"])
    assert result["spec"]["kinds"] == ["knn"]
    assert [row["layer"] for row in result["rows"]] == [1, 2]


def test_dashboard_bad_layers_shows_message(
    browser: Callable[[], Page], api_url: str, tiny_model: Path
) -> None:
    page = browser()
    page.open(f"{api_url}/dashboard")
    page.evaluate(f"""(() => {{
        const form = document.getElementById('extract-form');
        form.model.value = {json.dumps(str(tiny_model))};
        form.layers.value = '0,30';
        form.querySelector('button[type=submit]').click();
    }})()""")
    message = page.wait_for(
        "document.querySelector('#extract-form .form-message.error')?.textContent"
    )
    assert message.startswith("HTTP 422: ")


def test_dashboard_projections_match_endpoint(
    browser: Callable[[], Page], api_url: str, client: Any, dashboard_data: dict[str, str]
) -> None:
    listing = httpx.get(f"{api_url}/v1/projections")
    if listing.status_code == 404:
        page = browser()
        page.open(f"{api_url}/dashboard")
        page.wait_for(featureset_row(dashboard_data["train"]))
        assert page.evaluate("document.getElementById('projections-section').hidden") is True
        return
    answer = client.request(
        "POST",
        "/v1/projections",
        json={
            "featureset": dashboard_data["test"],
            "layer": 1,
            "method": "pca",
            "n_points": 100,
        },
    ).json()
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state
    page = browser()
    page.open(f"{api_url}/dashboard")
    width = page.wait_for(
        f"(() => {{ const img = document.querySelector('#projections figure[data-id="
        f'"{answer["projection_id"]}"] img\'); '
        "return img && img.complete ? img.naturalWidth : 0; })()"
    )
    assert width > 0
    assert page.evaluate("document.getElementById('projections-section').hidden") is False


def test_dashboard_sends_stored_api_key(
    browser: Callable[[], Page], keyed_api: tuple[str, str], dashboard_data: dict[str, str]
) -> None:
    url, key = keyed_api
    page = browser()
    page.open(f"{url}/dashboard")
    error = page.wait_for("document.querySelector('#api-status.error')?.textContent")
    assert error.startswith("HTTP 401")
    page.evaluate(f"""(() => {{
        document.getElementById('api-key').value = {json.dumps(key)};
        document.querySelector('#key-form button[type=submit]').click();
    }})()""")
    assert page.wait_for(featureset_row(dashboard_data["test"]))
    assert page.evaluate(f"sessionStorage.getItem('layerbank.apiKey') === {json.dumps(key)}")
    page.evaluate(
        f"document.querySelector('#probes tr[data-id=\"{dashboard_data['probe']}\"]').click()"
    )
    assert page.wait_for(CURVE_LOADED) > 0


def probe_rows_by_header(page: Page, probe_id: str, n_rows: int) -> list[dict[str, str]]:
    """Select ``probe_id`` on the page and return its detail table as header -> text dicts."""
    page.wait_for(f"document.querySelector('#probes tr[data-id=\"{probe_id}\"]') !== null")
    page.evaluate(f"document.querySelector('#probes tr[data-id=\"{probe_id}\"]').click()")
    page.wait_for(
        f"document.querySelectorAll('#probe-rows tbody tr').length === {n_rows} && "
        f"document.getElementById('probe-title').textContent.includes({json.dumps(probe_id)})"
    )
    headers = page.evaluate(
        "[...document.querySelectorAll('#probe-rows thead th')].map(th => th.textContent)"
    )
    cells = page.evaluate(
        "[...document.querySelectorAll('#probe-rows tbody tr')]"
        ".map(r => [...r.children].map(td => td.textContent))"
    )
    return [dict(zip(headers, row, strict=True)) for row in cells]


def test_dashboard_probe_rows_match_api(
    browser: Callable[[], Page], api_url: str, client: Any, dashboard_data: dict[str, str]
) -> None:
    """Every column of the per-layer table shows the API's value, the 95% CI as its bounds."""
    result = client.probe_result(dashboard_data["probe"])
    page = browser()
    page.open(f"{api_url}/dashboard")
    table = probe_rows_by_header(page, dashboard_data["probe"], len(result["rows"]))
    for row, texts in zip(result["rows"], table, strict=True):
        low, high = row["test_accuracy_ci95"]
        assert texts["kind"] == row["kind"]
        assert texts["layer"] == str(row["layer"])
        assert texts["train acc"] == f"{row['train_accuracy']:.4f}"
        assert texts["val acc"] == f"{row['val_accuracy']:.4f}"
        assert texts["test acc"] == f"{row['test_accuracy']:.4f}"
        assert texts["test 95% CI"] == f"{low:.4f}-{high:.4f}"
        assert texts["converged"] == ("yes" if row["converged"] else "no")
        shown_params = dict(pair.split("=", 1) for pair in texts["params"].split(", "))
        assert shown_params.keys() == row["params"].keys()
        for name, value in row["params"].items():
            assert float(shown_params[name]) == value


def probe_candidates(api_url: str, train: str) -> dict[str, dict[str, Any]]:
    """Return the test candidates of ``train`` from the probe-pairs route, by feature set id."""
    pairs = httpx.get(f"{api_url}/dashboard/probe-pairs", params={"train": train}, timeout=30)
    assert pairs.status_code == 200, pairs.text
    return {entry["featureset_id"]: entry for entry in pairs.json()["tests"]}


def select_train(page: Page, train: str) -> None:
    """Pick ``train`` in the probe form and wait until its test candidates are shown."""
    page.evaluate(f"""(() => {{
        const select = document.getElementById('probe-train');
        select.value = {json.dumps(train)};
        select.dispatchEvent(new Event('change'));
    }})()""")
    page.wait_for(f"document.getElementById('probe-test').dataset.train === {json.dumps(train)}")


@pytest.fixture(scope="module")
def incompatible_test_set(api_url: str, client: Any, dashboard_data: dict[str, str]) -> str:
    """A complete test split of the tiny model that the dashboard's train set cannot be probed
    against (one layer fewer), with the lowest id of 180 candidate limits.

    GET /v1/featuresets lists by id, and a form that took the first "test" split picked the
    lowest id. The id is content-addressed (the spec with the subset's fingerprint), so the
    limit is found without extracting anything. Whether it sorts first depends on the ids the
    session's other tests created, so the tests below check the pairs, not the order.
    """
    from store import FeatureSetSpec
    from workers.datasets import load_split

    spec = httpx.get(f"{api_url}/v1/featuresets/{dashboard_data['test']}").json()["spec"]
    layers = spec["layers"][:-1]
    candidates = {}
    for limit in range(20, 200):
        fingerprint = load_split("digits", "test", limit=limit).fingerprint
        candidates[limit] = FeatureSetSpec.model_validate(
            {**spec, "layers": layers, "limit": limit, "dataset_fingerprint": fingerprint}
        ).featureset_id()
    limit = min(candidates, key=candidates.__getitem__)
    answer = client.extract(
        spec["model"], "digits", "test", layers=layers, limit=limit, block_rows=100, batch_size=50
    )
    assert answer["featureset_id"] == candidates[limit]
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state
    return str(answer["featureset_id"])


def test_probe_pairs_endpoint_marks_incompatible(
    api_url: str, dashboard_data: dict[str, str], incompatible_test_set: str
) -> None:
    entries = probe_candidates(api_url, dashboard_data["train"])
    assert entries[dashboard_data["test"]]["compatible"] is True
    assert entries[dashboard_data["test"]]["reason"] is None
    assert entries[incompatible_test_set]["compatible"] is False
    assert "layers" in entries[incompatible_test_set]["reason"]
    assert entries[dashboard_data["train"]]["compatible"] is False


def test_dashboard_preselects_compatible_probe_pair(
    browser: Callable[[], Page],
    api_url: str,
    client: Any,
    dashboard_data: dict[str, str],
    incompatible_test_set: str,
) -> None:
    page = browser()
    page.open(f"{api_url}/dashboard")
    page.wait_for(
        f"document.querySelector('#probe-train option[value=\"{incompatible_test_set}\"]') !== null"
    )
    train = page.evaluate("document.getElementById('probe-train').value")
    test = page.evaluate("document.getElementById('probe-test').value")
    assert train != ""
    assert test != ""
    assert test != incompatible_test_set
    # The API must accept the preselected pair: knn on its first stored layer is the quickest
    # probe. Which sets the pair contains depends on the session's other tests.
    first_layer = client.featureset(train)["layer_map"][0]["layer"]
    answer = client.probe(train, test, kind="knn", layers=[first_layer])
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state


def test_dashboard_disables_incompatible_test_sets(
    browser: Callable[[], Page],
    api_url: str,
    dashboard_data: dict[str, str],
    incompatible_test_set: str,
) -> None:
    page = browser()
    page.open(f"{api_url}/dashboard")
    option = f"document.querySelector('#probe-test option[value=\"{incompatible_test_set}\"]')"
    page.wait_for(f"{option} !== null")
    select_train(page, dashboard_data["train"])
    assert page.evaluate(f"{option}.disabled") is True
    assert "not compatible" in page.evaluate(f"{option}.textContent")
    assert "layers" in page.evaluate(f"{option}.title")
    # The selection is a compatible set; other tests may have stored more than one.
    selected = page.evaluate("document.getElementById('probe-test').value")
    entries = probe_candidates(api_url, dashboard_data["train"])
    compatible = [featureset_id for featureset_id, e in entries.items() if e["compatible"]]
    assert selected in compatible
    assert dashboard_data["test"] in compatible
    # Picking the incompatible set as train leaves the test set of other layers disabled.
    select_train(page, incompatible_test_set)
    requested = page.evaluate(
        "performance.getEntriesByType('resource').map(entry => entry.name)"
        ".filter(name => name.includes('/dashboard/probe-pairs'))"
    )
    assert any(f"train={incompatible_test_set}" in url for url in requested)
    test_option = (
        f"document.querySelector('#probe-test option[value=\"{dashboard_data['test']}\"]')"
    )
    assert page.evaluate(f"{test_option}.disabled") is True
    assert page.evaluate("document.getElementById('probe-test').value") != dashboard_data["test"]


@pytest.fixture(scope="module")
def overlapping_pixel_sets(client: Any) -> dict[str, str]:
    """Raw-pixel feature sets of digits: the whole test split, its first 35 items, and 45
    items of the train split, which shares no item with the test split."""
    requests = {
        "test_all": ("test", {}),
        "test_35": ("test", {"limit": 35}),
        "train_45": ("train", {"limit": 45}),
    }
    ids = {}
    for name, (split, options) in requests.items():
        answer = client.extract("pixels", "digits", split, **options)
        state = wait_job(client, answer["job_id"], timeout=120)
        assert state is None or state["status"] == "finished", state
        ids[name] = answer["featureset_id"]
    return ids


def test_probe_pairs_marks_overlapping_sets(
    api_url: str, overlapping_pixel_sets: dict[str, str]
) -> None:
    """A test set sharing items with the train set is incompatible, as POST /v1/probes finds."""
    full, subset = overlapping_pixel_sets["test_all"], overlapping_pixel_sets["test_35"]
    entries = probe_candidates(api_url, full)
    assert entries[subset]["compatible"] is False
    assert "share 35 of the test set's 35 items" in entries[subset]["reason"]
    assert entries[overlapping_pixel_sets["train_45"]]["compatible"] is True
    reverse = probe_candidates(api_url, subset)
    assert reverse[full]["compatible"] is False
    assert "share 35 of the test set's" in reverse[full]["reason"]
    response = httpx.post(
        f"{api_url}/v1/probes",
        json={"train_featureset": full, "test_featureset": subset, "kind": "knn"},
        timeout=30,
    )
    assert response.status_code == 422
    assert "shares 35 of its 35 items" in response.json()["detail"]["message"]


def complete_featureset_ids(api_url: str) -> set[str]:
    listing = httpx.get(f"{api_url}/v1/featuresets", timeout=30).json()
    return {fs["featureset_id"] for fs in listing["data"] if fs["status"] == "complete"}


def test_probe_pairs_lists_one_train_set(
    api_url: str, dashboard_data: dict[str, str], overlapping_pixel_sets: dict[str, str]
) -> None:
    """The route lists the candidates of the requested train set only, one per complete set."""
    train = dashboard_data["train"]
    response = httpx.get(f"{api_url}/dashboard/probe-pairs", params={"train": train}, timeout=30)
    assert response.status_code == 200
    pairs = response.json()
    assert pairs["train"] == train
    listed = [entry["featureset_id"] for entry in pairs["tests"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == complete_featureset_ids(api_url)
    assert pairs["default"] is not None


def test_probe_pairs_default_train_listed(api_url: str, dashboard_data: dict[str, str]) -> None:
    """Without a train set the route lists the candidates of the default pair's train set."""
    pairs = httpx.get(f"{api_url}/dashboard/probe-pairs", timeout=30).json()
    default = pairs["default"]
    assert default is not None
    assert pairs["train"] == default["train"]
    entries = {entry["featureset_id"]: entry for entry in pairs["tests"]}
    assert entries[default["test"]]["compatible"] is True
    assert pairs["tests"][0]["featureset_id"] == default["test"]


@pytest.mark.parametrize(("train", "status_code"), [("0" * 24, 404), ("not an id", 422)])
def test_probe_pairs_rejects_unknown_train(
    api_url: str, dashboard_data: dict[str, str], train: str, status_code: int
) -> None:
    response = httpx.get(f"{api_url}/dashboard/probe-pairs", params={"train": train}, timeout=30)
    assert response.status_code == status_code
    assert response.json()["detail"]["field"] == "train"


def test_probe_pairs_not_in_openapi(api_url: str) -> None:
    paths = httpx.get(f"{api_url}/openapi.json", timeout=30).json()["paths"]
    assert not [path for path in paths if path.startswith("/dashboard")]


@pytest.fixture(scope="module")
def unfinished_featuresets(api_url: str, redis_server: Any, settings: Any) -> dict[str, Any]:
    """A feature set whose queued job was canceled, and one that never had a job (failed).

    The job is queued on a queue no worker reads, so it is still queued when canceled. Returns
    the two sets as GET /v1/featuresets/{id} reads them, by status.
    """
    import uuid

    from redis import Redis
    from rq import Queue

    from service.jobs import enqueue_extraction
    from tests.factories import pending_featureset

    redis = Redis.from_url(redis_server.url)
    queue = Queue(f"idle-{uuid.uuid4().hex[:8]}", connection=redis)
    try:
        canceled = pending_featureset(
            Path(settings.store), n_items=4, dim=3, fingerprint=uuid.uuid4().hex[:16]
        )
        job_id = enqueue_extraction(queue, canceled, timeout=60)
        response = httpx.post(f"{api_url}/v1/jobs/{job_id}/cancel", timeout=30)
        assert response.status_code == 202, response.text
        failed = pending_featureset(
            Path(settings.store), n_items=4, dim=3, fingerprint=uuid.uuid4().hex[:16]
        )
        read = {}
        for name, featureset in (("canceled", canceled), ("failed", failed)):
            body = httpx.get(f"{api_url}/v1/featuresets/{featureset.id}", timeout=30).json()
            assert body["status"] == name, body
            read[name] = body
        assert read["canceled"]["job_id"] == job_id
        return read
    finally:
        queue.empty()
        redis.close()


def featureset_status_cell(featureset_id: str) -> str:
    return f"document.querySelector('#featuresets tr[data-id=\"{featureset_id}\"] td:nth-child(2)')"


def test_dashboard_shows_unfinished_set_details(
    browser: Callable[[], Page], api_url: str, unfinished_featuresets: dict[str, Any]
) -> None:
    """A failed or canceled set's row shows its status, error message, hint and job id."""
    page = browser()
    page.open(f"{api_url}/dashboard")
    body_colour = page.evaluate("getComputedStyle(document.body).color")
    for status, body in unfinished_featuresets.items():
        cell = featureset_status_cell(body["featureset_id"])
        page.wait_for(f"{cell} !== null")
        text = page.evaluate(f"{cell}.textContent")
        assert text.startswith(status)
        assert body["error"]["message"] in text
        assert body["hint"] in text
        if body["job_id"] is not None:
            assert f"job {body['job_id']}" in text
        label = page.evaluate(f"{cell}.querySelector('.status').className")
        assert label == f"status status-{status}"
        colour = page.evaluate(f"getComputedStyle({cell}.querySelector('.status')).color")
        assert colour != body_colour
