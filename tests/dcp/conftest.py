"""Helpers of the DCP plugin tests: a checkpoint location's raw objects, behind the plugin's back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from asyncckpt.storage import Storage, storage_for

T = TypeVar("T")


def on_storage(location: Any, action: Callable[[Storage], Coroutine[Any, Any, T]]) -> T:
    """``await action(storage)`` on the raw storage of ``location`` (behind the plugin's back)."""

    async def run() -> T:
        async with storage_for(location.url, options=location.options) as storage:
            return await action(storage)

    return asyncio.run(run())


def object_keys(location: Any) -> list[str]:
    """Every object key stored at ``location``."""

    async def keys(storage: Storage) -> list[str]:
        return [info.key async for info in storage.list("")]

    return on_storage(location, keys)
