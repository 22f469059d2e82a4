"""Logging (``proxy.ops.logs``): library records rendered like pullgate's own events, and no
request header value in any log line — the HTTP parser's refusals quote the offending
bytes, so they are logged without them; credentials anywhere else are redacted.

The attack from the security review is mounted against the real daemon: requests whose
``Authorization`` (and other) headers pass the 8 KiB limit, then everything the process
wrote is scanned."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import socket
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from proxy.config.settings import LogConfig
from proxy.ops.logs import UtcTimestamp, configure_logging, emit_info
from tests.support.daemon import Daemon

SECRET = "s3cret-pa55word-for-the-log-scan"


@pytest.fixture
def stream() -> io.StringIO:
    """Logs configured as the daemon does, into a buffer; the previous setup comes back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    configure_logging(LogConfig(level="info", format="json"), stream=out)
    yield out
    structlog.configure(**saved)
    root.handlers[:], root.level = handlers, level


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "Authorization: Basic [redacted]"),
        ("bearer eyJhbGciOiJFUzI1NiJ9.e30.c2ln rest", "bearer [redacted] rest"),
        ("b'Basic YWxpY2U6c2VjcmV0...'", "b'Basic [redacted]'"),  # the parser's truncated quote
        ("GET /x?h=Bearer%20abc.def", "GET /x?h=Bearer%20[redacted]"),
        ('Bearer realm="https://auth.example/token",service="registry"', None),  # a challenge: kept
        ('WWW-Authenticate: Basic realm="pullgate"', None),
        ("basically fine", None),
        # Other spellings the regex matches case-insensitively: each still redacted.
        ("BASIC dXNlcjpwYXNz", "BASIC [redacted]"),
        ("BEARER%20abc", "BEARER%20[redacted]"),
        ("ba\u017f\u0131c dXNlcjpwYXNz", "ba\u017f\u0131c [redacted]"),  # long s, dotless i
        ("Bas\u0130c dXNlcjpwYXNz", "Bas\u0130c [redacted]"),  # dotted capital I
        ("hello world", None),
    ],
)
def test_credentials_are_redacted_in_every_text(stream: io.StringIO, text: str, logged: str | None) -> None:
    structlog.get_logger("pullgate.test").warning("something_happened", detail=text)
    (event,) = lines(stream)
    assert event["detail"] == (text if logged is None else logged)


@pytest.mark.parametrize("letter", sorted(set("basebearer")))
def test_the_cheap_precheck_agrees_with_the_regex_for_every_character(letter: str) -> None:
    """``_may_hold_credential`` skips the regex on texts without "bas"/"bearer" after
    casefold: sound only if every character the regex takes for one of these letters
    casefolds to exactly that letter."""
    every_character = "".join(map(chr, range(sys.maxunicode + 1)))
    takes = [m.group() for m in re.finditer(letter, every_character, re.IGNORECASE)]
    assert takes and all(c.casefold() == letter for c in takes), takes


def test_library_records_are_events_too(stream: io.StringIO) -> None:
    logging.getLogger("asyncio").error("Task exception was never retrieved: %s", "Basic dXNlcjpwYXNz")
    logging.getLogger("aiohttp.server").info("below the library threshold")
    (event,) = lines(stream)
    assert event["event"] == "library_log" and event["logger"] == "asyncio" and event["level"] == "error"
    assert event["message"] == "Task exception was never retrieved: Basic [redacted]"


async def test_lines_of_one_loop_turn_are_written_together_in_order(stream: io.StringIO) -> None:
    log = structlog.get_logger("pullgate.test")
    writes: list[str] = []
    write = stream.write
    stream.write = lambda text: writes.append(text) or write(text)  # type: ignore[method-assign]
    for number in range(3):
        log.info("in_the_loop", number=number)
    assert stream.getvalue() == ""  # not yet: at the end of this turn
    await asyncio.sleep(0)
    assert [event["number"] for event in lines(stream)] == [0, 1, 2]
    assert len(writes) == 1  # one write for the turn's three lines


