"""The ``layerbank`` command line."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console
from typer.core import TyperGroup

from service.cli_commands import ApiKeyOption, check_url_option
from service.cli_commands import register as register_api_commands
from service.cli_keys import keys_app
from store.errors import StoreError
from workers.errors import WorkersError


class LayerbankGroup(TyperGroup):
    """The root command group, which prints domain errors of any subcommand as one stderr line.

    StoreError (invalid ids and names, API key and settings errors, ...) and WorkersError carry
    a message written for the user, so a traceback adds nothing. They exit with code 1.
    """

    # typer 0.29 bundles its own click, whose Context is not importable under a public name.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (StoreError, WorkersError) as exc:
            _exit_with_error(str(exc))
        except (RedisConnectionError, RedisTimeoutError) as exc:
            reason = str(exc).rstrip(".")
            _exit_with_error(f"cannot reach Redis ({reason}); check REDIS_URL and that Redis runs")
        except RedisError as exc:
            _exit_with_error(f"Redis failed: {exc}")


def _exit_with_error(message: str) -> NoReturn:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(1)


app = typer.Typer(
    cls=LayerbankGroup,
    help="layerbank: a feature store and probing service for vision transformers.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """Return a socket bound to ``host``:``port``, or exit with one error line if that fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn does: a port whose last connections are closing can be bound again, while a
    # port with a listening socket still cannot.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        _exit_with_error(
            f"cannot listen on {host}:{port} ({reason}); stop what uses that port or pass "
            "another with --port"
        )
    sock.set_inheritable(True)
    return sock


@app.command()
def up(
    host: Annotated[str, typer.Option(help="address the API binds to")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    store: Annotated[
        str, typer.Option(envvar="LAYERBANK_STORE", help="store root")
    ] = "./data/store",
    workers: Annotated[int, typer.Option(min=0, help="worker processes to start")] = 1,
) -> None:
    """Start the embedded stack: a private Redis, workers and the API."""
    import uvicorn
    from redis import Redis

    from service.app import create_app
    from service.auth import KeyStore, keys_required
    from service.launcher import (
        RedisServer,
        WorkerSupervisor,
        free_port,
        terminate_on_sigterm,
    )
    from store.logs import configure_logging
    from store.settings import load_settings

    configure_logging(logging.INFO)

    if not store.strip():
        err.print(
            f"error: invalid --store {store!r}: give a store folder, or leave the option out "
            "for ./data/store",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    terminate_on_sigterm()
    redis_server = None
    redis_url = os.environ.get("REDIS_URL")
    store_path = Path(store).expanduser()
    # Check the environment before starting anything: an invalid value ends the command here
    # (the first call reads it as the workers will, the second as the API will).
    load_settings(store=str(store_path))
    settings = load_settings(store=str(store_path), host=host, port=port)
    # The API's socket is bound before Redis and workers start, so a busy port ends the
    # command with one line and nothing to clean up.
    api_socket = _bind(host, port)
    log_dir = store_path.parent / "logs"
    redis_dir = store_path.parent / "redis"
    for folder in [store_path, log_dir] if redis_url else [store_path, redis_dir, log_dir]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            api_socket.close()
            _exit_with_error(
                f"cannot create the folder {folder} ({exc.strerror or exc}); pass a --store "
                "path whose folders can be created and written"
            )
    if redis_url is None:
        redis_server = RedisServer(free_port(), redis_dir, persistent=True)
        try:
            redis_url = redis_server.start().url
        except RuntimeError as exc:
            err.print(f"error: {exc}", markup=False, soft_wrap=True)
            api_socket.close()
            raise typer.Exit(1) from None
    settings = settings.model_copy(update={"redis_url": redis_url})
    key_store = KeyStore(Redis.from_url(redis_url))
    if not _is_loopback(host) and (settings.auth == "off" or key_store.count() == 0):
        err.print(
            f"error: refusing to bind to {host}: API keys are off or none exist; create one "
            "with `layerbank keys create` (REDIS_URL set) or bind to 127.0.0.1",
            markup=False,
            soft_wrap=True,
        )
        if redis_server is not None:
            redis_server.stop()
        api_socket.close()
        raise typer.Exit(2)
    env = {"LAYERBANK_STORE": str(store_path), "REDIS_URL": redis_url}
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host=host, port=port, log_level="info")
    )
    stack_failures: list[str] = []

    def stop_stack(reason: str) -> None:
        stack_failures.append(reason)
        server.should_exit = True

    supervisor = WorkerSupervisor(
        workers, redis_url, env=env, log_dir=log_dir, on_give_up=stop_stack
    )
    console.print(
        f"layerbank up: API http://{host}:{port}  store {store_path}  redis "
        f"{redis_url}  workers {workers} (logs in {log_dir})"
    )
    if not keys_required(settings, key_store):
        console.print(
            "[yellow]open mode: no API keys are checked; anyone who can reach "
            f"{host}:{port} on this machine can use the API[/yellow]"
        )
    if redis_server is not None:
        # Only a Redis this command started is restarted: an external REDIS_URL is left alone.
        redis_server.supervise(stop_stack)
    try:
        server.run(sockets=[api_socket])
    finally:
        api_socket.close()
        # Workers first, while Redis still runs, so they can finish or give back their jobs.
        supervisor.stop()
        if redis_server is not None:
            redis_server.stop()
    if stack_failures:
        _exit_with_error(stack_failures[0])


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="exit when the queue is empty")] = False,
) -> None:
    """Run one worker on REDIS_URL and LAYERBANK_QUEUE (for extra GPU machines)."""
    from workers.main import main

    main(["--burst"] if burst else [])


