"""Local-directory storage (aiofiles): atomic temp-then-replace writes, exclusive create."""

from __future__ import annotations

import asyncio
import builtins
import collections
import errno
import itertools
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import aiofiles
import aiofiles.os

from ..errors import (
    CheckpointConflictError,
    CheckpointError,
    CheckpointNotFoundError,
    ObjectTooShortError,
    StorageError,
)
from ._base import (
    Buffer,
    ByteBudget,
    ObjectInfo,
    ObjectWriter,
    Storage,
    record_request,
    validate_key,
)

if TYPE_CHECKING:
    from aiofiles.threadpool.binary import AsyncBufferedIOBase

__all__ = ["LocalStorage"]

_TMP_SUFFIX = ".asyncckpt-tmp"
_IOV_MAX = 1024  # the most buffers one preadv takes (Linux's and macOS's IOV_MAX)
_HAS_PREADV = hasattr(os, "preadv")


def _translate(exc: OSError, url: str, key: str | None, *, writing: bool = False) -> CheckpointError:
    code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    if not writing and isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        # a key "below" an object, or a directory of keys, is no object either
        return CheckpointNotFoundError(f"{url} does not exist")
    if isinstance(exc, FileExistsError):
        return CheckpointConflictError(f"{url} already exists")
    return StorageError(f"{url}: {exc.strerror or exc} ({code})", key=key, code=code)


class LocalStorage(Storage):
    """Objects as files below a root directory.

    Writes go to a temporary file in the target's directory that is fsync'ed and then
    renamed over the target (``os.replace``), so a reader or a crash never sees a
    partial file. ``create_only`` writes publish with ``os.link``, which fails if the
    target exists: of two racing creators exactly one wins.
    """

    kind = "file"

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True):
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()
        self.fsync = fsync

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    async def get(self, key: str) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        try:
            # open, read and close in one worker call: a cancel can never leak the handle
            data = await asyncio.to_thread(read)
        except OSError as exc:
            record_request()
            raise _translate(exc, self.url_of(key), key) from None
        record_request(received=len(data))
        return data

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        buffer = memoryview(bytearray(end - start))
        await self.read_into(key, buffer, start)
        return bytes(buffer)

    async def read_into(self, key: str, buffer: memoryview, start: int = 0) -> None:
        await self.read_scatter(key, (buffer,), start)

    async def read_scatter(self, key: str, views: Sequence[memoryview], start: int = 0) -> None:
        """``os.preadv`` into ``views`` in a worker thread, repeated after a short read
        from the byte it stopped at (cancelling the caller does not stop the thread)."""
        path = self._path(key)
        wanted = [view for view in views if view.nbytes]
        size = sum(view.nbytes for view in wanted)

        def read() -> int:
            with open(path, "rb", buffering=0) as f:  # (open, not os.open: a directory is refused here)
                pending = collections.deque(wanted)
                got = 0
                while pending:
                    if _HAS_PREADV:
                        n = os.preadv(f.fileno(), list(itertools.islice(pending, _IOV_MAX)), start + got)
                    else:  # (Windows) one view at a time
                        f.seek(start + got)
                        n = f.readinto(pending[0])
                    if not n:
                        break  # the end of the file
                    got += n
                    while n:  # drop what is full, trim what is partly
                        if n >= pending[0].nbytes:
                            n -= pending.popleft().nbytes
                        else:
                            pending[0], n = pending[0][n:], 0
                return got

        try:
            got = await asyncio.to_thread(read)
        except OSError as exc:
            record_request()
            raise _translate(exc, self.url_of(key), key) from None
        record_request(received=got)
        if got != size:
            raise ObjectTooShortError(
                f"{self.url_of(key)}: object ends before byte {start + size} (range {start}-{start + size})",
                key=key,
            )

    async def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        record_request()
        try:
            st = await aiofiles.os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _translate(exc, self.url_of(key), key) from None
        if not stat.S_ISREG(st.st_mode):
            return None  # a directory of keys is not an object
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def _walk(self, prefix: str) -> list[ObjectInfo]:
        base_dir = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        out: list[ObjectInfo] = []
        if not base_dir.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(base_dir):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or name.endswith(_TMP_SUFFIX):
                    continue
                full = Path(dirpath, name)
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        st = full.stat()
                    except FileNotFoundError:
                        continue  # deleted since the walk saw it (a concurrent delete or gc): not listed
                    out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        out.sort(key=lambda info: info.key)
        return out

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        record_request()
        try:
            items = await asyncio.to_thread(self._walk, prefix)
        except OSError as exc:
            raise _translate(exc, self.url_of(prefix), prefix) from None
        for info in items:
            yield info

    async def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        directory = self.root / prefix if prefix else self.root
        record_request()

        def holds_an_object(path: str) -> bool:
            for _dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                if any(not f.startswith(".") for f in filenames):
                    return True
            return False

        def scan() -> list[str]:
            # like an S3 delimiter listing: a directory counts once it holds a committed
            # object (empty ones, or ones holding only a writer's temp file, do not)
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                return []
            return sorted(
                e.name for e in entries if e.is_dir() and not e.name.startswith(".") and holds_an_object(e.path)
            )

        try:
            return await asyncio.to_thread(scan)
        except OSError as exc:
            raise _translate(exc, self.url_of(prefix), prefix) from None

    async def put(self, key: str, data: Buffer, *, create_only: bool = False) -> None:
        writer = _LocalWriter(self, key, create_only=create_only)
        async with writer:
            await writer.write(data)
            await writer.commit()

    def writer(self, key: str, *, budget: ByteBudget | None = None, size_hint: int | None = None) -> ObjectWriter:
        return _LocalWriter(self, key)

    async def delete(self, keys: Iterable[str]) -> None:
        paths = [self._path(k) for k in keys]
        for path in paths:
            record_request()
            try:
                await aiofiles.os.remove(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise _translate(exc, self.url_of(str(path.relative_to(self.root))), None) from None
            await asyncio.to_thread(self._prune_empty_parents, path.parent)

    def _prune_empty_parents(self, directory: Path) -> None:
        """Remove directories left empty by a delete, up to (not including) the root."""
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone)
                return
            directory = directory.parent

    async def check_root(self) -> None:
        record_request()

        def probe() -> None:
            path = self.root
            while not path.exists():  # the root is created on the first write
                path = path.parent
            if not path.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "permission denied", str(path))

        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            raise StorageError(f"{self.url}: not usable ({exc})", code=errno.errorcode.get(exc.errno or 0)) from None


