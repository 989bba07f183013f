"""API entry point for containers: ``python -m service.serve``.

Builds the app from the environment (``LAYERBANK_*``, ``REDIS_URL``) and serves it with uvicorn
on ``LAYERBANK_HOST``:``LAYERBANK_PORT``. Unlike ``layerbank up`` it starts no Redis and no
workers: in a deployment those are separate services.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from typing import TYPE_CHECKING, Any

from store.logs import add_log_level_argument, configure_logging
from store.settings import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

# Passes --log-level from the parent to uvicorn's worker processes, which start as fresh
# interpreters (multiprocessing "spawn") and import create_worker_app by name.
LOG_LEVEL_ENV = "LAYERBANK_SERVE_LOG_LEVEL"


def create_worker_app() -> FastAPI:
    """Build the app in a uvicorn worker process, logging as the parent process does."""
    from service.app import create_app

    configure_logging(os.environ.get(LOG_LEVEL_ENV, "INFO"))
    return create_app()


def is_loopback(host: str) -> bool:
    """Return whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Raise SystemExit when the API would listen beyond loopback with API keys turned off.

    With ``LAYERBANK_AUTH`` "auto" or "required" the app itself demands keys from callers on a
    non-loopback address; "off" is only safe on loopback.
    """
    if is_loopback(settings.host) or settings.auth != "off":
        return
    raise SystemExit(
        f"refusing to bind the API to LAYERBANK_HOST={settings.host!r} with LAYERBANK_AUTH="
        f"{settings.auth!r}: set LAYERBANK_AUTH=required and create keys with "
        "`layerbank keys create`, or bind to 127.0.0.1"
    )


def main(argv: list[str] | None = None) -> None:
    """Serve the API until interrupted."""
    import uvicorn

    from service.app import create_app

    parser = argparse.ArgumentParser(prog="python -m service.serve", description=__doc__)
    add_log_level_argument(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes sharing the port (uvicorn workers); each builds its own app",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    configure_logging(args.log_level)

    try:
        settings = get_settings()
    except SettingsError as exc:
        raise SystemExit(f"error: {exc}") from None
    check_bind(settings)
    logger.info(
        "API on %s:%d, store %s, queue %s",
        settings.host,
        settings.port,
        settings.store,
        settings.queue,
    )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": args.log_level.lower(),
        "proxy_headers": True,
    }
    if args.workers == 1:
        uvicorn.run(create_app(settings), **options)
    else:
        # Worker processes import the app factory and read the same environment.
        os.environ[LOG_LEVEL_ENV] = args.log_level
        uvicorn.run(
            "service.serve:create_worker_app", factory=True, workers=args.workers, **options
        )


if __name__ == "__main__":
    main()
