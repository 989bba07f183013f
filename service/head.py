"""HEAD requests on the API's GET routes.

FastAPI routes take only the methods they declare, so HEAD on a GET route would be a 405.
`HeadMiddleware` serves such a HEAD as the GET of the same URL and sends its status and
headers without the body, as RFC 9110 requires of HEAD.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.routing import iter_route_contexts
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The scope key that marks a HEAD request served by a GET route.
HEAD_SCOPE_KEY = "layerbank.head"


def is_head(request: Request) -> bool:
    """Return whether ``request`` is a HEAD served by a GET route, which sends no body."""
    return bool(request.scope.get(HEAD_SCOPE_KEY))


def request_method(request: Request) -> str:
    """Return the method that the client sent, HEAD also where a GET route serves it."""
    return "HEAD" if is_head(request) else request.method


def _route_takes(scope: Scope, method: str) -> bool:
    routes = scope["app"].routes
    method_scope = {**scope, "method": method}
    return any(
        route.matches(method_scope)[0] == Match.FULL for route in iter_route_contexts(routes)
    )


class HeadMiddleware:
    """Serve HEAD as GET where only a GET route matches, and drop the body of the response.

    A route that takes HEAD itself, such as the static files, gets the request unchanged, and
    so does a path without a GET route, which then gets the usual 405.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "HEAD"
            or _route_takes(scope, "HEAD")
            or not _route_takes(scope, "GET")
        ):
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
            elif not message.get("more_body", False):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app({**scope, "method": "GET", HEAD_SCOPE_KEY: True}, receive, send_headers_only)
