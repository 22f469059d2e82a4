"""Progress for the operator tools (``warm``, ``export``, ``import``): one bar per task with
bytes, rate and ETA on a terminal, plain log lines otherwise (CI logs, ``| tee``, cron mail).

On a TTY the live bars are redrawn in place at most ``interval`` times a second with ANSI
cursor movement (CSI ``nA`` up, ``J`` erase below); a finished task is printed once as a
permanent line above the bars, so a long run leaves one line per task behind. Without a TTY
each task logs a line when it starts to report progress (every ``interval`` seconds, default
10 s) and one when it ends. Rate is bytes / seconds since the task started: steady, and
honest about stalls.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from typing import TextIO

from proxy.config.units import format_size

_BAR = 24
_LABEL = 48  # label column, at most: the bars of concurrent tasks line up
_STATS = 72  # the usual width of the bar and numbers after the label
_TTY_INTERVAL = 0.1
_PLAIN_INTERVAL = 10.0


class Task:
    """One transfer: ``advance`` as bytes move, ``finish`` or ``fail`` once at the end."""

    def __init__(self, progress: Progress, label: str, total: int | None, now: float) -> None:
        self._progress = progress
        self.label = label
        self.total = total
        self.done = 0
        self.started = now
        self.ended: float | None = None
        self.outcome = ""  # "", "done" or "failed"
        self.note = ""
        self.last_report = now

    def set_total(self, total: int | None) -> None:
        self.total = total
        self._progress.changed()

    def advance(self, count: int) -> None:
        self.done += count
        self._progress.changed()

    def finish(self, note: str = "") -> None:
        self._end("done", note)

    def fail(self, note: str) -> None:
        self._end("failed", note)

    def _end(self, outcome: str, note: str) -> None:
        if self.ended is None:
            self.ended, self.outcome, self.note = self._progress.clock(), outcome, note
            self._progress.ended(self)

    def line(self, now: float, width: int) -> str:
        """``label [####----]  45%  12.0 MiB / 27.0 MiB  15.2 MiB/s  ETA 0:03`` (live) or the
        summary of an ended task."""
        elapsed = max((self.ended or now) - self.started, 1e-6)
        rate = self.done / elapsed
        if self.outcome == "failed":  # ended lines stay on screen whole: a terminal wraps them
            spent = f" after {format_size(self.done)} in {elapsed:.1f}s" if self.done else ""
            return f"{self.label}: failed{spent}" + (f": {self.note}" if self.note else "")
        if self.outcome:
            text = f"done {format_size(self.done)} in {elapsed:.1f}s ({format_size(rate)}/s)"
            return f"{self.label}: {text}{'  ' + self.note if self.note else ''}"
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            filled = int(fraction * _BAR)
            eta = (self.total - self.done) / rate if rate > 0 else None
            stats = (
                f"[{'#' * filled}{'-' * (_BAR - filled)}] {fraction * 100:3.0f}%  "
                f"{format_size(self.done)} / {format_size(self.total)}  {format_size(rate)}/s  ETA {_clock(eta)}"
            )
        else:
            stats = f"{format_size(self.done)}  {format_size(rate)}/s"
        room = max(min(width - _STATS - 2, _LABEL), 10)
        return f"{_fit(self.label, room):<{room}}  {stats}"


class Progress:
    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval = interval if interval is not None else (_TTY_INTERVAL if self.tty else _PLAIN_INTERVAL)
        self.clock = clock
        self._width = width
        self._live: list[Task] = []
        self._drawn = 0  # live lines currently on screen (TTY)
        self._last_draw = float("-inf")
        self._lock = threading.Lock()  # export/import advance from a worker thread

    def task(self, label: str, total: int | None = None) -> Task:
        task = Task(self, label, total, self.clock())
        with self._lock:
            self._live.append(task)
            if not self.tty:
                self._write(f"{label}: started" + (f" ({format_size(total)})" if total else "") + "\n")
            else:
                self._draw(force=True)
        return task

    def changed(self) -> None:
        with self._lock:
            if self.tty:
                self._draw(force=False)
            else:
                self._report_plain()

    def ended(self, task: Task) -> None:
        with self._lock:
            if task in self._live:
                self._live.remove(task)
            line = task.line(self.clock(), self.width) + "\n"
            if self.tty:
                self._draw(force=True, above=line)
            else:
                self._write(line)

    def close(self) -> None:
        """Leave the screen clean (live bars of unfinished tasks stay as they are)."""
        with self._lock:
            if self.tty:
                self._draw(force=True)

    @property
    def width(self) -> int:
        return self._width or shutil.get_terminal_size((100, 24)).columns

    def _draw(self, *, force: bool, above: str = "") -> None:
        now = self.clock()
        if not force and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        clear = f"\x1b[{self._drawn}A\r\x1b[J" if self._drawn else "\r\x1b[J"
        lines = [task.line(now, self.width - 1) for task in self._live]
        self._write(clear + above + "".join(line + "\n" for line in lines))
        self._drawn = len(lines)

    def _report_plain(self) -> None:
        now = self.clock()
        for task in self._live:
            if now - task.last_report >= self.interval:
                task.last_report = now
                self._write(task.line(now, 10_000).rstrip() + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
