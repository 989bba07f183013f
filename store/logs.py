"""Logging set-up shared by the API, the workers and the CLI: one format, one --log-level."""

from __future__ import annotations

import argparse
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def configure_logging(level: str | int) -> None:
    """Send every logger's records at ``level`` and above to stderr, with time, level and name."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level`` (case-insensitive, default INFO) to ``parser``."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="minimum level of the log lines written to stderr",
    )
