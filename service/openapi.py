"""Print the app's OpenAPI document as YAML: ``python -m service.openapi > openapi.yaml``."""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import yaml


def openapi_document() -> dict[str, Any]:
    """Return the OpenAPI document of the app, independent of any running service."""
    from service.app import create_app
    from store.settings import Settings

    with tempfile.TemporaryDirectory() as store:
        return create_app(Settings(store=store)).openapi()


def openapi_yaml() -> str:
    return yaml.safe_dump(openapi_document(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(openapi_yaml())
