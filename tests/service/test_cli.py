"""The API commands of the ``layerbank`` CLI against the live test API and real workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app
from service.client import ClientError

runner = CliRunner()

MISSING_ID = "0" * 24


def run_cli(api_url: str, *args: str) -> Any:
    """Run ``layerbank ARGS --url API_URL`` in-process and return click's Result."""
    return runner.invoke(app, [*args, "--url", api_url], catch_exceptions=False)


def run_json(api_url: str, *args: str) -> Any:
    result = run_cli(api_url, *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# The test split of the module's feature sets, as `layerbank extract` arguments after the model.
TEST_SUBSET_ARGS = ("digits", "test", "--limit", "200", "--block-rows", "100", "--batch-size", "50")


@pytest.fixture(scope="module")
def cli_featuresets(client: Any, api_url: str, tiny_model: Path) -> dict[str, str]:
    """Train and test feature sets of the tiny model on a digits subset, made with the CLI."""
    ids = {}
    for split, limit in (("train", "300"), ("test", "200")):
        answer = run_json(
            api_url,
            "extract",
            str(tiny_model),
            "digits",
            split,
            "--layers",
            "all",
            "--limit",
            limit,
            "--block-rows",
            "100",
            "--batch-size",
            "50",
            "--wait",
        )
        assert answer["job"]["status"] == "finished", answer
        ids[split] = answer["featureset_id"]
    return ids


@pytest.fixture(scope="module")
def cli_probe(api_url: str, cli_featuresets: dict[str, str]) -> dict[str, Any]:
    """A finished kNN probe on the CLI's feature sets, launched with ``probe --wait --json``."""
    return run_json(
        api_url,
        "probe",
        cli_featuresets["train"],
        cli_featuresets["test"],
        "--kind",
        "knn",
        "--layers",
        "0,2",
        "--params",
        '{"k": [5]}',
        "--wait",
    )


def test_extract_wait_json_reports_finished_job(
    cli_featuresets: dict[str, str], client: Any
) -> None:
    summary = client.featureset(cli_featuresets["train"])
    assert summary["status"] == "complete"
    assert summary["n_items"] == 300
    assert summary["progress"]["blocks_total"] == 3


def test_extract_again_json_is_one_document(
    api_url: str, tiny_model: Path, cli_featuresets: dict[str, str]
) -> None:
    result = run_cli(
        api_url,
        "extract",
        str(tiny_model),
        *TEST_SUBSET_ARGS,
        "--json",
    )
    assert result.exit_code == 0
    body = json.loads(result.stdout)
    assert body["featureset_id"] == cli_featuresets["test"]
    assert body["created"] is False
    assert body["status"] == "complete"


def test_extract_again_wait_json_shows_earlier_job(
    api_url: str, client: Any, tiny_model: Path, cli_featuresets: dict[str, str]
) -> None:
    body = run_json(
        api_url,
        "extract",
        str(tiny_model),
        *TEST_SUBSET_ARGS,
        "--wait",
    )
    assert body["created"] is False
    assert body["status"] == "complete"
    assert body["job_id"] is not None
    job = body["job"]
    assert job["job_id"] == body["job_id"]
    assert job["kind"] == "extraction"
    assert job["target_id"] == cli_featuresets["test"]
    assert job["status"] == "finished"
    assert job["progress"]["items_done"] == 200
    assert job == client.job(body["job_id"])


def test_extract_dtype_and_seed_reach_the_spec(api_url: str, client: Any) -> None:
    """--dtype float16 and --seed give the feature set the request would give over HTTP."""
    body = run_json(
        api_url,
        "extract",
        "pixels",
        "digits",
        "test",
        "--limit",
        "30",
        "--seed",
        "7",
        "--dtype",
        "float16",
        "--wait",
    )
    assert body["job"]["status"] == "finished", body
    direct = client.extract("pixels", "digits", "test", limit=30, seed=7, dtype="float16")
    assert direct["featureset_id"] == body["featureset_id"]
    assert client.featureset(body["featureset_id"])["dtype"] == "float16"


def test_extract_human_output_names_featureset(
    api_url: str, tiny_model: Path, cli_featuresets: dict[str, str]
) -> None:
    result = run_cli(
        api_url,
        "extract",
        str(tiny_model),
        *TEST_SUBSET_ARGS,
    )
    assert result.exit_code == 0
    assert cli_featuresets["test"] in result.stdout
    assert "complete" in result.stdout


def test_extract_bad_layers_is_usage_error(api_url: str, tiny_model: Path) -> None:
    result = run_cli(api_url, "extract", str(tiny_model), "digits", "test", "--layers", "0,x")
    assert result.exit_code == 2
    assert "--layers" in result.stderr


def test_extract_out_of_range_layer_one_line_error(api_url: str, tiny_model: Path) -> None:
    result = run_cli(api_url, "extract", str(tiny_model), "digits", "test", "--layers", "0,30")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: HTTP 422: ")
    assert "30" in lines[0]
    assert "Traceback" not in result.stderr


def test_extract_unknown_pooling_names_field(api_url: str, tiny_model: Path) -> None:
    result = run_cli(api_url, "extract", str(tiny_model), "digits", "test", "--pooling", "max")
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "HTTP 422: pooling: Input should be" in result.stderr


def test_probe_wait_json_includes_result(cli_probe: dict[str, Any]) -> None:
    assert cli_probe["job"]["status"] == "finished"
    rows = cli_probe["result"]["rows"]
    assert [row["layer"] for row in rows] == [0, 2]
    assert all(row["kind"] == "knn" for row in rows)
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in rows)


