"""structlog setup: JSON lines (or a console renderer for humans), one call at startup.

Event names are fixed snake_case strings (``http_request``, ``blob_cached``,
``digest_mismatch``, ...); context goes in key-value pairs, never in the event name.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from proxy.config.settings import LogConfig


def configure_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if config.format == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(config.level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
