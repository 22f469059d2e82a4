"""The progress renderer with a fake clock: bars redrawn in place on a terminal (throttled),
plain log lines otherwise, and a summary line per finished task either way."""

from __future__ import annotations

import io

import pytest

from proxy.ops.progress import Progress

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("total", "done", "elapsed", "expected"),
    [
        (10 * MiB, 5 * MiB, 1.0, "[############------------]  50%  5.0 MiB / 10.0 MiB  5.0 MiB/s  ETA 0:01"),
        (10 * MiB, 0, 1.0, "[------------------------]   0%  0 B / 10.0 MiB  0 B/s  ETA --:--"),
        (4000 * MiB, 1 * MiB, 1.0, "ETA 1:06:39"),
        (None, 3 * MiB, 2.0, "  3.0 MiB  1.5 MiB/s"),
        (MiB, 2 * MiB, 1.0, "100%"),
    ],
)
def test_live_line(total: int | None, done: int, elapsed: float, expected: str) -> None:
    clock = Clock()
    progress = Progress(io.StringIO(), tty=True, clock=clock, width=120)
    task = progress.task("app:1", total)
    task.done = done
    assert expected in task.line(clock.now + elapsed, 120)


def test_tty_redraws_in_place_and_keeps_finished_lines() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, tty=True, clock=clock, width=80)
    first = progress.task("first", 100)
    second = progress.task("second", 100)
    before = out.getvalue()
    first.advance(10)  # within the throttle interval: no redraw
    assert out.getvalue() == before
    clock.now += 1
    first.advance(10)
    redraw = out.getvalue()[len(before) :]
    assert redraw.startswith("\x1b[2A\r\x1b[J") and redraw.count("\n") == 2
    first.finish("ok")
    tail = out.getvalue().split("\x1b[J")[-1]
    assert tail.startswith("first: done 20 B in 1.0s") and "ok" in tail
    assert tail.count("\n") == 2 and "second" in tail.splitlines()[1]
    second.fail("boom")
    progress.close()
    assert out.getvalue().split("\x1b[J")[-1] == ""  # nothing live left on screen


def test_plain_lines_start_periodic_and_end() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, tty=False, clock=clock, interval=10)
    task = progress.task("export out.tar", 100 * MiB)
    task.advance(10 * MiB)
    clock.now += 5
    task.advance(10 * MiB)
    clock.now += 6
    task.advance(10 * MiB)
    clock.now += 1
    task.fail("digest mismatch")
    lines = out.getvalue().splitlines()
    assert lines[0] == "export out.tar: started (100.0 MiB)"
    assert lines[1].startswith("export out.tar") and "30%" in lines[1] and "ETA 0:26" in lines[1]
    assert lines[2] == "export out.tar: failed after 30.0 MiB in 12.0s: digest mismatch"
    assert len(lines) == 3
    assert "\x1b" not in out.getvalue()
