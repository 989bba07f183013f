"""The offline demo, run through the REST API: pretrain, extract, probe, print, plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console
from rich.table import Table

from service.auth import is_loopback
from service.client import Client

DEMO_MODEL = "digits-igpt"
DEMO_PRETRAIN = {
    "dataset": "digits",
    "split": "train",
    "n_layer": 4,
    "n_embd": 64,
    "n_head": 4,
    "n_colors": 16,
    "steps": 1000,
    "batch_size": 64,
    "learning_rate": 1e-3,
}
DEMO_PROBE_PARAMS = {"C": [0.01, 0.1, 1, 10, 100]}


def embedded_stack_address(url: str) -> tuple[str, int]:
    """Return the host and port that `layerbank up` must bind for the API to be at ``url``.

    Raises ValueError, with a message that explains how to fix ``url``, when the embedded stack
    cannot serve it: it speaks plain HTTP at the root path, and the demo binds it only to a
    loopback address.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(
            "the embedded stack serves plain HTTP; give --url as http://127.0.0.1:PORT"
        )
    invalid_port = f"the port in {parts.netloc!r} is not a number from 1 to 65535"
    try:
        port = parts.port
    except ValueError:
        raise ValueError(invalid_port) from None
    if port is None:
        raise ValueError(
            "the URL has no port, and the embedded stack needs one; add :PORT, e.g. "
            f"--url http://{parts.netloc}:8000"
        )
    if port == 0:
        raise ValueError(invalid_port)
    if not is_loopback(parts.hostname):
        raise ValueError(
            "the demo starts the embedded stack only on a loopback address, not "
            f"{parts.hostname!r}; use --url http://127.0.0.1:{port}, or start the API on that "
            "host first"
        )
    rest = urlunsplit(("", "", parts.path, parts.query, parts.fragment))
    if rest not in ("", "/"):
        raise ValueError(
            f"the embedded stack serves the API at the root path; remove {rest!r} from --url"
        )
    # Bind the address itself, not whichever one the name localhost resolves to first.
    host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
    return host, port


def _progress_printer(console: Console, label: str) -> Any:
    """Return a callback that prints a job's progress when its status changes or it passes
    another tenth of the total, so a 1,000-step pretraining prints about ten lines."""
    last: dict[str, Any] = {"status": None, "tenth": None}

    def show(state: dict[str, Any]) -> None:
        progress = state["progress"]
        total = max(1, int(progress["total"]))
        tenth = min(10, int(progress["done"]) * 10 // total)
        if (state["status"], tenth) != (last["status"], last["tenth"]):
            console.print(f"  {label}: {state['status']} {progress['done']}/{progress['total']}")
            last.update(status=state["status"], tenth=tenth)

    return show


def run_demo(
    client: Client,
    output: Path,
    *,
    steps: int = 1000,
    console: Console | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Run the whole main job on scikit-learn's digits and return the probe rows and baseline.

    ``name`` is the store name of the pretrained model; by default ``digits-igpt``, with the
    steps appended when they are not the default."""
    console = console or Console()
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    console.rule("1. pretrain a small ImageGPT on digits/train (next-pixel, start token)")
    # A run with other settings gets its own name, so it never clashes with the default model.
    if name is None:
        name = DEMO_MODEL if steps == DEMO_PRETRAIN["steps"] else f"{DEMO_MODEL}-{steps}steps"
    created = client.pretrain(name, **{**DEMO_PRETRAIN, "steps": steps})
    if created["status"] == "complete":
        console.print(f"  {created['model']} already in the store: reused")
    client.wait(created["job_id"], on_progress=_progress_printer(console, "pretrain"))
    model = created["model"]

    console.rule("2. extract every hidden state, mean-pooled, for both splits")
    featuresets: dict[tuple[str, str], str] = {}
    for name in (model, "pixels"):
        for split in ("train", "test"):
            answer = client.extract(name, "digits", split, layers="all", pooling="mean")
            reused = "reused" if answer["status"] == "complete" else "queued"
            console.print(f"  {name} {split}: feature set {answer['featureset_id']} ({reused})")
            client.wait(
                answer["job_id"] if answer["status"] != "complete" else None,
                on_progress=_progress_printer(console, f"{name}/{split}"),
            )
            featuresets[(name, split)] = answer["featureset_id"]

    console.rule("3. logistic probe on every layer (standardised, C chosen on validation)")
    probes: dict[str, dict[str, Any]] = {}
    for name in (model, "pixels"):
        answer = client.probe(
            featuresets[(name, "train")],
            featuresets[(name, "test")],
            kind="logistic",
            params=DEMO_PROBE_PARAMS,
        )
        client.wait(
            answer["job_id"] if answer["status"] != "complete" else None,
            on_progress=_progress_printer(console, f"probe {name}"),
        )
        probes[name] = client.probe_result(answer["probe_id"])

    rows = sorted(probes[model]["rows"], key=lambda r: r["layer"])
    baseline = probes["pixels"]["rows"][0]
    table = Table(title=f"logistic probe per layer: {model} on digits (test n=500)")
    for column in ("layer", "train acc", "val acc", "test acc", "95% CI", "C", "converged"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*_cells(str(row["layer"]), row))
    table.add_row(*_cells("raw pixels", baseline), style="dim")
    console.print(table)

    best = max(rows, key=lambda r: r["val_accuracy"])
    console.print(
        f"best layer by validation accuracy: {best['layer']} "
        f"(test {100 * best['test_accuracy']:.1f}%); raw-pixel baseline "
        f"{100 * baseline['test_accuracy']:.1f}%; layer 0 (embeddings) "
        f"{100 * rows[0]['test_accuracy']:.1f}%"
    )
    if best["test_accuracy"] < baseline["test_accuracy"]:
        console.print(
            "this tiny model's features stay below raw pixels on digits; the curve "
            "shows what pretraining adds over the embeddings, not a win over pixels"
        )
    curve_path = output / "curve.png"
    curve_path.write_bytes(
        client.curve_png(probes[model]["probe_id"], baseline=baseline["test_accuracy"])
    )
    console.print(f"layer curve written to {curve_path}")

    console.rule(f"4. t-SNE of layer {best['layer']} on the test split")
    projection = client.projection(
        featuresets[(model, "test")], best["layer"], method="tsne", n_points=500, seed=0
    )
    client.wait(
        projection["job_id"] if projection["status"] != "complete" else None,
        on_progress=_progress_printer(console, "t-SNE"),
    )
    tsne_path = output / "tsne.png"
    tsne_path.write_bytes(client.projection_png(projection["projection_id"]))
    console.print(f"t-SNE scatter written to {tsne_path}")
    console.print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return {
        "rows": rows,
        "baseline": baseline,
        "best": best,
        "featuresets": featuresets,
        "probes": {k: v["probe_id"] for k, v in probes.items()},
    }


def _cells(label: str, row: dict[str, Any]) -> list[str]:
    low, high = row.get("test_accuracy_ci95") or (float("nan"), float("nan"))
    return [
        label,
        f"{100 * row['train_accuracy']:.1f}",
        f"{100 * row['val_accuracy']:.1f}",
        f"{100 * row['test_accuracy']:.1f}",
        f"{100 * low:.1f}-{100 * high:.1f}",
        f"{row['params'].get('C')}",
        "yes" if row["converged"] else "NO",
    ]
