"""Helpers shared by the storage conformance suite's parts (see :mod:`asyncckpt.testing.storage_suite`)."""

from __future__ import annotations

import random

import pytest

from ..config import MiB
from ..errors import CheckpointNotFoundError
from ..storage import ObjectInfo, Storage

__all__ = ["INVALID_KEYS", "StorageChecks", "list_infos", "list_keys", "payload"]

#: Keys every backend must reject with ``ValueError`` before touching storage.
INVALID_KEYS = ("", "../x", "/abs", "a//b", ".hidden", "x/", "a/./b", "a/../b", "a/.hidden", "sp ace")


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes (never compressible, never all zeros)."""
    return random.Random(seed).randbytes(size)


async def list_keys(storage: Storage, prefix: str = "") -> list[str]:
    """The keys ``storage.list(prefix)`` yields, in its order."""
    return [info.key async for info in storage.list(prefix)]


async def list_infos(storage: Storage, prefix: str = "") -> list[ObjectInfo]:
    """What ``storage.list(prefix)`` yields, in its order."""
    return [info async for info in storage.list(prefix)]


class StorageChecks:
    """Assertions on a storage's visible state, shared by every part of the suite."""

    #: Size of the "large" objects: more than two 5 MiB parts, with a short last part.
    large_size: int = 12 * MiB + 12345

    async def assert_absent(self, storage: Storage, key: str) -> None:
        """``key`` is invisible to every read path."""
        assert await storage.head(key) is None
        assert not await storage.exists(key)
        with pytest.raises(CheckpointNotFoundError):
            await storage.get(key)
        assert key not in await list_keys(storage)

    async def assert_holds(self, storage: Storage, key: str, data: bytes) -> None:
        """``key`` holds exactly ``data`` on every read path."""
        got = await storage.get(key)
        assert type(got) is bytes
        assert len(got) == len(data)
        assert got == data
        info = await storage.head(key)
        assert info is not None
        assert (info.key, info.size) == (key, len(data))
        assert await storage.exists(key)