def test_probe_human_output_shows_layer_table(
    api_url: str, cli_featuresets: dict[str, str], cli_probe: dict[str, Any]
) -> None:
    result = run_cli(
        api_url,
        "probe",
        cli_featuresets["train"],
        cli_featuresets["test"],
        "--kind",
        "knn",
        "--layers",
        "0,2",
        "--params",
        '{"k": [5]}',
        "--wait",
    )
    assert result.exit_code == 0
    assert cli_probe["probe_id"] in result.stdout
    assert "test acc" in result.stdout


def test_probe_unknown_kind_is_api_error(api_url: str, cli_featuresets: dict[str, str]) -> None:
    result = run_cli(
        api_url,
        "probe",
        cli_featuresets["train"],
        cli_featuresets["test"],
        "--kind",
        "logistic,svm",
    )
    assert result.exit_code == 1
    assert "'svm' is not a probe kind" in result.stderr


def test_probe_bad_params_json_is_usage_error(
    api_url: str, cli_featuresets: dict[str, str]
) -> None:
    result = run_cli(
        api_url, "probe", cli_featuresets["train"], cli_featuresets["test"], "--params", "{C: 1}"
    )
    assert result.exit_code == 2
    assert "--params" in result.stderr


def test_probes_lists_and_shows_result(api_url: str, cli_probe: dict[str, Any]) -> None:
    listed = run_json(api_url, "probes")
    assert cli_probe["probe_id"] in [item["probe_id"] for item in listed]
    one = run_json(api_url, "probes", cli_probe["probe_id"])
    assert one["status"] == "complete"


def test_probes_table_shows_interval_and_params(
    api_url: str, cli_probe: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    result = run_cli(api_url, "probes", cli_probe["probe_id"])
    assert result.exit_code == 0, result.stderr
    for row in cli_probe["result"]["rows"]:
        low, high = row["test_accuracy_ci95"]
        assert f"{low:.4f}-{high:.4f}" in result.stdout
    assert f"k={cli_probe['result']['rows'][0]['params']['k']}" in result.stdout


def test_jobs_json_matches_api(api_url: str, client: Any, cli_probe: dict[str, Any]) -> None:
    body = run_json(api_url, "jobs", cli_probe["job_id"])
    assert body == client.job(cli_probe["job_id"])


def test_jobs_watch_follows_running_extraction(api_url: str, client: Any, tiny_model: Path) -> None:
    answer = client.extract(
        str(tiny_model),
        "digits",
        "train",
        layers=[1],
        pooling="mean",
        limit=400,
        block_rows=50,
        batch_size=25,
    )
    result = run_cli(api_url, "jobs", answer["job_id"], "--watch", "--json")
    assert result.exit_code == 0
    state = json.loads(result.stdout)
    assert state["status"] == "finished"
    assert state["progress"]["items_done"] == 400


def test_jobs_watch_human_shows_progress(api_url: str, cli_probe: dict[str, Any]) -> None:
    result = run_cli(api_url, "jobs", cli_probe["job_id"], "--watch")
    assert result.exit_code == 0
    assert "finished" in result.stdout
    assert "steps/s" in result.stderr


def test_jobs_unknown_id_exit_one(api_url: str) -> None:
    result = run_cli(api_url, "jobs", MISSING_ID)
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: HTTP 404: job '{MISSING_ID}' not found; job ids "
        "are returned by the POST that started the work"
    )