@app.command()
def demo(
    url: Annotated[
        str,
        typer.Option(callback=check_url_option, help="API to use; started locally if not running"),
    ] = "http://127.0.0.1:8000",
    output: Annotated[Path, typer.Option(help="directory for the curve PNG")] = Path("demo-output"),
    steps: Annotated[int, typer.Option(min=1, help="pretraining steps")] = 1000,
    name: Annotated[
        str | None,
        typer.Option(
            help="store name of the pretrained model (default: digits-igpt, with the steps "
            "appended when --steps is not 1000)"
        ),
    ] = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Pretrain a small ImageGPT on digits, extract every layer, probe, print and plot."""
    from service.client import ApiConnectionError, Client, ClientError
    from service.demo import embedded_stack_address, run_demo
    from service.launcher import (
        WORKER_STOP_TIMEOUT,
        stop_process,
        terminate_on_sigterm,
        wait_for_http,
    )

    # Checked before anything starts, and without creating the folder yet.
    existing = next((path for path in (output, *output.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        _exit_with_error(
            f"cannot create the --output folder {output} ({existing} is a file); pass a folder path"
        )
    terminate_on_sigterm()
    stack = None
    client = Client(url, api_key=api_key, timeout=120)
    try:
        health: dict[str, object] | None = client.health()
    except ApiConnectionError:
        health = None  # nothing listens there: start the embedded stack
    except ClientError:
        health = {}
    if health is not None and not {"status", "redis", "workers"} <= set(health):
        client.close()
        _exit_with_error(f"{url} responds, but not as a layerbank API; pass --url with a free port")
    if health is None:
        try:
            host, port = embedded_stack_address(url)
        except ValueError as exc:
            client.close()
            err.print(
                f"error: no API at {url}, and the embedded stack cannot start there: {exc}",
                markup=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        console.print(f"no API at {url}: starting the embedded stack (layerbank up)", markup=False)
        output.mkdir(parents=True, exist_ok=True)
        stack_log = output / "stack.log"
        with stack_log.open("ab") as log:
            stack = subprocess.Popen(
                [
                    sys.executable,
                    "-P",
                    "-m",
                    "service.cli",
                    "up",
                    "--host",
                    host,
                    "--port",
                    str(port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_http(f"{url.rstrip('/')}/healthz", timeout=90)
            if stack.poll() is not None:
                raise TimeoutError("layerbank up exited")
        except TimeoutError:
            stop_process(stack)
            _exit_with_error(f"the embedded stack did not start; its output is in {stack_log}")
    try:
        run_demo(client, output, steps=steps, console=console, name=name)
    except ClientError as exc:
        hint = ""
        if exc.status_code == 401:
            hint = "; pass a write key with --api-key or LAYERBANK_API_KEY"
        elif (
            exc.status_code == 422
            and isinstance(exc.detail, dict)
            and exc.detail.get("field") == "name"
        ):
            # A model of that name was pretrained with settings other than the demo's.
            hint = "; or run the demo with --name NEW to pretrain its model under another name"
        _exit_with_error(f"demo failed: {exc}{hint}")
    finally:
        client.close()
        # The stack stops its workers before Redis. Killing it before it is done would leave
        # both to the parent-death signal at the same moment, and Redis might go first.
        stop_process(stack, timeout=WORKER_STOP_TIMEOUT + 30)


register_api_commands(app)
app.add_typer(keys_app, name="keys")

if __name__ == "__main__":
    app()
