"""Logging set-up shared by the API, the workers and the CLI: one format, one --log-level."""

from __future__ import annotations

import argparse
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def escape_nonprintable(value: object) -> str:
    """Return ``value`` as text with every non-printable character escaped, for log lines.

    Request-controlled text (paths, queries, body values) goes through this before it is
    logged, so that a client cannot write terminal escapes, NUL or line breaks into the log.
    Non-printable means what ``str.isprintable`` rejects: C0 controls, DEL, C1 controls, line
    and paragraph separators, format characters such as U+202E, lone surrogates and unassigned
    code points. Each becomes ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``. A backslash is kept as
    it is, so escaping twice changes nothing, but a literal ``\\x1b`` in the input reads the
    same as an escaped ESC.
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


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
