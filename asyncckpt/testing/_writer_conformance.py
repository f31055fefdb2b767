"""The streaming-writer part of the storage conformance suite (see :mod:`asyncckpt.testing.storage_suite`)."""

from __future__ import annotations

import asyncio

import pytest

from ..config import MiB
from ..errors import StorageError
from ..storage import ByteBudget, Storage
from ..storage._base import Buffer
from ._storage_checks import StorageChecks, list_keys, payload

__all__ = ["WriterConformance"]


class WriterConformance(StorageChecks):
    """What :meth:`Storage.writer <asyncckpt.storage.Storage.writer>` promises: streamed
    objects appear whole at ``commit`` or never, and release what they hold."""

    async def test_writer_streams_writes_into_one_object(self, storage: Storage) -> None:
        chunks: list[Buffer] = [b"header", b"", bytearray(b"middle" * 100), memoryview(b"0123456789")[2:8], b"end"]
        async with storage.writer("obj") as writer:
            assert writer.key == "obj"
            for chunk in chunks:
                await writer.write(chunk)
            info = await writer.commit()
        expected = b"".join(bytes(c) for c in chunks)
        assert (info.key, info.size) == ("obj", len(expected))
        await self.assert_holds(storage, "obj", expected)

    async def test_writer_of_less_than_one_part_round_trips(self, storage: Storage) -> None:
        data = payload(2 * MiB + 3, seed=13)
        budget = ByteBudget(10 * MiB)
        async with storage.writer("obj", budget=budget) as writer:
            await writer.write(data[:MiB])
            await writer.write(memoryview(data)[MiB:])
            info = await writer.commit()
        assert info.size == len(data)
        assert budget.in_use == 0
        await self.assert_holds(storage, "obj", data)

    async def test_writer_with_no_writes_commits_an_empty_object(self, storage: Storage) -> None:
        async with storage.writer("empty") as writer:
            info = await writer.commit()
        assert info.size == 0
        await self.assert_holds(storage, "empty", b"")

    async def test_writer_keeps_its_own_copy_of_written_buffers(self, storage: Storage) -> None:
        scratch = bytearray(1000)
        expected = bytearray()
        async with storage.writer("obj") as writer:
            for i in range(5):
                scratch[:] = bytes([i]) * 1000
                await writer.write(scratch)
                expected += scratch
            scratch[:] = b"\xff" * 1000
            await writer.commit()
        await self.assert_holds(storage, "obj", bytes(expected))

    async def test_writer_object_is_invisible_before_commit(self, storage: Storage) -> None:
        async with storage.writer("dir/obj") as writer:
            await writer.write(b"partial")
            await self.assert_absent(storage, "dir/obj")
            assert await list_keys(storage) == []
            await writer.write(b" and the rest")
            await writer.commit()
        await self.assert_holds(storage, "dir/obj", b"partial and the rest")

    async def test_writer_directory_is_invisible_before_commit(self, storage: Storage) -> None:
        async with storage.writer("dir/obj") as writer:
            await writer.write(b"partial")
            assert await storage.list_dirs() == []
            await writer.abort()
        assert await storage.list_dirs() == []

    async def test_writer_replaces_an_existing_object_only_at_commit(self, storage: Storage) -> None:
        await storage.put("obj", b"old")
        async with storage.writer("obj") as writer:
            await writer.write(b"new content")
            await self.assert_holds(storage, "obj", b"old")
            await writer.commit()
        await self.assert_holds(storage, "obj", b"new content")

    async def test_aborted_writer_leaves_nothing(self, storage: Storage) -> None:
        async with storage.writer("dir/obj") as writer:
            await writer.write(b"doomed")
            await writer.abort()
            await writer.abort()  # idempotent
        await self.assert_absent(storage, "dir/obj")
        assert await list_keys(storage) == []
        assert await storage.list_pending_uploads() == []

    async def test_aborted_writer_keeps_the_previous_object(self, storage: Storage) -> None:
        await storage.put("obj", b"old")
        async with storage.writer("obj") as writer:
            await writer.write(b"new")
            await writer.abort()
        await self.assert_holds(storage, "obj", b"old")

    async def test_exception_inside_writer_block_leaves_nothing(self, storage: Storage) -> None:
        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            async with storage.writer("dir/obj") as writer:
                await writer.write(b"doomed")
                raise Boom
        await self.assert_absent(storage, "dir/obj")
        assert await list_keys(storage) == []
        assert await storage.list_pending_uploads() == []

    async def test_writer_block_left_without_commit_leaves_nothing(self, storage: Storage) -> None:
        budget = ByteBudget(10 * MiB)
        writer = storage.writer("obj", budget=budget)
        try:
            async with writer:
                await writer.write(payload(6 * MiB, seed=14))  # more than one 5 MiB part
            # leaving the block uncommitted must release what the writer holds (part
            # buffers, a multipart upload, an open temp file), not only hide the object
            assert budget.in_use == 0
            await self.assert_absent(storage, "obj")
            assert await storage.list_pending_uploads() == []
        finally:
            await writer.abort()

    async def test_write_after_commit_raises_storage_error(self, storage: Storage) -> None:
        async with storage.writer("obj") as writer:
            await writer.write(b"data")
            await writer.commit()
            with pytest.raises(StorageError):
                await writer.write(b"more")
        await self.assert_holds(storage, "obj", b"data")

    async def test_write_after_abort_raises_storage_error(self, storage: Storage) -> None:
        async with storage.writer("obj") as writer:
            await writer.write(b"data")
            await writer.abort()
            with pytest.raises(StorageError):
                await writer.write(b"more")
        await self.assert_absent(storage, "obj")

    async def test_second_commit_raises_and_keeps_the_object(self, storage: Storage) -> None:
        async with storage.writer("obj") as writer:
            await writer.write(b"data")
            await writer.commit()
            with pytest.raises(StorageError):
                await writer.commit()
        await self.assert_holds(storage, "obj", b"data")

    async def test_commit_after_abort_raises_and_leaves_nothing(self, storage: Storage) -> None:
        async with storage.writer("obj") as writer:
            await writer.write(b"data")
            await writer.abort()
            with pytest.raises(StorageError):
                await writer.commit()
        await self.assert_absent(storage, "obj")

    async def test_abort_after_commit_keeps_the_object(self, storage: Storage) -> None:
        with pytest.raises(RuntimeError):
            async with storage.writer("obj") as writer:
                await writer.write(b"data")
                await writer.commit()
                raise RuntimeError("after commit")  # __aexit__ aborts: too late to matter
        await self.assert_holds(storage, "obj", b"data")

    async def test_writer_of_several_parts_round_trips(self, storage: Storage) -> None:
        data = payload(self.large_size, seed=8)
        view = memoryview(data)
        budget = ByteBudget(10 * MiB)
        sizes = [1, 4 * MiB + 3, MiB - 7, 5 * MiB, 333_331]  # uneven, crossing part boundaries
        scratch = bytearray(max(sizes))
        async with storage.writer("big/obj", budget=budget) as writer:
            pos, i = 0, 0
            while pos < len(data):
                n = min(sizes[i % len(sizes)], len(data) - pos)
                if i % 3 == 0:  # a reused buffer: the writer must copy before returning
                    scratch[:n] = view[pos : pos + n]
                    await writer.write(memoryview(scratch)[:n])
                    scratch[:n] = bytes(n)
                elif i % 3 == 1:
                    await writer.write(view[pos : pos + n])
                else:
                    await writer.write(bytes(view[pos : pos + n]))
                pos += n
                i += 1
            await self.assert_absent(storage, "big/obj")
            info = await writer.commit()
        assert (info.key, info.size) == ("big/obj", len(data))
        assert budget.in_use == 0
        await self.assert_holds(storage, "big/obj", data)
        assert await storage.list_pending_uploads() == []

    async def test_borrowed_writes_round_trip_between_copied_ones(self, storage: Storage) -> None:
        data = payload(self.large_size, seed=15)
        view = memoryview(data)
        budget = ByteBudget(10 * MiB)
        sizes = [100, 6 * MiB + 1, 333_331, 3 * MiB, 1]  # lent and copied pieces across part boundaries
        for hint in (len(data), None):
            async with storage.writer("lent", budget=budget, size_hint=hint) as writer:
                pos, i = 0, 0
                while pos < len(data):
                    n = min(sizes[i % len(sizes)], len(data) - pos)
                    if i % 2:
                        await writer.write_borrowed(view[pos : pos + n])
                    else:
                        await writer.write(bytes(view[pos : pos + n]))
                    pos, i = pos + n, i + 1
                info = await writer.commit()
            assert info.size == len(data)
            assert budget.in_use == 0
            await self.assert_holds(storage, "lent", data)
        assert await storage.list_pending_uploads() == []

    async def test_aborted_writer_of_several_parts_leaves_nothing(self, storage: Storage) -> None:
        data = payload(11 * MiB, seed=9)
        budget = ByteBudget(10 * MiB)
        async with storage.writer("big/obj", budget=budget) as writer:
            for start in range(0, len(data), 3 * MiB):
                await writer.write(data[start : start + 3 * MiB])
            await writer.abort()
        assert budget.in_use == 0
        await self.assert_absent(storage, "big/obj")
        assert await list_keys(storage) == []
        assert await storage.list_pending_uploads() == []

    async def test_concurrent_writers_of_different_keys(self, storage: Storage) -> None:
        async def write(i: int) -> None:
            async with storage.writer(f"w/{i}") as writer:
                for _ in range(3):
                    await writer.write(bytes([i]) * 100)
                    await asyncio.sleep(0)
                await writer.commit()

        async with asyncio.TaskGroup() as tg:
            for i in range(5):
                tg.create_task(write(i))
        for i in range(5):
            await self.assert_holds(storage, f"w/{i}", bytes([i]) * 300)
