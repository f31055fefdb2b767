"""In-memory storage: named stores shared by every manager of the process (tests, demos)."""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence

from ..errors import CheckpointConflictError, CheckpointNotFoundError, ObjectTooShortError, StorageError
from ._base import (
    Buffer,
    ByteBudget,
    ObjectInfo,
    ObjectWriter,
    Storage,
    record_request,
    validate_key,
)

__all__ = ["MemoryStorage", "drop_memory_store"]


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, tuple[bytes, float]] = {}


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


def _named_store(name: str) -> _Store:
    with _STORES_LOCK:
        return _STORES.setdefault(name, _Store())


def drop_memory_store(name: str) -> None:
    """Forget the in-memory store ``memory://name`` and everything in it."""
    with _STORES_LOCK:
        _STORES.pop(name, None)


class MemoryStorage(Storage):
    """Objects in a process-wide dict keyed by store name and prefix.

    Two managers opened on ``memory://name`` see the same objects. Written bytes are
    copied, so callers may reuse their buffers.
    """

    kind = "memory"

    def __init__(self, name: str, prefix: str = ""):
        if not name:
            raise ValueError("memory:// URL needs a store name, e.g. memory://scratch")
        self.name = name
        self.prefix = prefix.strip("/")
        self.url = f"memory://{name}" + (f"/{self.prefix}" if self.prefix else "")
        self._store = _named_store(name)

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _lookup(self, key: str) -> bytes:
        with self._store.lock:
            item = self._store.objects.get(self._full(key))
        if item is None:
            record_request()
            raise CheckpointNotFoundError(f"{self.url_of(key)} does not exist")
        return item[0]

    async def get(self, key: str) -> bytes:
        data = self._lookup(key)
        record_request(received=len(data))
        return data

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        data = self._lookup(key)
        if not 0 <= start <= end:
            raise ValueError(f"invalid byte range {start}-{end} of {self.url_of(key)}")
        if end > len(data):
            raise ObjectTooShortError(
                f"{self.url_of(key)}: object of {len(data)} bytes ends before byte {end}", key=key
            )
        record_request(received=end - start)
        return data[start:end]

    async def read_into(self, key: str, buffer: memoryview, start: int = 0) -> None:
        await self.read_scatter(key, (buffer,), start)

    async def read_scatter(self, key: str, views: Sequence[memoryview], start: int = 0) -> None:
        data = self._lookup(key)
        end = start + sum(view.nbytes for view in views)
        if start < 0:
            raise ValueError(f"invalid byte offset {start} of {self.url_of(key)}")
        if end > len(data) and end > start:
            raise ObjectTooShortError(
                f"{self.url_of(key)}: object of {len(data)} bytes ends before byte {end}", key=key
            )
        record_request(received=end - start)
        source = memoryview(data)
        for view in views:
            view[:] = source[start : start + view.nbytes]
            start += view.nbytes

    async def head(self, key: str) -> ObjectInfo | None:
        with self._store.lock:
            item = self._store.objects.get(self._full(key))
        record_request()
        return None if item is None else ObjectInfo(key, len(item[0]), item[1])

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        full_prefix = root + prefix
        record_request()
        with self._store.lock:
            items = sorted((k, v) for k, v in self._store.objects.items() if k.startswith(full_prefix))
        for full, (data, mtime) in items:
            yield ObjectInfo(full[len(root) :], len(data), mtime)

    async def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        dirs = set()
        async for info in self.list(prefix):
            rest = info.key[len(prefix) :]
            if "/" in rest:
                dirs.add(rest.split("/", 1)[0])
        return sorted(dirs)

    async def put(self, key: str, data: Buffer, *, create_only: bool = False) -> None:
        full = self._full(key)
        payload = bytes(data)
        record_request(sent=len(payload), objects_written=1)
        with self._store.lock:
            if create_only and full in self._store.objects:
                raise CheckpointConflictError(f"{self.url_of(key)} already exists")
            self._store.objects[full] = (payload, time.time())

    def writer(self, key: str, *, budget: ByteBudget | None = None, size_hint: int | None = None) -> ObjectWriter:
        return _MemoryWriter(self, key)

    async def delete(self, keys: Iterable[str]) -> None:
        fulls = [self._full(k) for k in keys]
        record_request()
        with self._store.lock:
            for full in fulls:
                self._store.objects.pop(full, None)

    async def check_root(self) -> None:
        record_request()


class _MemoryWriter(ObjectWriter):
    def __init__(self, storage: MemoryStorage, key: str):
        storage._full(key)
        self.key = key
        self._storage = storage
        self._parts: list[bytes] = []
        self._done = False

    async def write(self, data: Buffer) -> None:
        if self._done:
            raise StorageError(f"{self._storage.url_of(self.key)}: write after commit/abort", key=self.key)
        self._parts.append(bytes(data))

    async def commit(self) -> ObjectInfo:
        if self._done:
            raise StorageError(f"{self._storage.url_of(self.key)}: commit after commit/abort", key=self.key)
        data = b"".join(self._parts)
        self._parts = []
        self._done = True
        await self._storage.put(self.key, data)
        return ObjectInfo(self.key, len(data), time.time())

    async def abort(self) -> None:
        self._parts = []
        self._done = True