async def test_a_line_from_another_thread_goes_out_at_once_after_the_pending_ones(stream: io.StringIO) -> None:
    log = structlog.get_logger("pullgate.test")
    log.info("first_in_the_loop")
    worker = threading.Thread(target=log.warning, args=("from_a_worker",))
    worker.start()
    worker.join()  # the loop's turn has not ended: only the worker's line can have flushed
    assert [event["event"] for event in lines(stream)] == ["first_in_the_loop", "from_a_worker"]
    log.info("second_in_the_loop")
    await asyncio.sleep(0)
    assert [event["event"] for event in lines(stream)] == ["first_in_the_loop", "from_a_worker", "second_in_the_loop"]


def test_a_flush_due_on_a_loop_that_closed_holds_no_later_line_back(stream: io.StringIO) -> None:
    log = structlog.get_logger("pullgate.test")

    def log_and_stop() -> None:
        log.info("last_turn")  # its flush is due at the end of this turn, which is the last
        loop.stop()

    loop = asyncio.new_event_loop()
    loop.call_soon(log_and_stop)
    loop.run_forever()
    loop.close()  # the due flush never ran
    assert stream.getvalue() == ""

    async def log_again() -> None:
        log.info("next_loop")

    asyncio.run(log_again())
    assert [event["event"] for event in lines(stream)] == ["last_turn", "next_loop"]


async def test_a_library_record_comes_after_the_lines_before_it(stream: io.StringIO) -> None:
    structlog.get_logger("pullgate.test").info("ours_first")
    logging.getLogger("asyncio").error("then the library's")
    assert [event["event"] for event in lines(stream)] == ["ours_first", "library_log"]


def test_emit_info_writes_what_a_bound_logger_would(stream: io.StringIO) -> None:
    fields = {"status": 200, "user_agent": "curl Bearer abc.def", "big": 2**70, "text": "caf\u00e9"}
    structlog.get_logger("pullgate.test").info("same_event", **fields)
    emit_info("same_event", lambda: dict(fields))
    ours, theirs = lines(stream)
    assert ours.pop("timestamp") and theirs.pop("timestamp")
    assert ours == theirs
    assert ours["user_agent"] == "curl Bearer [redacted]" and ours["big"] == 2**70  # scrubbed; json's fallback


@pytest.mark.parametrize("source", ["ours", "library"])
def test_every_line_is_stamped_in_utc_to_the_microsecond(stream: io.StringIO, source: str) -> None:
    before = datetime.now(UTC)
    for _ in range(3):
        if source == "ours":
            structlog.get_logger("pullgate.test").info("stamped")
        else:
            logging.getLogger("asyncio").warning("stamped")
    after = datetime.now(UTC)
    stamps = [str(event["timestamp"]) for event in lines(stream)]
    assert len(stamps) == 3
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
        assert before - timedelta(milliseconds=1) <= datetime.fromisoformat(stamp) <= after
    assert stamps == sorted(stamps)


def test_the_stamp_follows_the_clock_across_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The date and time of day are cached per second: a new second (or a clock set back)
    gets its own text, never the previous second's."""
    stamper = UtcTimestamp()
    for now, expected in [
        (1_796_169_599.999999, "2026-12-01T23:59:59.999999Z"),
        (1_796_169_600.0, "2026-12-02T00:00:00.000000Z"),
        (1_796_169_600.25, "2026-12-02T00:00:00.250000Z"),
        (1_796_169_599.5, "2026-12-01T23:59:59.500000Z"),  # set back
    ]:
        monkeypatch.setattr("proxy.ops.logs.time.time", lambda now=now: now)
        assert stamper(None, "info", {})["timestamp"] == expected


