"""CLI commands that drive a running layerbank API.

The commands are extract, probe, jobs, cancel, featuresets, probes, fetch and fsck. Every command
talks to the API through `service.client.Client`. Output is a rich table for people, or with
``--json`` plain JSON on stdout and nothing else. Exit codes: 0 on success, 1 when the API
returns an error or a job fails or is canceled, 2 for usage errors (typer's default). Errors are
printed as one line on stderr, without a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from pydantic import TypeAdapter, ValidationError
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from service.client import (
    EXAMPLE_URL,
    TERMINAL,
    ApiConnectionError,
    Client,
    ClientError,
    InvalidUrlError,
    check_base_url,
)
from service.schemas import LayerSelection

logger = logging.getLogger(__name__)

console = Console()
err = Console(stderr=True)

DEFAULT_URL = "http://127.0.0.1:8000"
POLL_SECONDS = 0.5


def check_url_option(value: str) -> str:
    """Return the --url ``value`` if the client accepts it, else raise a usage error (exit 2)."""
    try:
        return check_base_url(value)
    except InvalidUrlError as exc:
        raise typer.BadParameter(
            f"{value!r}: {exc.reason}; pass a URL like {EXAMPLE_URL}"
        ) from None


UrlOption = Annotated[
    str,
    typer.Option(
        "--url",
        envvar="LAYERBANK_URL",
        callback=check_url_option,
        help="Base URL of the layerbank API.",
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="LAYERBANK_API_KEY",
        show_default=False,
        help="API key, sent as 'Authorization: Bearer <key>'.",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print plain JSON on stdout and nothing else.")
]
WaitOption = Annotated[
    bool, typer.Option("--wait", help="Follow the job with a progress bar until it ends.")
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=1, help="Seconds to follow a job before giving up.")
]


class CommandError(Exception):
    """Raised inside a command to stop it with one line on stderr and exit code 1."""


def register(app: typer.Typer) -> None:
    """Add the API commands to the ``layerbank`` typer app."""
    for command in (extract, probe, jobs, cancel, featuresets, probes, fetch, fsck):
        app.command()(command)


# -- commands ------------------------------------------------------------------------------


def extract(
    model: Annotated[str, typer.Argument(help="Model: hub id, store:<name>, a path or pixels.")],
    dataset: Annotated[str, typer.Argument(help="Dataset name or path, e.g. digits.")],
    split: Annotated[str, typer.Argument(help="Split, e.g. train or test.")],
    layers: Annotated[str, typer.Option(help="'all' or hidden-state indices, e.g. 0,3,5.")] = "all",
    pooling: Annotated[str, typer.Option(help="mean, cls, last_token or mean_ln_f.")] = "mean",
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per forward pass.")] = None,
    block_rows: Annotated[
        int | None, typer.Option(min=1, help="Rows per block (one rq job).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Stratified subset size.")] = None,
    seed: Annotated[
        int | None, typer.Option(min=0, help="Seed of the stratified subset (default 0).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Stored dtype: float32 (default) or float16.")
    ] = None,
    wait: WaitOption = False,
    timeout: TimeoutOption = 3600.0,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Extract pooled hidden states of MODEL on DATASET/SPLIT into a feature set."""
    body: dict[str, Any] = {"layers": _parse_layers(layers), "pooling": pooling}
    options = (
        ("batch_size", batch_size),
        ("block_rows", block_rows),
        ("limit", limit),
        ("seed", seed),
        ("dtype", dtype),
    )
    for name, value in options:
        if value is not None:
            body[name] = value

    with _api(url, api_key) as client:
        answer = client.extract(model, dataset, split, **body)
        state = _follow(client, answer["job_id"], timeout, show=not as_json) if wait else None

    if as_json:
        _print_json({**answer, "job": state} if wait else answer)
    else:
        _print_record("extraction", answer)
        if state is not None:
            _print_job(state)
    _exit_if_failed(state)


