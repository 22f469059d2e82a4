"""proxy.singleflight: one task per key, shared by concurrent callers, never cancelled
by one caller leaving, forgotten when done."""

from __future__ import annotations

import asyncio

import pytest

from proxy.singleflight import SingleFlight


class Boom(RuntimeError):
    pass


async def test_concurrent_callers_share_one_run() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls = 0
    gate = asyncio.Event()

    async def work() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 42

    waiters = [asyncio.create_task(flight.run("k", work)) for _ in range(20)]
    await asyncio.sleep(0)
    assert "k" in flight and len(flight) == 1 and flight.keys() == {"k"}
    gate.set()
    assert await asyncio.gather(*waiters) == [42] * 20
    assert calls == 1
    assert len(flight) == 0  # finished work leaves the map: nothing is cached


async def test_joined_reports_coalescing() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 1

    first, joined_first = flight.joined("k", work)
    second, joined_second = flight.joined("k", work)
    assert (joined_first, joined_second) == (False, True) and first is second
    gate.set()
    assert await first == 1


@pytest.mark.parametrize(
    ("outcome", "expected_error"),
    [("value", None), ("error", Boom)],
)
async def test_results_and_errors_reach_every_caller(outcome: str, expected_error: type[Exception] | None) -> None:
    flight: SingleFlight[str, str] = SingleFlight()

    async def work() -> str:
        await asyncio.sleep(0)
        if outcome == "error":
            raise Boom("failed once for everyone")
        return "ok"

    results = await asyncio.gather(*(flight.run("k", work) for _ in range(3)), return_exceptions=True)
    if expected_error is None:
        assert results == ["ok"] * 3
    else:
        assert all(isinstance(r, expected_error) for r in results)
    assert len(flight) == 0


async def test_one_caller_cancelled_does_not_cancel_the_work() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 7

    leaver = asyncio.create_task(flight.run("k", work))
    stayer = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    leaver.cancel()
    await asyncio.sleep(0)
    gate.set()
    assert await stayer == 7
    assert leaver.cancelled()


async def test_new_run_after_completion_starts_fresh_work() -> None:
    flight: SingleFlight[int, int] = SingleFlight()
    counter = 0

    async def work() -> int:
        nonlocal counter
        counter += 1
        return counter

    assert await flight.run(1, work) == 1
    assert await flight.run(1, work) == 2


async def test_close_cancels_running_work() -> None:
    flight: SingleFlight[str, None] = SingleFlight()
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.Event().wait()

    task, _ = flight.joined("k", work)
    await started.wait()
    await flight.close()
    assert task.cancelled() and len(flight) == 0
