"""A Python client for the layerbank REST API (httpx).

>>> from service.client import Client
>>> client = Client("http://127.0.0.1:8000")
>>> array = client.layer_array(featureset_id, layer=3)   # numpy array of shape (n_items, dim)
"""

from __future__ import annotations

import contextlib
import io
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from store.ids import InvalidIdError, check_id

TERMINAL = ("finished", "failed", "canceled")
# The URL that error messages about an invalid base URL show as an example.
EXAMPLE_URL = "http://127.0.0.1:8000"
# The first bytes of every .npy file.
NPY_MAGIC = b"\x93NUMPY"


def _path_id(value: str, field: str) -> str:
    """Return ``value`` for use in a URL path; an invalid id raises the 422 the API would give.

    Checked here because httpx resolves a value such as ``../x`` before the API receives it.
    """
    try:
        return check_id(value, field=field)
    except InvalidIdError as exc:
        raise ClientError(422, {"message": str(exc), "field": field, "value": value}) from None


class ClientError(Exception):
    """Raised when the API returns an error response; carries the status code and the detail."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        message = detail.get("message") if isinstance(detail, dict) else detail
        # A body that ended early came with a success status, and "HTTP 200" in front would mislead.
        super().__init__(f"HTTP {status_code}: {message}" if status_code >= 400 else str(message))


class JobFailedError(ClientError):
    """Raised by `Client.wait` when the job ends in status "failed"."""

    def __init__(self, job_id: str, detail: Any) -> None:
        self.status_code = 200
        self.detail = detail
        self.job_id = job_id
        message = detail.get("message") if isinstance(detail, dict) else detail
        Exception.__init__(self, f"job {job_id} failed: {message}")


class JobCanceledError(JobFailedError):
    """Raised by `Client.wait` when the job ends in status "canceled"."""

    def __init__(self, job_id: str, detail: Any) -> None:
        super().__init__(job_id, detail)
        message = detail.get("message") if isinstance(detail, dict) else detail
        Exception.__init__(self, f"job {job_id} was canceled: {message}")


class ApiConnectionError(ClientError):
    """Raised when no response came from the API at ``url``: the connection was refused or
    failed, or it timed out, after the client's retries.

    ``status_code`` is 0 because there was no response, and ``cause`` is the httpx error.
    """

    def __init__(self, url: str, cause: httpx.TransportError) -> None:
        self.url = url
        self.cause = cause
        self.status_code = 0
        reason = str(cause) or type(cause).__name__
        if isinstance(cause, httpx.TimeoutException):
            reason = f"timed out ({reason})"
        self.detail = {"message": f"cannot reach the layerbank API at {url}: {reason}"}
        Exception.__init__(self, self.detail["message"])


class InvalidUrlError(ClientError, ValueError):
    """Raised by `Client` for a base URL that is not http(s)://HOST[:PORT], before any request.

    ``status_code`` is 0 because no request was sent, and ``url`` is the URL as given.
    """

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        self.status_code = 0
        self.detail = {"message": f"invalid API URL {url!r}: {reason}", "value": url}
        Exception.__init__(self, f"{self.detail['message']}; pass a URL like {EXAMPLE_URL}")


def check_base_url(url: str) -> str:
    """Return ``url`` if it is an http or https URL with a host and, if any, a port 1-65535.

    A trailing ``/`` is accepted. Raises InvalidUrlError, with the reason, for anything else,
    including user information, a path, a query string or a fragment: the client appends the
    API's paths itself, and httpx would merge or drop such parts. Whitespace anywhere is
    rejected too, because httpx would otherwise fail on it only when the first request is sent.
    """
    for index, char in enumerate(url):
        if char.isspace():
            raise InvalidUrlError(
                url, f"it contains whitespace ({char!r} at index {index}); remove it"
            )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        # urlsplit rejects a "[" without its "]", and a bracketed host that is not IPv6.
        reason = f"its host is not a valid IPv6 address in brackets ({exc})"
        raise InvalidUrlError(url, reason) from None
    if "://" not in url:
        raise InvalidUrlError(url, "it does not start with http:// or https://")
    if parts.scheme not in ("http", "https"):
        raise InvalidUrlError(url, f"its scheme is {parts.scheme!r}, not http or https")
    if not parts.hostname:
        raise InvalidUrlError(url, "it has no host")
    if "@" in parts.netloc:
        raise InvalidUrlError(
            url,
            "it contains user information (USER[:PASSWORD]@), which the API does not read; "
            "pass an API key with --api-key or Client(api_key=...)",
        )
    host_and_port = parts.netloc.rpartition("@")[2]
    # An IPv6 host such as [::1] contains colons, so only the text after its "]" can be a port.
    after_host = (
        host_and_port.rpartition("]")[2] if host_and_port.startswith("[") else host_and_port
    )
    if ":" in after_host:
        port = after_host.rpartition(":")[2]
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise InvalidUrlError(url, f"the port {port!r} is not a number from 1 to 65535")
    # urlsplit drops an empty "#" or "?", so the text itself is checked for them.
    if "#" in url:
        raise InvalidUrlError(url, f"it has a fragment ({url[url.index('#') :]!r})")
    if "?" in url:
        raise InvalidUrlError(url, f"it has a query string ({url[url.index('?') :]!r})")
    if parts.path not in ("", "/"):
        raise InvalidUrlError(
            url, f"it has the path {parts.path!r}, but the client adds the API's paths itself"
        )
    try:
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise InvalidUrlError(url, str(exc)) from None
    return url


class IncompleteBodyError(Exception):
    """Raised when an .npy body ends before its array, or runs past it."""


class NotNpyError(ValueError):
    """Raised when a body does not start with the .npy magic string.

    ``head`` contains the bytes of the body read so far.
    """

    def __init__(self, head: bytes) -> None:
        self.head = head
        super().__init__("the body is not an .npy array")


def _unexpected_body_error(
    method: str, response: httpx.Response, head: bytes, expected: str, base_url: str
) -> ClientError:
    """Return the ClientError for a response whose body is not ``expected``.

    ``head`` is the start of the body. The message names the request, the status, the content
    type and the first 80 bytes, because such a body usually comes from a proxy or another
    server at ``base_url``.
    """
    content_type = response.headers.get("content-type") or "no content type"
    return ClientError(
        response.status_code,
        {
            "message": f"{method} {response.url} returned HTTP {response.status_code} "
            f"with {content_type} that is not {expected}, starting with {head[:80]!r}; "
            f"check that {base_url} is the layerbank API and not a proxy or another server",
            "field": "url",
            "value": str(response.url),
        },
    )


class Client:
    """Typed methods mirroring the API. Retries 503 responses and connection errors a few times."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
    ) -> None:
        self.base_url = check_base_url(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)
        self.retries = retries

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self.stream(method, path, **kwargs) as response:
            response.read()
        return response

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """Send a request and yield the response before its body is read.

        An error response raises ClientError. A 503 response or a failed connection is
        retried, but an error while the caller reads the body is not.
        """
        for attempt in range(self.retries + 1):
            try:
                request = self._http.build_request(method, path, **kwargs)
                response = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise ApiConnectionError(self.base_url, exc) from exc
                time.sleep(0.5 * 2**attempt)
                continue
            if response.status_code == 503 and attempt < self.retries:
                response.close()
                time.sleep(0.5 * 2**attempt)
                continue
            try:
                if response.status_code >= 400:
                    raise self._error(method, response)
                yield response
            finally:
                response.close()
            return
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request and return its JSON body, or raise ClientError when it is not JSON."""
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise _unexpected_body_error(
                method, response, response.content, f"JSON ({exc})", self.base_url
            ) from None

    def _error(self, method: str, response: httpx.Response) -> ClientError:
        """Read the body of an error response and return its ClientError.

        The API's own error body is JSON with a ``detail``, which the error carries. A body
        that is not JSON comes from something else, such as a proxy, and the error names the
        request and the start of the body.
        """
        response.read()
        try:
            body = response.json()
        except ValueError:
            return _unexpected_body_error(
                method, response, response.content, "the layerbank API's error JSON", self.base_url
            )
        if isinstance(body, dict):
            return ClientError(response.status_code, body.get("detail", response.text))
        return ClientError(response.status_code, response.text)

    # -- API methods ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    def pretrain(self, name: str, **params: Any) -> dict[str, Any]:
        return self._json("POST", "/v1/pretrain", json={"name": name, **params})

    def extract(self, model: str, dataset: str, split: str, **options: Any) -> dict[str, Any]:
        body = {"model": model, "dataset": dataset, "split": split, **options}
        return self._json("POST", "/v1/extractions", json=body)

    def probe(
        self,
        train_featureset: str,
        test_featureset: str,
        *,
        kind: str | list[str] = "logistic",
        layers: str | list[int] = "all",
        **options: Any,
    ) -> dict[str, Any]:
        body = {
            "train_featureset": train_featureset,
            "test_featureset": test_featureset,
            "kind": kind,
            "layers": layers,
            **options,
        }
        return self._json("POST", "/v1/probes", json=body)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{_path_id(job_id, 'job_id')}")

    def jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> dict[str, Any]:
        """Return one page of jobs, newest first: ``{"data", "count", "next_before"}``.

        Pass the page's ``next_before`` as ``before`` to get the next page. It is None after
        the last page.
        """
        params = {
            name: value
            for name, value in (("status", status), ("kind", kind), ("limit", limit))
            if value is not None
        }
        if before is not None:
            params["before"] = _path_id(before, "before")
        return self._json("GET", "/v1/jobs", params=params)

    def iter_jobs(
        self, *, status: str | None = None, kind: str | None = None, page_size: int = 100
    ) -> Iterator[dict[str, Any]]:
        """Yield every job, newest first, reading ``page_size`` jobs per request."""
        before = None
        while True:
            page = self.jobs(status=status, kind=kind, limit=page_size, before=before)
            yield from page["data"]
            before = page.get("next_before")
            if before is None:
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{_path_id(job_id, 'job_id')}/cancel")

    def wait(
        self,
        job_id: str | None,
        *,
        timeout: float = 3600.0,
        poll: float = 0.5,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any] | None:
        """Poll a job until it finishes; raise `JobFailedError` if it fails or is canceled."""
        if job_id is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            state = self.job(job_id)
            if on_progress is not None:
                on_progress(state)
            if state["status"] == "failed":
                raise JobFailedError(job_id, state.get("error") or {"message": "job failed"})
            if state["status"] == "canceled":
                raise JobCanceledError(job_id, state.get("error") or {"message": "job canceled"})
            if state["status"] == "finished":
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state['status']} after {timeout:.0f}s")
            time.sleep(poll)

    def featureset(self, featureset_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/featuresets/{_path_id(featureset_id, 'featureset_id')}")

    def featuresets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/featuresets")["data"]

    def layer_array(
        self, featureset_id: str, layer: int, *, start: int | None = None, stop: int | None = None
    ) -> np.ndarray:
        """Return one layer as a numpy array of shape (rows, dim)."""
        params = {k: v for k, v in (("start", start), ("stop", stop)) if v is not None}
        path = f"/v1/featuresets/{_path_id(featureset_id, 'featureset_id')}/layers/{layer}"
        with self.stream("GET", path, params=params) as response:
            try:
                return _read_npy(response.iter_bytes())
            except NotNpyError as exc:
                raise _unexpected_body_error(
                    "GET", response, exc.head, "an .npy array", self.base_url
                ) from None
            except (httpx.RemoteProtocolError, IncompleteBodyError) as exc:
                raise ClientError(
                    response.status_code,
                    {
                        "message": f"the response for layer {layer} of feature set "
                        f"{featureset_id!r} ended early ({exc}); the API failed while sending "
                        f"it, so see its log and check the data with `layerbank fsck "
                        f"{featureset_id}`",
                        "field": "featureset_id",
                        "value": featureset_id,
                    },
                ) from exc

    def labels(self, featureset_id: str) -> np.ndarray:
        response = self.request(
            "GET", f"/v1/featuresets/{_path_id(featureset_id, 'featureset_id')}/labels"
        )
        try:
            return np.load(io.BytesIO(response.content), allow_pickle=False)
        except ValueError:
            raise _unexpected_body_error(
                "GET", response, response.content, "an .npy array", self.base_url
            ) from None

    def probe_result(self, probe_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/probes/{_path_id(probe_id, 'probe_id')}")

    def curve(self, probe_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/probes/{_path_id(probe_id, 'probe_id')}/curve")

    def curve_png(self, probe_id: str, *, baseline: float | None = None) -> bytes:
        params = {"baseline": baseline} if baseline is not None else {}
        return self.request(
            "GET", f"/v1/probes/{_path_id(probe_id, 'probe_id')}/curve.png", params=params
        ).content

    def fsck(self, featureset_id: str, *, repair: bool = False) -> dict[str, Any]:
        """Run the consistency check of a feature set and return its report.

        With ``repair``, send POST /v1/featuresets/{id}/fsck/repair instead, which also makes
        the repairs that the report lists under ``repaired`` (admin scope where keys are
        required).
        """
        path = f"/v1/featuresets/{_path_id(featureset_id, 'featureset_id')}/fsck"
        if repair:
            return self._json("POST", f"{path}/repair")
        return self._json("GET", path)

    def projection(
        self,
        featureset_id: str,
        layer: int,
        *,
        method: str = "tsne",
        n_points: int = 1000,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Request a 2-D projection of one layer; returns the projection id and job id."""
        body = {
            "featureset": featureset_id,
            "layer": layer,
            "method": method,
            "n_points": n_points,
            "seed": seed,
        }
        return self._json("POST", "/v1/projections", json=body)

    def projection_result(self, projection_id: str) -> dict[str, Any]:
        """Return a projection with its coordinates (n_points, 2), item indices and labels."""
        return self._json("GET", f"/v1/projections/{_path_id(projection_id, 'projection_id')}")

    def projection_png(self, projection_id: str) -> bytes:
        return self.request(
            "GET", f"/v1/projections/{_path_id(projection_id, 'projection_id')}.png"
        ).content


