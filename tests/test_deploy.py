"""The deployment files: docker-compose.yml, Dockerfile, .dockerignore and their documentation.

No Docker engine or Compose CLI runs here, so the compose file is validated against the Compose
Specification JSON schema that the docker-compose 1.29.2 package ships (vendored as
tests/data/compose_spec.json, Apache-2.0), and the rest is checked against the code it names.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.launcher import free_port
from service.serve import check_bind
from store.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
EXTRA_ENV = {"HF_HOME"}  # read by huggingface_hub, not by Settings


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    # Join continuation lines so every instruction is one line.
    return (ROOT / "Dockerfile").read_text().replace("\\\n", " ")


def compose_validator() -> jsonschema.Draft201909Validator:
    schema = json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text())
    return jsonschema.Draft201909Validator(schema)


def settings_env_names() -> set[str]:
    """Return the environment variable of every Settings field."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def instructions(dockerfile: str, keyword: str) -> list[str]:
    return [
        line.split(None, 1)[1]
        for line in dockerfile.splitlines()
        if line.split(None, 1)[:1] == [keyword]
    ]


def command_module(command: list[str]) -> str:
    assert command[:2] == ["python", "-m"], command
    return command[2]


# -- docker-compose.yml -------------------------------------------------------------------------


def test_compose_matches_compose_spec(compose: dict[str, Any]) -> None:
    errors = [f"{list(e.path)}: {e.message}" for e in compose_validator().iter_errors(compose)]
    assert errors == []


def test_compose_spec_rejects_bad_file(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["deploy"]["replicas"] = "two"
    broken["services"]["api"]["restart_policy"] = "always"
    messages = [e.message for e in compose_validator().iter_errors(broken)]
    assert any("'two' is not of type 'integer'" in m for m in messages)
    assert any("restart_policy" in m for m in messages)


def test_compose_env_read_by_code(compose: dict[str, Any]) -> None:
    known = settings_env_names() | EXTRA_ENV
    for name, service in compose["services"].items():
        unknown = set(service.get("environment", {})) - known
        assert unknown == set(), f"service {name} sets variables no code reads: {unknown}"


def test_compose_services_present(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "api", "worker"}


def test_compose_redis_appendonly_on_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in compose["volumes"]


def test_compose_worker_gpu_reservation(compose: dict[str, Any]) -> None:
    deploy = compose["services"]["worker"]["deploy"]
    assert deploy["replicas"] >= 1
    devices = deploy["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert compose["services"]["worker"]["environment"]["LAYERBANK_DEVICE"] == "cuda"


@pytest.mark.parametrize("service", ["api", "worker"])
def test_compose_shared_volumes_mounted(compose: dict[str, Any], service: str) -> None:
    spec = compose["services"][service]
    env = spec["environment"]
    mounts = dict(volume.split(":", 2)[:2] for volume in spec["volumes"])
    assert mounts["store"] == env["LAYERBANK_STORE"]
    assert mounts["hf-cache"] == env["HF_HOME"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"


def test_compose_api_requires_keys(compose: dict[str, Any]) -> None:
    env = compose["services"]["api"]["environment"]
    assert env["LAYERBANK_HOST"] == "0.0.0.0"
    assert env["LAYERBANK_AUTH"] == "required"
    assert all(port.startswith("127.0.0.1:") for port in compose["services"]["api"]["ports"])


@pytest.mark.parametrize("service", ["api", "worker"])
def test_compose_command_modules_exist(compose: dict[str, Any], service: str) -> None:
    module = importlib.import_module(command_module(compose["services"][service]["command"]))
    assert callable(module.main)


def test_compose_env_values_parse(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for service in ("api", "worker"):
        for name, value in compose["services"][service]["environment"].items():
            monkeypatch.setenv(name, str(value))
        settings = Settings()
        assert settings.store == "/data/store"
    assert settings.device == "cuda"


# -- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_base_has_cuda_torch(dockerfile: str) -> None:
    (base,) = instructions(dockerfile, "FROM")
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda12\.\d+-cudnn9-runtime", base)


def test_dockerfile_keeps_base_torch(dockerfile: str) -> None:
    installs = [run for run in instructions(dockerfile, "RUN") if "pip install" in run]
    assert len(installs) == 1
    words = shlex.split(installs[0])
    assert "--constraint" in words
    assert "torch==' + m.version('torch')" in installs[0]
    assert not any(word.startswith("torch") for word in words)


def test_dockerfile_runs_as_non_root(dockerfile: str) -> None:
    users = instructions(dockerfile, "USER")
    assert users
    assert users[-1] not in ("root", "0")


def test_dockerfile_healthcheck_route_exists(dockerfile: str, tmp_path: Path) -> None:
    (healthcheck,) = instructions(dockerfile, "HEALTHCHECK")
    paths = re.findall(r"/\w+'", healthcheck)
    assert paths == ["/healthz'"]
    # The check sends no API key, so the route must respond when keys are required; nothing listens
    # on the Redis port, which the route reports as "degraded" with status 200.
    settings = Settings(
        store=str(tmp_path), auth="required", redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    response = TestClient(create_app(settings)).get("/healthz")
    assert response.status_code == 200


def test_dockerfile_default_command(dockerfile: str) -> None:
    (cmd,) = instructions(dockerfile, "CMD")
    module = importlib.import_module(command_module(json.loads(cmd)))
    assert module.__name__ == "service.serve"


def test_dockerignore_excludes_local_state() -> None:
    patterns = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "data", "tests"} <= patterns


# -- docs/deployment.md -------------------------------------------------------------------------


def test_docs_table_lists_every_setting() -> None:
    text = (ROOT / "docs" / "deployment.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", text, flags=re.MULTILINE))
    assert documented == settings_env_names() | EXTRA_ENV


def test_docs_table_matches_compose(compose: dict[str, Any]) -> None:
    text = (ROOT / "docs" / "deployment.md").read_text()
    row = r"^\| `([A-Z0-9_]+)` \| [^|]+ \| [^|]+ \| ([^|]*) \|"
    rows = re.findall(row, text, flags=re.MULTILINE)
    documented = {name: value.strip().strip("`") for name, value in rows}
    for service in ("api", "worker"):
        for name, value in compose["services"][service]["environment"].items():
            assert documented[name] == str(value), name


# -- python -m service.serve ------------------------------------------------------------------


def test_serve_rejects_open_wildcard() -> None:
    with pytest.raises(SystemExit, match="LAYERBANK_HOST='0.0.0.0'"):
        check_bind(Settings(host="0.0.0.0", auth="off"))


@pytest.mark.parametrize(
    ("host", "auth"),
    [
        ("127.0.0.1", "off"),
        ("localhost", "off"),
        ("::1", "off"),
        ("0.0.0.0", "required"),
        ("0.0.0.0", "auto"),
    ],
)
def test_serve_allows_bind(host: str, auth: str) -> None:
    assert check_bind(Settings(host=host, auth=auth)) is None
