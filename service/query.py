"""Checks that reject query parameters a route does not declare, and repeats of single ones.

FastAPI ignores query parameters that no route parameter names, so a typo such as
``?staus=failed`` would return the whole unfiltered list. The app runs `check_query` on every
request, after the route has matched.
"""

from __future__ import annotations

import types
import typing

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service.auth import is_public
from store import StoreError

_SEQUENCES = (list, tuple, set, frozenset)
_CACHE_ATTRIBUTE = "_layerbank_query_names"


def _accepts_many(annotation: object) -> bool:
    """Return whether a parameter annotated ``annotation`` takes a list of values."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _accepts_many(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return any(_accepts_many(arg) for arg in typing.get_args(annotation))
    return origin in _SEQUENCES or annotation in _SEQUENCES


def _query_fields(dependant: Dependant) -> typing.Iterator[typing.Any]:
    """Yield the query parameter fields of ``dependant`` and of its dependencies."""
    yield from dependant.query_params
    for dependency in dependant.dependencies:
        yield from _query_fields(dependency)


def _declared(route: APIRoute) -> tuple[frozenset[str], frozenset[str]]:
    """Return the query parameter names of ``route`` and those of them that take a list."""
    # Stored on the route itself, because routes are not hashable and cannot key a cache.
    cached: tuple[frozenset[str], frozenset[str]] | None = getattr(route, _CACHE_ATTRIBUTE, None)
    if cached is None:
        fields = list(_query_fields(route.dependant))
        names = frozenset(field.alias for field in fields)
        list_names = frozenset(
            field.alias for field in fields if _accepts_many(field.field_info.annotation)
        )
        cached = (names, list_names)
        setattr(route, _CACHE_ATTRIBUTE, cached)
    return cached


# Routes read by monitoring systems, which may add query parameters of their own.
SCRAPED_PATHS = ("/metrics",)


def check_query(request: Request) -> None:
    """Raise a 422 for a query parameter the matched route does not declare, or for a second
    value of a parameter that takes one."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    if is_public(route.endpoint) or route.path in SCRAPED_PATHS:
        # Pages, /metrics and the open health check are read by browsers, scrapers and load
        # balancers, which may add parameters of their own (tracking, cache busting).
        return
    names, list_names = _declared(route)
    where = f"{request.method} {route.path}"
    for name in request.query_params:
        if name not in names:
            accepted = (
                f"use one of {', '.join(sorted(names))}"
                if names
                else "this route takes no query parameters"
            )
            raise StoreError(
                f"unknown query parameter {name!r} for {where}; {accepted}",
                field=name,
                value=request.query_params[name],
            )
        values = request.query_params.getlist(name)
        if len(values) > 1 and name not in list_names:
            raise StoreError(
                f"query parameter {name!r} is given {len(values)} times ({', '.join(values)}) "
                f"for {where}; pass it once",
                field=name,
                value=values,
            )