class _LocalWriter(ObjectWriter):
    def __init__(self, storage: LocalStorage, key: str, *, create_only: bool = False):
        self.key = key
        self._storage = storage
        self._path = storage._path(key)
        # not derived from the target's name: a target name near the file system's limit
        # (255 bytes) must not make its temporary file's name pass it
        self._tmp = self._path.with_name(f".{uuid.uuid4().hex}{_TMP_SUFFIX}")
        self._file: AsyncBufferedIOBase | None = None
        self._size = 0
        self._create_only = create_only
        self._closed = False

    async def write(self, data: Buffer) -> None:
        if self._closed:
            raise StorageError(f"{self._storage.url_of(self.key)}: write after commit/abort", key=self.key)
        try:
            if self._file is None:
                await aiofiles.os.makedirs(self._path.parent, exist_ok=True)
                self._file = await _open_uncancellable(self._tmp)
            await self._file.write(data)
        except OSError as exc:
            raise _translate(exc, self._storage.url_of(self.key), self.key, writing=True) from None
        self._size += memoryview(data).nbytes
        record_request(sent=memoryview(data).nbytes)

    async def commit(self) -> ObjectInfo:
        if self._closed:
            raise StorageError(f"{self._storage.url_of(self.key)}: commit after commit/abort", key=self.key)
        if self._file is None:
            await self.write(b"")
        assert self._file is not None
        try:
            await self._file.flush()
            if self._storage.fsync:
                await asyncio.to_thread(os.fsync, self._file.fileno())
            await self._file.close()
            if self._create_only:
                await asyncio.to_thread(os.link, self._tmp, self._path)
                await aiofiles.os.remove(self._tmp)
            else:
                await aiofiles.os.replace(self._tmp, self._path)
        except FileExistsError:
            await self.abort()
            raise CheckpointConflictError(f"{self._storage.url_of(self.key)} already exists") from None
        except OSError as exc:
            await self.abort()
            raise _translate(exc, self._storage.url_of(self.key), self.key, writing=True) from None
        self._closed = True
        self._file = None
        record_request(objects_written=1)
        return ObjectInfo(self.key, self._size, time.time())

    async def abort(self) -> None:
        if self._closed and self._file is None:
            return
        self._closed = True
        if self._file is not None:
            try:
                await self._file.close()
            except OSError:
                pass
        try:
            await aiofiles.os.remove(self._tmp)
        except OSError:
            pass


async def _open_uncancellable(path: Path) -> AsyncBufferedIOBase:
    """``aiofiles.open(path, "wb")`` that leaves nothing behind when the caller is
    cancelled while the worker thread opens the file: the open is let finish, the handle
    closed and the file removed, and only then does the cancellation propagate."""
    opening = asyncio.ensure_future(aiofiles.open(path, "wb"))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        try:
            handle = await opening
        except Exception:  # the open failed: nothing to undo
            raise asyncio.CancelledError from None
        await handle.close()
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