def _read_npy(pieces: Iterable[bytes]) -> np.ndarray:
    """Read an .npy body that arrives in ``pieces`` into one preallocated array."""
    pieces = iter(pieces)
    head = bytearray()
    header_end: int | None = None
    while header_end is None or len(head) < header_end:
        piece = next(pieces, None)
        if piece is None:
            raise IncompleteBodyError(f"the body ended in the .npy header, after {len(head)} bytes")
        head += piece
        # Checked before the header is complete, so that a short HTML page is not reported
        # as an .npy body that ended early.
        if head[:6] != NPY_MAGIC[: len(head)]:
            raise NotNpyError(bytes(head))
        if header_end is None and len(head) >= 12:
            header_end = _npy_header_end(head)

    header = io.BytesIO(bytes(head[:header_end]))
    version = np.lib.format.read_magic(header)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(header)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(header)
    if fortran_order or dtype.hasobject:
        raise ValueError(
            f"the .npy body has an unsupported layout: {dtype}, Fortran order {fortran_order}"
        )

    array = np.empty(shape, dtype=dtype)
    target = array.reshape(-1).view(np.uint8).data
    received = 0
    for piece in itertools.chain([bytes(head[header_end:])], pieces):
        if received + len(piece) > len(target):
            raise IncompleteBodyError(f"the body is longer than its {len(target)}-byte array")
        target[received : received + len(piece)] = piece
        received += len(piece)
    if received != len(target):
        raise IncompleteBodyError(f"received {received} of the array's {len(target)} bytes")
    return array


def _npy_header_end(head: bytearray) -> int:
    """Return the offset of the array data in an .npy body from its first 12 bytes."""
    if head[:6] != NPY_MAGIC:
        raise NotNpyError(bytes(head))
    if head[6] == 1:
        return 10 + int.from_bytes(head[8:10], "little")
    return 12 + int.from_bytes(head[8:12], "little")
