"""What a hung test was waiting for. pytest-timeout (``timeout`` in pyproject.toml) fails a
test that runs too long and prints every thread's stack; an asyncio test's main thread is
then only ever in the event loop's ``select``, which says nothing. So before that, the
timeout also prints each asyncio task with the chain of awaits it is suspended in (a
coroutine's ``cr_await``, down to the future nobody resolved)."""

from __future__ import annotations

import asyncio
import signal
from types import FrameType
from typing import Any

import pytest
import pytest_timeout
from _pytest._io import TerminalWriter


def set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """pytest-timeout's ``signal`` method, with the asyncio tasks printed first."""
    if settings.method != "signal":
        return None

    def handler(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        print_tasks(item.config.get_terminal_writer())
        pytest_timeout.timeout_sigalrm(item, settings)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # what pytest-timeout's cancel hook calls
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


def print_tasks(terminal: TerminalWriter) -> None:
    try:
        loop = asyncio.get_running_loop()  # the signal arrives on the loop's own thread
    except RuntimeError:
        return
    terminal.sep("+", title="asyncio tasks")
    for task in asyncio.all_tasks(loop):
        terminal.line(repr(task))
        for line in awaiting(task.get_coro()):
            terminal.line("    " + line)


_FRAMES = ("cr_frame", "ag_frame", "gi_frame")
_AWAITS = ("cr_await", "ag_await", "gi_yieldfrom")


def awaiting(awaitable: object) -> list[str]:
    """Where a suspended coroutine (or generator) is, and what it awaits, outermost first."""
    lines: list[str] = []
    while awaitable is not None:
        frame = next((getattr(awaitable, a) for a in _FRAMES if hasattr(awaitable, a)), None)
        if frame is None:  # a future, or something else at the bottom of the chain
            lines.append(f"awaits {awaitable!r}"[:300])
            break
        lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaitable = next((getattr(awaitable, a) for a in _AWAITS if hasattr(awaitable, a)), None)
    return lines