def test_jobs_failed_job_exit_one(
    api_url: str, client: Any, workers: list[Any], stack_dirs: dict[str, Path]
) -> None:
    # A block job fails when its model directory disappears after the extraction was queued.
    # The workers are paused meanwhile, so no block can run before the files are gone.
    model = stack_dirs["models"] / "vanishing-igpt"
    from tests.factories import tiny_imagegpt

    tiny_imagegpt(model, seed=7)
    for process in workers:
        os.kill(process.pid, signal.SIGSTOP)
    try:
        answer = client.extract(str(model), "digits", "test", layers=[0], limit=60, block_rows=30)
        for path in model.iterdir():
            path.unlink()
        model.rmdir()
    finally:
        for process in workers:
            os.kill(process.pid, signal.SIGCONT)
    result = run_cli(api_url, "jobs", answer["job_id"], "--watch", "--timeout", "120")
    assert result.exit_code == 1
    assert (
        result.stderr.strip().splitlines()[-1].startswith(f"error: job {answer['job_id']} failed: ")
    )


def test_featuresets_list_json(api_url: str, cli_featuresets: dict[str, str]) -> None:
    listed = run_json(api_url, "featuresets")
    ids = [item["featureset_id"] for item in listed]
    assert cli_featuresets["train"] in ids
    assert cli_featuresets["test"] in ids


