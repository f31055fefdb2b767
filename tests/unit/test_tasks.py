"""_tasks: run_all, settle_all and shielded (TaskGroup based), as the layers above use them."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

from asyncckpt._tasks import first_leaf, run_all, settle_all, shielded


async def value_after(value: int, ticks: int) -> int:
    for _ in range(ticks):
        await asyncio.sleep(0)
    return value


async def fail_after(exc: Exception, ticks: int = 1) -> int:
    for _ in range(ticks):
        await asyncio.sleep(0)
    raise exc


class Gauge:
    """Counts how many of its ``hold`` calls run at once."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    async def hold(self, value: int) -> int:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await value_after(value, 3)
        finally:
            self.now -= 1
        return value


# --------------------------------------------------------------------------- run_all


async def test_run_all_returns_results_in_the_inputs_order() -> None:
    assert await run_all([value_after(1, 5), value_after(2, 0), value_after(3, 2)]) == [1, 2, 3]
    assert await run_all([]) == []


async def test_run_all_runs_at_most_limit_at_once() -> None:
    gauge = Gauge()
    assert await run_all((gauge.hold(i) for i in range(10)), limit=3) == list(range(10))
    assert gauge.peak == 3
    unlimited = Gauge()
    await run_all(unlimited.hold(i) for i in range(10))
    assert unlimited.peak == 10


async def test_run_all_raises_the_first_failure_as_is_and_cancels_the_rest() -> None:
    cancelled = asyncio.Event()

    async def forever() -> int:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    with pytest.raises(KeyError, match="boom"):
        await run_all([forever(), fail_after(KeyError("boom"))])
    assert cancelled.is_set()


async def test_run_all_closes_the_awaitables_it_never_started() -> None:
    finished: list[int] = []

    async def record(i: int) -> int:
        await asyncio.sleep(3600)
        finished.append(i)
        return i

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(OSError):
            await run_all([fail_after(OSError("first")), record(1), record(2)], limit=1)
        gc.collect()
    assert finished == []
    assert not [w for w in caught if "never awaited" in str(w.message)]


# --------------------------------------------------------------------------- settle_all


async def test_settle_all_lets_each_finish_or_fail_on_its_own() -> None:
    results, failures = await settle_all(
        {"a": value_after(1, 3), "b": fail_after(ValueError("b failed")), "c": value_after(3, 0)}, limit=2
    )
    assert results == {"a": 1, "c": 3}
    assert list(failures) == ["b"]
    assert isinstance(failures["b"], ValueError) and str(failures["b"]) == "b failed"


async def test_settle_all_runs_at_most_limit_at_once() -> None:
    gauge = Gauge()
    results, failures = await settle_all({str(i): gauge.hold(i) for i in range(7)}, limit=2)
    assert (len(results), failures, gauge.peak) == (7, {}, 2)


async def test_cancelling_settle_all_propagates_and_cancels_what_still_runs() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever() -> int:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    task = asyncio.create_task(settle_all({"slow": forever()}, limit=1))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


# --------------------------------------------------------------------------- shielded, first_leaf


async def test_shielded_work_finishes_when_its_caller_is_cancelled() -> None:
    started, finished = asyncio.Event(), asyncio.Event()

    async def cleanup() -> int:
        started.set()
        await asyncio.sleep(0.01)
        finished.set()
        return 5

    caller = asyncio.create_task(shielded(cleanup()))
    await asyncio.wait_for(started.wait(), 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(finished.wait(), 5)
    assert await shielded(value_after(7, 1)) == 7


def test_first_leaf_is_the_first_exception_of_nested_groups() -> None:
    leaf = KeyError("leaf")
    group = BaseExceptionGroup("outer", [ExceptionGroup("inner", [leaf, ValueError()]), OSError()])
    assert first_leaf(group) is leaf
