"""structlog setup: JSON lines (or a console renderer for humans), one call at startup.

Event names are fixed snake_case strings (``http_request``, ``blob_cached``,
``digest_mismatch``, ...); context goes in key-value pairs, never in the event name.

Libraries that log through the standard library (aiohttp's ``aiohttp.server``, ``asyncio``)
go through the same pipeline, as ``library_log`` events (``logger``, ``message``), so every
line on stderr has one format — and passes the same scrubbing:

- No request header value ever reaches a log. aiohttp's HTTP parser refuses an oversized
  or malformed request with an exception whose text quotes the offending bytes (the first
  100 of an 8 KiB ``Authorization`` header: ``user:password``) and logs it with its
  traceback. Such records become ``http_request_rejected`` with the status and the
  parser's error class only.
- As a second line, credentials in any logged text (``Basic …``, ``Bearer …``) are
  replaced by ``[redacted]``, in tracebacks too.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TextIO

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from structlog.typing import EventDict, Processor, WrappedLogger

from proxy.config.settings import LogConfig

# A credential after its scheme; challenge parameters (``Bearer realm="…"``) are left alone.
_CREDENTIAL = re.compile(r"(?i)\b(basic|bearer)(\s+|%20)(?![A-Za-z_-]+=\")[A-Za-z0-9._~+/-]+=*")
_REDACTED = r"\1\2[redacted]"


def configure_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if config.format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    level = logging.getLevelName(config.level.upper())
    writer = LineWriter(stream or sys.stderr)
    # No merge_contextvars: nothing in pullgate binds structlog's context variables, and it
    # ran on every request's line.
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            UtcTimestamp(),
            structlog.processors.format_exc_info,
            scrub_credentials,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=writer.factory,
        cache_logger_on_first_use=False,
    )
    _route_stdlib(renderer, stream, max(level, logging.WARNING), writer)


def emit_info(event: str, fields: Callable[[], dict[str, Any]]) -> None:
    """An info event, through the configured processors to the configured logger, as
    ``structlog.get_logger().info(event, **fields())`` would send it — ``fields`` is only
    called when info events are written at all. For the line every request leaves: making
    a bound logger per call and dispatching through it cost as much as the processors
    themselves (~15 us of ~27), and the configuration is read once per call (structlog
    copies it for every reader). The dict ``fields`` returns becomes the event."""
    config = structlog.get_config()
    if not _emits_info(config["wrapper_class"]):
        return
    logger = config["logger_factory"]()
    rendered: Any = fields()
    rendered["event"] = event
    try:
        for processor in config["processors"]:
            rendered = processor(logger, "info", rendered)
    except structlog.DropEvent:
        return
    # What the last processor returned, passed on as structlog passes it.
    if isinstance(rendered, dict):
        logger.info(**rendered)
    elif isinstance(rendered, tuple):
        logger.info(*rendered[0], **rendered[1])
    else:
        logger.info(rendered)


@lru_cache(maxsize=16)
def _emits_info(wrapper_class: type) -> bool:
    """Whether loggers of structlog's configured ``wrapper_class`` emit info events. The
    level is fixed per class (``make_filtering_bound_logger`` makes one per level), so this
    is asked once per configuration; another kind of logger is assumed to emit."""
    is_enabled_for = getattr(wrapper_class(None, [], {}), "is_enabled_for", None)
    return True if is_enabled_for is None else bool(is_enabled_for(logging.INFO))


class UtcTimestamp:
    """The ``timestamp`` of every event: ISO 8601 in UTC with microseconds
    (``2026-12-02T02:01:51.590352Z``, as structlog's ``TimeStamper(fmt="iso", utc=True)``
    writes, but always with the fraction: fixed width). The date and time of day are
    formatted once per second — a ``datetime`` per event was ~7 us of the request line's
    ~25 us in the daemon (issue 16)."""

    __slots__ = ("_second",)

    def __init__(self) -> None:
        # (second, its text) in one attribute: threads that log replace it whole.
        self._second: tuple[int, str] = (-1, "")

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        event["timestamp"] = f"{cached[1]}.{int((now - second) * 1_000_000):06d}Z"
        return event


_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def _json_line(event: dict[str, Any], **kwargs: Any) -> str:
    """``JSONRenderer``'s serializer: orjson, with the standard library's output where they
    differ in kind (dataclasses and datetimes go to structlog's ``default``, as json does);
    what orjson refuses (an int past 64 bits, a lone surrogate) goes to json.dumps."""
    try:
        return orjson.dumps(event, default=kwargs.get("default"), option=_ORJSON_OPTIONS).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(event, **kwargs)


class LineWriter:
    """Where pullgate's events go: lines to a stream, those the event loop produces in one
    turn written together at the end of that turn.

    Each request leaves an ``http_request`` line; written and flushed on its own (structlog's
    ``PrintLogger``), every line is a ``write`` system call, and at the default level that
    took the warm-manifest rate from ~12,000 to ~5,500 req/s (issue 16). Lines made on the
    loop's thread wait in memory for a ``call_soon`` at the end of the turn — late by one
    turn at most, in order; a line made anywhere else (a worker thread, before the loop
    starts or after it stops) goes out at once, after whatever is pending. What is pending
    at exit is written then (``atexit``)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[str] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on
        self._lock = threading.Lock()  # lines come from worker threads too
        atexit.register(self.flush)

    def factory(self, *args: object) -> LineWriter:
        """structlog's ``logger_factory``: every bound logger writes here."""
        return self

    def msg(self, message: str) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread
            loop = None
        with self._lock:
            self._pending.append(message)
            # Per loop, not "a flush is due": one due on a loop that closed before running
            # it must not hold later lines back.
            schedule = loop is not None and self._scheduled is not loop
            if schedule:
                self._scheduled = loop
        if loop is None:
            self.flush()
        elif schedule:
            loop.call_soon(self.flush)

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg

    def flush(self) -> None:
        with self._lock:
            lines, self._pending, self._scheduled = self._pending, [], None
            if lines:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()


class _Bridge(logging.StreamHandler):  # type: ignore[type-arg]
    """The root logger's handler: library records, rendered like pullgate's own events.
    Without a stream it writes to the ``sys.stderr`` of the moment (as ``logging.lastResort``
    does), so a test harness that swaps stderr still sees the lines."""

    def __init__(self, stream: TextIO | None, writer: LineWriter) -> None:
        super().__init__(stream)
        self._fixed = stream
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        self._writer.flush()  # pullgate's own lines before this one, as they happened
        self.stream = self._fixed or sys.stderr
        super().emit(record)


def _route_stdlib(renderer: Processor, stream: TextIO | None, level: int, writer: LineWriter) -> None:
    """Replace the previous bridge (configure_logging runs again on SIGHUP); other handlers
    on the root logger (a test harness's) are left alone. Libraries log WARNING and up."""
    handler = _Bridge(stream, writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            pass_foreign_args=True,
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                UtcTimestamp(),
                library_event,
                structlog.processors.format_exc_info,
                scrub_credentials,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Bridge)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def library_event(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """A standard-library record as a fixed-name event; the HTTP parser's refusals without
    the bytes they quote."""
    record: logging.LogRecord = event["_record"]
    args = event.pop("positional_args", ())
    exc_info = event.get("exc_info")
    exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
    if isinstance(exc, HttpProcessingError):
        # aiohttp: log_exception("Error handling request from %s", request.remote, exc_info=exc)
        rejected: EventDict = {
            "event": "http_request_rejected",
            "level": "warning",  # the client's mistake, not ours
            "timestamp": event.get("timestamp"),
            "status": exc.code,
            "error": type(exc).__name__,
            "remote": args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else None,
            "_record": record,
            "_from_structlog": False,
        }
        if isinstance(exc, LineTooLong):
            rejected["limit"] = exc.args[1]  # (line, limit, actual size): the limit is ours
        return rejected
    event["message"] = event["event"]
    event["event"] = "library_log"
    event["logger"] = record.name
    return event


def scrub_credentials(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Replace ``Basic``/``Bearer`` credentials in every text value of the event."""
    for key, value in event.items():
        if isinstance(value, str) and _may_hold_credential(value):
            event[key] = _CREDENTIAL.sub(_REDACTED, value)
    return event


def _may_hold_credential(text: str) -> bool:
    """Whether ``_CREDENTIAL`` can match ``text`` at all: a cheap test first, because this
    runs on every text value of every event (an ``http_request`` line per request; the
    regex on each of its values cost ~15 us, half of the event). For the letters b, a, s,
    e and r, ``casefold`` agrees with the regex's case-insensitive matching character by
    character (checked over all of Unicode in tests/test_logs.py; not so for i: U+0131,
    the dotless i), so a text whose casefold holds neither "bas" nor "bearer" has no
    credential to redact."""
    folded = text.casefold()
    return "bas" in folded or "bearer" in folded