def test_featuresets_table_fits_80_columns(
    api_url: str, cli_featuresets: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = run_cli(api_url, "featuresets")
    assert result.exit_code == 0
    assert cli_featuresets["train"] in result.stdout
    assert " complete " in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_probes_table_fits_80_columns(
    api_url: str, cli_probe: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = run_cli(api_url, "probes")
    assert result.exit_code == 0
    assert cli_probe["probe_id"] in result.stdout
    assert " complete " in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_featuresets_one_shows_layer_map(api_url: str, cli_featuresets: dict[str, str]) -> None:
    detail = run_json(api_url, "featuresets", cli_featuresets["test"])
    assert detail["shape"] == [3, 200, 32]
    result = run_cli(api_url, "featuresets", cli_featuresets["test"])
    assert result.exit_code == 0
    assert "layer map" in result.stdout


def test_fetch_writes_npy_slice(
    api_url: str, client: Any, cli_featuresets: dict[str, str], tmp_path: Path
) -> None:
    output = tmp_path / "layer1.npy"
    record = run_json(
        api_url,
        "fetch",
        cli_featuresets["test"],
        "1",
        "-o",
        str(output),
        "--start",
        "10",
        "--stop",
        "30",
    )
    assert record["shape"] == [20, 32]
    saved = np.load(output)
    expected = client.layer_array(cli_featuresets["test"], 1)[10:30]
    np.testing.assert_array_equal(saved, expected)


def test_fetch_writes_name_without_suffix(
    api_url: str, cli_featuresets: dict[str, str], tmp_path: Path
) -> None:
    output = tmp_path / "layer1"
    record = run_json(api_url, "fetch", cli_featuresets["test"], "1", "-o", str(output))
    assert record["path"] == str(output)
    assert np.load(output).shape == (200, 32)
    assert not output.with_suffix(".npy").exists()


def test_fetch_missing_output_is_usage_error(api_url: str, cli_featuresets: dict[str, str]) -> None:
    result = run_cli(api_url, "fetch", cli_featuresets["test"], "1")
    assert result.exit_code == 2


def test_fetch_unwritable_path_one_line(
    api_url: str, cli_featuresets: dict[str, str], tmp_path: Path
) -> None:
    output = tmp_path / "no-such-dir" / "layer.npy"
    result = run_cli(api_url, "fetch", cli_featuresets["test"], "1", "-o", str(output))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot write {output}")


def test_fsck_reports_api_answer(
    api_url: str, client: Any, cli_featuresets: dict[str, str]
) -> None:
    try:
        client.fsck(cli_featuresets["test"])
    except ClientError as exc:
        if exc.status_code != 404:
            raise
        # The fsck route is not part of this API build: the CLI must report the 404 cleanly.
        result = run_cli(api_url, "fsck", cli_featuresets["test"])
        assert result.exit_code == 1
        assert result.stderr.strip() == "error: HTTP 404: Not Found"
        return
    body = run_json(api_url, "fsck", cli_featuresets["test"])
    assert body == client.fsck(cli_featuresets["test"])


@pytest.fixture
def stray_store_partial(settings: Any) -> Iterator[str]:
    """Create a stray temporary file of the featuresets folder's group metadata, old enough for
    fsck to report. Yields its path as the report lists it, relative to a feature set's folder."""
    path = Path(settings.store) / "featuresets" / "zarr.0123abcd.partial"
    path.write_bytes(b"{")
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    yield "../zarr.0123abcd.partial"
    path.unlink(missing_ok=True)


def test_fsck_store_partial_file_warns_exit_zero(
    api_url: str, cli_featuresets: dict[str, str], stray_store_partial: str
) -> None:
    featureset_id = cli_featuresets["test"]
    result = run_cli(api_url, "fsck", featureset_id)
    assert result.exit_code == 0, result.output
    assert stray_store_partial in result.stdout
    warning = " ".join(result.stderr.split())
    assert warning.startswith("warning: ")
    assert stray_store_partial in warning
    assert f"layerbank fsck {featureset_id} --repair" in warning


def test_fsck_store_partial_file_json_exit_zero(
    api_url: str, cli_featuresets: dict[str, str], stray_store_partial: str
) -> None:
    featureset_id = cli_featuresets["test"]
    result = run_cli(api_url, "fsck", featureset_id, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["partial_files"] == [stray_store_partial]
    assert len(report["problems"]) == 1
    assert f"layerbank fsck {featureset_id} --repair" in " ".join(result.stderr.split())


def test_fsck_repair_store_partial_file_no_warning(
    api_url: str, cli_featuresets: dict[str, str], stray_store_partial: str
) -> None:
    result = run_cli(api_url, "fsck", cli_featuresets["test"], "--repair", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["repaired"] == [f"deleted {stray_store_partial}"]
    assert result.stderr == ""


def test_cli_unreachable_api_one_line(tmp_path: Path) -> None:
    from service.launcher import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["featuresets", "--url", url])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot reach the layerbank API at {url}")


def test_cli_invalid_api_url_usage_error() -> None:
    result = runner.invoke(app, ["featuresets", "--url", "notaurl"])
    assert result.exit_code == 2
    message = " ".join(result.stderr.replace("\u2502", " ").split())
    assert (
        "'notaurl': it does not start with http:// or https://; pass a URL like "
        "http://127.0.0.1:8000"
    ) in message


def test_cli_subprocess_json_and_exit_codes(api_url: str, cli_featuresets: dict[str, str]) -> None:
    env = {**os.environ, "LAYERBANK_URL": api_url}
    listed = subprocess.run(
        [sys.executable, "-m", "service.cli", "featuresets", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0
    assert cli_featuresets["test"] in [fs["featureset_id"] for fs in json.loads(listed.stdout)]
    missing = subprocess.run(
        [sys.executable, "-m", "service.cli", "featuresets", MISSING_ID],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "Traceback" not in missing.stderr


def test_keys_create_invalid_name_one_line(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    result = runner.invoke(app, ["keys", "create", "--name", "bad name"])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: ")
    assert "'bad name'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_keys_create_unknown_scope_exit_two(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    result = runner.invoke(app, ["keys", "create", "--name", "scope-test", "--scope", "superuser"])
    assert result.exit_code == 2
    assert result.stdout == ""
    # Rich draws the usage error in a box and wraps it, so compare the words only.
    words = " ".join(result.stderr.replace("\u2502", " ").split())
    assert "Invalid value for '--scope'" in words
    assert "'superuser' is not a scope; choose one of read, write, admin" in words
    assert "Traceback" not in result.stderr


def test_keys_create_subprocess_no_traceback(redis_server: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--name", "bad name"],
        env={**os.environ, "REDIS_URL": redis_server.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_keys_unreachable_redis_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.launcher import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    result = runner.invoke(app, ["keys", "list"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach Redis (")
