"""Structured-concurrency helpers (TaskGroup based; never a bare gather)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["first_leaf", "run_all", "settle_all", "shielded"]


def first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf exception of a (possibly nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def run_all(aws: Iterable[Awaitable[T]], limit: int | None = None) -> list[T]:
    """Run awaitables concurrently (at most ``limit`` at once, when given); the first
    failure cancels the rest and is raised as is. Results come in the input's order."""
    tasks: list[asyncio.Task[T]] = []
    slots = asyncio.Semaphore(limit) if limit is not None else None
    try:
        async with asyncio.TaskGroup() as tg:
            for aw in aws:
                tasks.append(tg.create_task(_as_coro(aw, slots)))
    except BaseExceptionGroup as group:
        leaf = first_leaf(group)
        raise leaf.with_traceback(leaf.__traceback__) from None
    return [task.result() for task in tasks]


async def settle_all(named: dict[str, Awaitable[T]], limit: int) -> tuple[dict[str, T], dict[str, BaseException]]:
    """Run named awaitables, at most ``limit`` at once, letting each finish or fail on its own.

    Returns (results, failures). ``CancelledError`` of the caller propagates (and cancels
    everything still running); other exceptions are collected per name, never raised.
    """
    slots = asyncio.Semaphore(limit)
    results: dict[str, T] = {}
    failures: dict[str, BaseException] = {}

    async def one(name: str, aw: Awaitable[T]) -> None:
        async with slots:
            try:
                results[name] = await aw
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures[name] = exc

    async with asyncio.TaskGroup() as tg:
        for name, aw in named.items():
            tg.create_task(one(name, aw))
    return results, failures


async def _as_coro(aw: Awaitable[T], slots: asyncio.Semaphore | None = None) -> T:
    if slots is None:
        return await aw
    try:
        await slots.acquire()
    except BaseException:
        if inspect.iscoroutine(aw):
            aw.close()  # cancelled before it started: never "never awaited"
        raise
    try:
        return await aw
    finally:
        slots.release()


_background: set[asyncio.Task[Any]] = set()


async def shielded(aw: Awaitable[T]) -> T:
    """Await ``aw`` so that cancelling the caller does not cancel it (cleanup work).

    The task is kept referenced until it finishes, even if the caller is cancelled.
    """
    task = asyncio.ensure_future(aw)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return await asyncio.shield(task)