@pytest.mark.parametrize(("level", "built"), [("info", 1), ("debug", 1), ("warning", 0), ("error", 0)])
def test_emit_info_builds_the_event_only_when_it_is_written(level: str, built: int) -> None:
    """The request line's fields are built only if info events are written at all: at
    ``warning`` a request costs no event."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    out = io.StringIO()
    calls: list[int] = []

    def fields() -> dict[str, object]:
        calls.append(1)
        return {"status": 200}

    try:
        configure_logging(LogConfig(level=level, format="json"), stream=out)
        emit_info("built_or_not", fields)
        structlog.get_logger("pullgate.test").error("flush")  # no loop: lines go out at once
    finally:
        structlog.configure(**saved)
        root.handlers[:], root.level = handlers, root_level
    assert len(calls) == built
    assert [event["event"] for event in lines(out)] == ["built_or_not"] * built + ["flush"]


def test_without_a_running_loop_every_line_goes_out_at_once(stream: io.StringIO) -> None:
    structlog.get_logger("pullgate.test").info("at_start_up")
    assert [event["event"] for event in lines(stream)] == ["at_start_up"]


def test_parser_refusals_are_logged_without_the_bytes_they_quote(stream: io.StringIO) -> None:
    from aiohttp.http_exceptions import BadHttpMessage, InvalidHeader, LineTooLong

    for exc in (LineTooLong(b"X-Api-Key: " + SECRET.encode(), 8192), InvalidHeader(SECRET.encode()),
                BadHttpMessage(f"bad header {SECRET}")):  # fmt: skip
        try:
            raise exc
        except BadHttpMessage:
            logging.getLogger("aiohttp.server").exception("Error handling request from %s", "192.0.2.7")
    events = lines(stream)
    assert SECRET not in stream.getvalue()
    assert [(e["event"], e["error"], e["status"], e["remote"], e["level"]) for e in events] == [
        ("http_request_rejected", "LineTooLong", 400, "192.0.2.7", "warning"),
        ("http_request_rejected", "InvalidHeader", 400, "192.0.2.7", "warning"),
        ("http_request_rejected", "BadHttpMessage", 400, "192.0.2.7", "warning"),
    ]
    assert events[0]["limit"] == 8192


def oversized(name: str, value: str) -> bytes:
    return f"GET /v2/ HTTP/1.1\r\nHost: m\r\n{name}: {value}\r\n\r\n".encode()


ATTACKS = [
    oversized("Authorization", "Basic " + base64.b64encode(f"alice:{SECRET}".encode() + b"x" * 9000).decode()),
    oversized("Authorization", f"Bearer {SECRET}" + "y" * 9000),
    oversized("Proxy-Authorization", f"Basic {SECRET}" + "z" * 9000),
    oversized("Cookie", f"session={SECRET}" + "c" * 9000),
    oversized("X-Api-Key", SECRET + "k" * 9000),
    f"GET /v2/ HTTP/1.1\r\nHost: m\r\nAuthorization: Basic {SECRET}\x00\r\n\r\n".encode(),  # a NUL in the value
    f"GET /v2/ HTTP/1.1\r\nHost: m\r\nAuthori zation: {SECRET}\r\n\r\n".encode(),  # a space in the name
    f"GET /v2/ HTTP/1.1\r\nHost: m\r\n{SECRET}\r\n\r\n".encode(),  # no colon at all
]


def test_no_header_value_reaches_the_daemons_log(tmp_path: Path) -> None:
    with Daemon(tmp_path, "http://127.0.0.1:9", access={"enabled": False}) as daemon:
        answers = []
        for request in ATTACKS:
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
                sock.sendall(request)
                answers.append(sock.recv(200).split(b" ", 2)[1])
        http_status_ok = [a for a in answers if a != b"400"]
    log = daemon.log.read_text()
    assert not http_status_ok, f"every attack is refused by the parser: {answers}"
    assert SECRET not in log
    assert "Traceback" not in log
    events = [e for e in daemon.events() if e.get("event") == "http_request_rejected"]
    assert len(events) == len(ATTACKS)
    assert {e["status"] for e in events} == {400}
    assert {e["remote"] for e in events} == {"127.0.0.1"}
