"""``layerbank keys``: create, list and revoke API keys in the Redis at REDIS_URL.

An invalid --scope is a usage error, which exits with code 2 like other invalid option values.
An ApiKeyError (invalid or taken name, unknown key) reaches the root command group in
`service.cli`, which prints its message as one line on stderr and exits with code 1.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.auth import SCOPES, KeyStore

keys_app = typer.Typer(
    help="Manage API keys (stored hashed in the Redis at REDIS_URL).", no_args_is_help=True
)
console = Console()
err = Console(stderr=True)


def _key_store() -> KeyStore:
    from redis import Redis

    from store.settings import load_settings

    # Read the environment now, not a cached copy, so REDIS_URL set just before is honoured.
    return KeyStore(Redis.from_url(load_settings().redis_url))


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise typer.BadParameter(f"{scope!r} is not a scope; choose one of {', '.join(SCOPES)}")
    return scope


@keys_app.command("create")
def create_key(
    name: Annotated[str, typer.Option(help="unique key name: letters, digits, '.', '_', '-'")],
    scope: Annotated[
        str, typer.Option(callback=_check_scope, help=f"one of {', '.join(SCOPES)}")
    ] = "read",
) -> None:
    """Create a key and print it once; only a salted hash is stored."""
    key = _key_store().create(name, scope)
    err.print(
        f"API key {name!r} with scope {scope!r} created. It is shown only now; send it as "
        "`Authorization: Bearer <key>`:"
    )
    console.print(key, markup=False, highlight=False, soft_wrap=True)


@keys_app.command("list")
def list_keys() -> None:
    """List key names, scopes, creation and last-use times (never the keys)."""
    table = Table("name", "scope", "created", "last used")
    for info in _key_store().list():
        table.add_row(info.name, info.scope, info.created, info.last_used or "never")
    console.print(table)


@keys_app.command("revoke")
def revoke_key(name: Annotated[str, typer.Argument(help="name of the key to revoke")]) -> None:
    """Delete a key; every API replica rejects it from the next request on."""
    key_store = _key_store()
    key_store.revoke(name)
    console.print(f"API key {name!r} revoked")
    if key_store.count() == 0:
        console.print(
            "[yellow]no API keys remain: the API keeps checking keys, so it now rejects every "
            "request to a route that needs a key; create a key with `layerbank keys create`, or "
            "set LAYERBANK_AUTH=off to turn key checks off on a loopback address[/yellow]",
            soft_wrap=True,
        )
