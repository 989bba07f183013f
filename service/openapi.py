"""The app's OpenAPI document: the 405 response that it declares once, and the YAML output of
``python -m service.openapi > openapi.yaml``."""

from __future__ import annotations

import copy
import sys
import tempfile
from typing import Any

import yaml

# A request whose method the path does not take matches no operation, so no operation can
# declare its 405. The document describes that response once, among the shared responses.
METHOD_NOT_ALLOWED_RESPONSE: dict[str, Any] = {
    "description": "The path does not take the request's method. Every path returns this for "
    "the methods that it has no operation for.",
    "headers": {
        "Allow": {
            "description": "The methods that the path takes, e.g. GET, HEAD, DELETE.",
            "schema": {"type": "string"},
        }
    },
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}
API_DESCRIPTION = (
    "A request with a method that the path does not take gets 405, with an ErrorResponse body "
    "and an Allow header. The document describes that response once, as "
    "#/components/responses/MethodNotAllowed, rather than on each operation. Every path with a "
    "GET operation also answers HEAD with the status and headers of that GET and no body; the "
    "document does not list these HEAD operations."
)


def add_method_not_allowed(document: dict[str, Any]) -> None:
    """Add the 405 response that every path returns to ``document``, an OpenAPI document."""
    document["info"]["description"] = API_DESCRIPTION
    responses = document.setdefault("components", {}).setdefault("responses", {})
    responses["MethodNotAllowed"] = copy.deepcopy(METHOD_NOT_ALLOWED_RESPONSE)


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