def probe(
    train_featureset: Annotated[str, typer.Argument(help="Feature set id to fit probes on.")],
    test_featureset: Annotated[str, typer.Argument(help="Feature set id to evaluate on.")],
    kind: Annotated[
        str, typer.Option(help="Probe kinds, comma-separated: logistic,knn,mlp.")
    ] = "logistic",
    layers: Annotated[str, typer.Option(help="'all' or layer indices, e.g. 0,3,5.")] = "all",
    params: Annotated[
        str | None,
        typer.Option(help="Hyper-parameters as a JSON object, e.g. '{\"C\": [0.1, 1, 10]}'."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the probe's random sources.")] = 0,
    wait: WaitOption = False,
    timeout: TimeoutOption = 3600.0,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fit probes on TRAIN_FEATURESET and score them on TEST_FEATURESET, layer by layer."""
    kinds = _split_list(kind, "--kind", KIND_FORMS)
    options: dict[str, Any] = {"seed": seed}
    if params is not None:
        options["params"] = _parse_params(params)

    with _api(url, api_key) as client:
        answer = client.probe(
            train_featureset,
            test_featureset,
            kind=kinds[0] if len(kinds) == 1 else kinds,
            layers=_parse_layers(layers),
            **options,
        )
        state = _follow(client, answer["job_id"], timeout, show=not as_json) if wait else None
        result = None
        if wait and (state is None or state["status"] == "finished"):
            result = client.probe_result(answer["probe_id"])

    if as_json:
        _print_json({**answer, "job": state, "result": result} if wait else answer)
    else:
        _print_record("probe", answer)
        if state is not None:
            _print_job(state)
        if result is not None:
            _print_probe_rows(result)
    _exit_if_failed(state)


JobStatus = Literal["queued", "running", "finished", "failed", "canceled"]
JobKind = Literal["extraction", "probe", "projection", "pretrain"]
# Jobs per page of `layerbank jobs` without --limit: a screenful at two lines per job.
DEFAULT_JOB_LIST_LIMIT = 20
# The maximum page size of GET /v1/jobs.
MAX_JOB_LIST_LIMIT = 1000


def _check_job_list_limit(value: int | None) -> int | None:
    # A callback instead of typer's min and max, whose message does not show the value.
    if value is not None and not 1 <= value <= MAX_JOB_LIST_LIMIT:
        raise typer.BadParameter(
            f"{value} is out of range; pass a number of jobs from 1 to {MAX_JOB_LIST_LIMIT}"
        )
    return value


def jobs(
    job_id: Annotated[
        str | None,
        typer.Argument(help="Job id returned by extract or probe; without it, list jobs."),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Follow the job with a progress bar until it ends.")
    ] = False,
    timeout: TimeoutOption = 3600.0,
    status: Annotated[
        JobStatus | None,
        typer.Option(show_default=False, help="List only jobs with this status."),
    ] = None,
    kind: Annotated[
        JobKind | None,
        typer.Option(show_default=False, help="List only jobs of this kind."),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            callback=_check_job_list_limit,
            show_default=False,
            help="Maximum number of jobs to list (1-1000, default 20).",
        ),
    ] = None,
    before: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="List only jobs created before this job id (the next page of a list).",
        ),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the status and progress of a job, or list jobs newest first without JOB_ID.

    With JOB_ID, the exit code is 1 if the job failed or was canceled.
    """
    if job_id is None:
        if watch:
            raise typer.BadParameter(
                "--watch follows one job, so give its JOB_ID", param_hint="--watch"
            )
        _list_jobs(
            url,
            api_key,
            as_json,
            status=status,
            kind=kind,
            limit=limit or DEFAULT_JOB_LIST_LIMIT,
            before=before,
        )
        return
    listing = [
        name
        for name, value in (
            ("--status", status),
            ("--kind", kind),
            ("--limit", limit),
            ("--before", before),
        )
        if value is not None
    ]
    if listing:
        raise typer.BadParameter(
            f"{', '.join(listing)} {'applies' if len(listing) == 1 else 'apply'} only to the "
            "job list. Drop JOB_ID to list jobs, or "
            "drop the option to show one job",
            param_hint=listing[0],
        )
    with _api(url, api_key) as client:
        state = (
            _watch_job(client, job_id, timeout, show=not as_json) if watch else client.job(job_id)
        )

    if as_json:
        _print_json(state)
    else:
        _print_job(state)
    _exit_if_failed(state)


def _list_jobs(
    url: str,
    api_key: str | None,
    as_json: bool,
    *,
    status: str | None,
    kind: str | None,
    limit: int,
    before: str | None,
) -> None:
    """Print one page of the job list, with the command that prints the next page."""
    with _api(url, api_key) as client:
        page = client.jobs(status=status, kind=kind, limit=limit, before=before)

    if as_json:
        _print_json(page)
        return
    _print_job_list(page["data"])
    if page.get("next_before"):
        console.print(
            f"more jobs: layerbank jobs --before {page['next_before']} (with the same filters)",
            markup=False,
            highlight=False,
        )


def cancel(
    job_id: Annotated[str, typer.Argument(help="Job id returned by extract, probe or pretrain.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a queued or running job and show its status; a job that had ended is unchanged."""
    with _api(url, api_key) as client:
        state = client.cancel(job_id)

    if as_json:
        _print_json(state)
    else:
        _print_job(state)


def featuresets(
    featureset_id: Annotated[
        str | None, typer.Argument(help="Show one feature set in detail.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the feature sets in the store, or describe one."""
    with _api(url, api_key) as client:
        data = client.featureset(featureset_id) if featureset_id else client.featuresets()

    if as_json:
        _print_json(data)
    elif isinstance(data, dict):
        _print_featureset(data)
    else:
        _print_featureset_list(data)


def probes(
    probe_id: Annotated[str | None, typer.Argument(help="Show one probe result per layer.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List probe results, or show the per-layer metrics of one."""
    with _api(url, api_key) as client:
        if probe_id:
            data: Any = client.probe_result(probe_id)
        else:
            data = client.request("GET", "/v1/probes").json()["data"]

    if as_json:
        _print_json(data)
    elif isinstance(data, dict):
        _print_probe_rows(data)
    else:
        _print_probe_list(data)


def fetch(
    featureset_id: Annotated[str, typer.Argument(help="Feature set id.")],
    layer: Annotated[int, typer.Argument(help="Hidden-state index, as in the layer map.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Path of the .npy file to write.", dir_okay=False)
    ],
    start: Annotated[int | None, typer.Option(min=0, help="First row (default 0).")] = None,
    stop: Annotated[
        int | None, typer.Option(min=0, help="Row after the last (default: all).")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download one layer of a feature set as an array of shape (rows, dim) to a .npy file."""
    import numpy as np

    with _api(url, api_key) as client:
        array = client.layer_array(featureset_id, layer, start=start, stop=stop)
        try:
            # Through a file object, np.save writes the name given; with a path it would add
            # .npy to a name without it.
            with output.open("wb") as file:
                np.save(file, array, allow_pickle=False)
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc.strerror or exc}") from exc

    first = start or 0
    record = {
        "path": str(output),
        "featureset_id": featureset_id,
        "layer": layer,
        "start": first,
        "stop": first + int(array.shape[0]),
        "shape": list(array.shape),
        "dtype": str(array.dtype),
    }
    if as_json:
        _print_json(record)
    else:
        console.print(
            f"wrote {output}: {record['dtype']} array of shape {tuple(array.shape)} "
            f"(layer {layer}, rows {record['start']}..{record['stop']})",
            markup=False,
            highlight=False,
        )


def fsck(
    featureset_id: Annotated[str, typer.Argument(help="Feature set id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Also repair what the check finds (clear damaged blocks' flags, delete "
            "damaged and temporary files, delete an unfinished feature set), through POST "
            "/v1/featuresets/{id}/fsck/repair; needs an admin key where keys are required.",
        ),
    ] = False,
) -> None:
    """Run the API's consistency check on a feature set; exit code 1 unless the report is ok."""
    with _api(url, api_key) as client:
        report = client.fsck(featureset_id, repair=repair)

    if as_json:
        _print_json(report)
    else:
        _print_record(f"fsck {featureset_id}", report)
    if not isinstance(report, dict) or report.get("ok") is not True:
        raise typer.Exit(1)
    if report.get("problems") and not repair:
        _warn_store_partial_files(featureset_id, report)


# -- API access and errors -----------------------------------------------------------------


@contextmanager
def _api(url: str, api_key: str | None) -> Iterator[Client]:
    """Open a client and turn every API or connection error into one stderr line and exit 1."""
    try:
        with Client(url.rstrip("/"), api_key=api_key or None) as client:
            yield client
    except ApiConnectionError as exc:
        _fail(f"error: {exc}; start it with `layerbank up` or pass --url")
    except InvalidUrlError as exc:
        _fail(f"error: {exc}")
    except ClientError as exc:
        _fail(f"error: {_describe(exc)}")
    except httpx.HTTPError as exc:
        # A connection that fails while a response body is read, after the client's retries.
        _fail(f"error: request to {url} failed: {exc}")
    except (CommandError, TimeoutError) as exc:
        _fail(f"error: {exc}")


def _fail(line: str) -> None:
    typer.echo(" ".join(line.split()), err=True)
    raise typer.Exit(1)


def _describe(exc: ClientError) -> str:
    """Return the API's detail message of an error, with the status code in front."""
    detail = exc.detail
    if isinstance(detail, dict) and detail.get("message"):
        message = str(detail["message"])
    elif isinstance(detail, list):
        # FastAPI's request validation errors: a list of {loc, msg, ...}.
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        message = "invalid request: " + "; ".join(parts)
    else:
        message = str(detail) if detail else "no detail"
    return f"HTTP {exc.status_code}: {message}" if exc.status_code >= 400 else message


def _exit_if_failed(state: dict[str, Any] | None) -> None:
    if state is None or state["status"] not in ("failed", "canceled"):
        return
    message = (state.get("error") or {}).get("message") or "no error message"
    if state["status"] == "failed":
        message = f"failed: {message}"
    # The message of a canceled job starts with "canceled by request at ...".
    _fail(f"error: job {state['job_id']} {message}")


def _warn_store_partial_files(featureset_id: str, report: dict[str, Any]) -> None:
    """Print the problems of a report whose ``ok`` is true as one warning line on stderr.

    The API reports such problems only for stray temporary files of the store's own metadata,
    which no feature set depends on, so they leave the exit code at 0.
    """
    found = ", ".join(report.get("partial_files") or []) or " ".join(report["problems"])
    typer.echo(
        f"warning: feature set {featureset_id} is ok, but the store has stray temporary files "
        f"of its own metadata ({found}); `layerbank fsck {featureset_id} --repair` deletes them",
        err=True,
    )


# -- following jobs ------------------------------------------------------------------------


class ItemsPerSecondColumn(ProgressColumn):
    """Rate of progress in the task's unit, from rich's running speed estimate."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "items")
        if task.speed is None:
            return Text(f"- {unit}/s", style="progress.data.speed")
        return Text(f"{task.speed:,.1f} {unit}/s", style="progress.data.speed")


def _follow(
    client: Client, job_id: str | None, timeout: float, *, show: bool
) -> dict[str, Any] | None:
    """Follow a job with ``_watch_job`` and return its final state.

    Returns the final state of an earlier job at once when the result already existed, and
    None when the API returned no job id (it has no record of the job that made the result).
    """
    if job_id is None:
        return None
    return _watch_job(client, job_id, timeout, show=show)


def _watch_job(client: Client, job_id: str, timeout: float, *, show: bool) -> dict[str, Any]:
    """Poll a job until it ends; draw a progress bar on stderr when ``show``.

    Returns the final job state. Raises TimeoutError when the job is still running after
    ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ItemsPerSecondColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=not show,
        transient=False,
    )
    with progress:
        task = None
        while True:
            state = client.job(job_id)
            completed, total, unit = _progress_counts(state["progress"])
            description = f"{state['kind']} {job_id[:8]} {state['status']}"
            if task is None:
                task = progress.add_task(description, total=total or None, unit=unit)
            progress.update(task, completed=completed, total=total or None, description=description)
            if state["status"] in TERMINAL:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} is still {state['status']} after "
                    f"{timeout:.0f}s; follow it with `layerbank jobs {job_id} "
                    "--watch`"
                )
            time.sleep(POLL_SECONDS)


def _progress_counts(progress: dict[str, Any]) -> tuple[int, int, str]:
    """Return (completed, total, unit): items for extractions, steps for other jobs."""
    if progress.get("items_total"):
        return int(progress.get("items_done") or 0), int(progress["items_total"]), "items"
    return int(progress.get("done") or 0), int(progress.get("total") or 0), "steps"


# -- output --------------------------------------------------------------------------------


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def _print_record(title: str, record: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in record.items():
        table.add_row(key, _cell(value))
    console.print(table)


_JOB_STATUS_STYLES = {
    "finished": "green",
    "failed": "red",
    "canceled": "magenta",
    "running": "yellow",
}


def _print_job(state: dict[str, Any]) -> None:
    completed, total, unit = _progress_counts(state["progress"])
    color = _JOB_STATUS_STYLES.get(state["status"], "")
    table = Table(title=f"job {state['job_id']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("kind", state["kind"])
    table.add_row("target", state["target_id"])
    table.add_row("status", Text(state["status"], style=color))
    table.add_row("progress", f"{completed}/{total} {unit}")
    table.add_row("created", state["created"])
    if state.get("error"):
        table.add_row("error", Text(str(state["error"].get("message")), style="red"))
    if state.get("result"):
        table.add_row("result", _cell(state["result"]))
    console.print(table)


def _print_job_list(data: list[dict[str, Any]]) -> None:
    # Two lines per job, so the table fits an 80-column terminal without splitting ids.
    table = Table(title=f"{len(data)} jobs", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("id\ntarget", no_wrap=True)
    table.add_column("kind\nstatus", no_wrap=True)
    table.add_column("progress", no_wrap=True)
    table.add_column("created\n(UTC)", no_wrap=True)
    for state in data:
        completed, total, unit = _progress_counts(state["progress"])
        status = Text(state["status"], style=_JOB_STATUS_STYLES.get(state["status"], ""))
        table.add_row(
            f"{state['job_id']}\n{state['target_id']}",
            Text.assemble(state["kind"], "\n", status),
            f"{completed}/{total} {unit}",
            _utc_date_time(state["created"]),
        )
    console.print(table)


def _utc_date_time(created: str) -> str:
    """Return an ISO 8601 time as its UTC date and, on a second line, its UTC time to seconds.

    A value that is not ISO 8601 is returned unchanged.
    """
    try:
        moment = dt.datetime.fromisoformat(created)
    except ValueError:
        return created
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.timezone.utc)
    return moment.strftime("%Y-%m-%d\n%H:%M:%S")


def _print_featureset_list(data: list[dict[str, Any]]) -> None:
    # Two lines per feature set, so the table fits an 80-column terminal without splitting ids.
    table = Table(title=f"{len(data)} feature sets", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("model\ndataset/split", overflow="fold")
    table.add_column("layers x items x dim\npooling, blocks", no_wrap=True)
    for fs in data:
        spec, progress = fs["spec"], fs["progress"]
        table.add_row(
            fs["featureset_id"],
            _status_text(fs["status"]),
            f"{spec.get('model')}\n{spec.get('dataset')}/{spec.get('split')}",
            f"{fs['shape'][0]} x {fs['n_items']} x {fs['dim']}\n"
            f"{spec.get('pooling')}, {progress['blocks_done']}/{progress['blocks_total']} blocks",
        )
    console.print(table)


def _print_featureset(fs: dict[str, Any]) -> None:
    summary = {
        key: fs[key]
        for key in (
            "featureset_id",
            "status",
            "shape",
            "dtype",
            "n_items",
            "dim",
            "block_rows",
            "created",
            "completed",
            "progress",
        )
    }
    # The job that writes or wrote the set, with its error and the next step when it failed or
    # was canceled. An API that does not return these fields leaves the rows out.
    for key in ("job_id", "error", "hint"):
        if fs.get(key):
            summary[key] = fs[key]["message"] if key == "error" else fs[key]
    summary.update({f"spec.{k}": v for k, v in fs["spec"].items()})
    _print_record(f"feature set {fs['featureset_id']}", summary)
    table = Table(title="layer map", title_justify="left")
    table.add_column("position")
    table.add_column("layer")
    table.add_column("description", overflow="fold")
    for position, row in enumerate(fs["layer_map"]):
        table.add_row(
            str(position),
            str(row.get("layer", row.get("index", ""))),
            str(row.get("description", "")),
        )
    console.print(table)


def _print_probe_list(data: list[dict[str, Any]]) -> None:
    table = Table(title=f"{len(data)} probe results", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("train / test", no_wrap=True)
    table.add_column("best layer (test acc)", overflow="fold")
    for result in data:
        spec = result["spec"]
        best = "\n".join(
            f"{kind}: {b['layer']} ({b['test_accuracy']:.3f})" for kind, b in result["best"].items()
        )
        table.add_row(
            result["probe_id"],
            _status_text(result["status"]),
            f"{spec.get('train_featureset', '')}\n{spec.get('test_featureset', '')}",
            best or ",".join(spec.get("kinds", [])) + ": -",
        )
    console.print(table)


def _print_probe_rows(result: dict[str, Any]) -> None:
    table = Table(title=f"probe {result['probe_id']} ({result['status']})", title_justify="left")
    for column in (
        "kind",
        "layer",
        "train acc",
        "val acc",
        "test acc",
        "test 95% CI",
        "params",
        "converged",
    ):
        table.add_column(column, overflow="fold")
    best = {kind: b["layer"] for kind, b in result.get("best", {}).items()}
    for row in result["rows"]:
        style = "bold green" if best.get(row["kind"]) == row["layer"] else ""
        table.add_row(
            row["kind"],
            str(row["layer"]),
            _fraction(row.get("train_accuracy")),
            _fraction(row.get("val_accuracy")),
            _fraction(row.get("test_accuracy")),
            _interval(row.get("test_accuracy_ci95")),
            _params_text(row.get("params", {})),
            str(row.get("converged", "")),
            style=style,
        )
    console.print(table)


def _status_text(status: str) -> Text:
    return Text(status, style="green" if status == "complete" else "yellow")


def _fraction(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _interval(value: Any) -> str:
    """Format a [low, high] pair of fractions as "low-high", or "-" when it is missing."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{_fraction(value[0])}-{_fraction(value[1])}"
    return "-"


def _params_text(params: Any) -> str:
    """Format chosen hyper-parameters as "name=value" pairs, one per line."""
    if not isinstance(params, dict):
        return _cell(params)
    return "\n".join(f"{name}={_cell(value)}" for name, value in params.items())


def _cell(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


# -- argument parsing ----------------------------------------------------------------------


LAYER_FORMS = "'all' or hidden-state indices separated by commas, such as 0,3,5"
KIND_FORMS = "probe kinds separated by commas, such as logistic,knn"
# The API's type of the layers field; --layers is converted to it and checked with it.
_LAYER_SELECTION: TypeAdapter[str | list[int]] = TypeAdapter(LayerSelection)
_INTEGER = re.compile(r"-?[0-9]+")


def _split_list(text: str, option: str, forms: str) -> list[str]:
    """Split a comma-separated option value into its entries, without surrounding spaces.

    Raises typer.BadParameter, naming ``option`` and the accepted ``forms``, when the value or
    one of its entries is empty.
    """
    entries = [entry.strip() for entry in text.split(",")]
    if entries == [""]:
        raise typer.BadParameter(f"{text!r} is empty; pass {forms}", param_hint=f"'{option}'")
    if "" in entries:
        raise typer.BadParameter(
            f"{text!r} has an empty entry; pass {forms}", param_hint=f"'{option}'"
        )
    return entries


def _parse_layers(text: str) -> str | list[int]:
    """Parse ``--layers`` into the request's layers value: "all" or a list of indices."""
    entries = _split_list(text, "--layers", LAYER_FORMS)
    if entries == ["all"]:
        value: Any = "all"
    else:
        # An entry that is not an integer stays text, which the API's type rejects, as it
        # rejects a string in the JSON list.
        value = [int(entry) if _INTEGER.fullmatch(entry) else entry for entry in entries]
    try:
        return _LAYER_SELECTION.validate_python(value)
    except ValidationError:
        raise typer.BadParameter(
            f"{text!r} is invalid; pass {LAYER_FORMS}", param_hint="'--layers'"
        ) from None


def _parse_params(text: str) -> dict[str, Any]:
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(
            f"{text!r} is not valid JSON ({exc.msg})", param_hint="--params"
        ) from None
    if not isinstance(params, dict):
        raise typer.BadParameter(f"{text!r} is not a JSON object", param_hint="--params")
    return params
