"""The conformance suite every :class:`~asyncckpt.storage.Storage` backend must pass.

Subclass :class:`StorageConformance` once per backend and provide a ``storage`` fixture
that yields an *opened* storage on an *empty* root::

    class TestMemoryStorage(StorageConformance):
        @pytest.fixture
        async def storage(self):
            async with MemoryStorage(f"t-{uuid.uuid4().hex}") as storage:
                yield storage

The tests are ``async def`` and expect pytest-asyncio in ``asyncio_mode = "auto"``.
The fixture may hand the same opened storage to several tests (to save the cost of
opening a client) as long as the root is empty again before each test.
A fixture that also places objects *next to* the root (a sibling prefix or directory)
makes the isolation checks meaningful: nothing outside the root may ever be listed.
A backend with multipart uploads should be configured with a small part size (5 MiB on
S3) so that :attr:`StorageConformance.large_size` spans several parts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from ..config import MiB
from ..errors import CheckpointConflictError, CheckpointNotFoundError, ObjectTooShortError, StorageError
from ..storage import Storage, collect_request_stats
from ._storage_checks import INVALID_KEYS, list_infos, list_keys, payload
from ._writer_conformance import WriterConformance

__all__ = ["INVALID_KEYS", "StorageConformance", "payload"]


class StorageConformance(WriterConformance):
    """The contract of :class:`~asyncckpt.storage.Storage`, as tests. Needs a ``storage`` fixture.

    The writer tests come from :class:`WriterConformance`, the shared assertions
    (:meth:`assert_absent`, :meth:`assert_holds`) from :class:`StorageChecks`.
    """

    # -- missing keys ----------------------------------------------------------------------

    async def test_get_of_missing_key_raises_not_found(self, storage: Storage) -> None:
        with pytest.raises(CheckpointNotFoundError) as info:
            await storage.get("missing")
        assert isinstance(info.value, FileNotFoundError)
        assert "missing" in str(info.value)

    async def test_get_range_of_missing_key_raises_not_found(self, storage: Storage) -> None:
        with pytest.raises(CheckpointNotFoundError):
            await storage.get_range("missing", 0, 10)

    async def test_read_into_of_missing_key_raises_not_found(self, storage: Storage) -> None:
        buffer = bytearray(10)
        with pytest.raises(CheckpointNotFoundError):
            await storage.read_into("missing", memoryview(buffer), 0)
        assert buffer == bytearray(10)

    async def test_zero_length_read_of_missing_key_raises_not_found(self, storage: Storage) -> None:
        with pytest.raises(CheckpointNotFoundError):
            await storage.get_range("missing", 0, 0)
        with pytest.raises(CheckpointNotFoundError):
            await storage.read_into("missing", memoryview(bytearray(0)))

    async def test_head_of_missing_key_returns_none(self, storage: Storage) -> None:
        assert await storage.head("missing") is None
        assert await storage.head("no/such/dir/missing") is None
        assert not await storage.exists("missing")

    async def test_key_below_an_object_is_missing(self, storage: Storage) -> None:
        await storage.put("file", b"data")
        assert await storage.head("file/below") is None
        with pytest.raises(CheckpointNotFoundError):
            await storage.get("file/below")
        with pytest.raises(CheckpointNotFoundError):
            await storage.get_range("file/below", 0, 1)
        await storage.delete(["file/below"])
        await self.assert_holds(storage, "file", b"data")

    async def test_directory_of_keys_is_not_an_object(self, storage: Storage) -> None:
        await storage.put("dir/child", b"data")
        assert await storage.head("dir") is None
        assert not await storage.exists("dir")
        with pytest.raises(CheckpointNotFoundError):
            await storage.get("dir")
        with pytest.raises(CheckpointNotFoundError):
            await storage.get_range("dir", 0, 1)
        assert await list_keys(storage) == ["dir/child"]

    # -- put / get -------------------------------------------------------------------------

    @pytest.mark.parametrize("size", [0, 1, 1000, 256 * 1024 + 1])
    async def test_put_then_get_round_trips(self, storage: Storage, size: int) -> None:
        data = payload(size, seed=size)
        put: Callable[..., Awaitable[object]] = storage.put  # a backend that is not type-checked may return something
        assert await put("obj", data) is None
        await self.assert_holds(storage, "obj", data)

    async def test_large_object_round_trips(self, storage: Storage) -> None:
        data = payload(self.large_size, seed=1)
        await storage.put("big/obj", data)
        await self.assert_holds(storage, "big/obj", data)
        assert (
            await storage.get_range("big/obj", self.large_size - 5 * MiB - 3, self.large_size) == data[-5 * MiB - 3 :]
        )

    @pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
    async def test_put_accepts_any_buffer(self, storage: Storage, kind: type) -> None:
        data = payload(2 * MiB + 1, seed=2)  # above aiohttp's 1 MiB "large raw body" threshold
        await storage.put("obj", kind(data))
        await self.assert_holds(storage, "obj", data)

    async def test_put_accepts_a_sliced_memoryview(self, storage: Storage) -> None:
        data = payload(4096, seed=3)
        await storage.put("obj", memoryview(data)[100:200])
        await self.assert_holds(storage, "obj", data[100:200])

    async def test_put_overwrites(self, storage: Storage) -> None:
        await storage.put("obj", b"old content, longer")
        await storage.put("obj", b"new")
        await self.assert_holds(storage, "obj", b"new")
        assert await list_keys(storage) == ["obj"]

    async def test_put_keeps_its_own_copy_of_the_buffer(self, storage: Storage) -> None:
        buffer = bytearray(b"original")
        await storage.put("obj", buffer)
        buffer[:] = b"mutated!"
        await storage.put("view", memoryview(buffer))
        buffer[:] = b"mutated?"
        await self.assert_holds(storage, "obj", b"original")
        await self.assert_holds(storage, "view", b"mutated!")

    async def test_get_result_is_not_shared_with_the_store(self, storage: Storage) -> None:
        await storage.put("obj", b"abc")
        first = await storage.get("obj")
        assert isinstance(first, bytes)  # immutable, so callers cannot alter the store
        assert await storage.get("obj") == b"abc"

    async def test_nested_keys_are_independent(self, storage: Storage) -> None:
        await storage.put("a/b/c", b"1")
        await storage.put("a/b/d", b"2")
        await storage.put("a/e", b"3")
        await self.assert_holds(storage, "a/b/c", b"1")
        await self.assert_holds(storage, "a/b/d", b"2")
        await self.assert_holds(storage, "a/e", b"3")

    # -- create_only -----------------------------------------------------------------------

    async def test_create_only_creates_a_missing_key(self, storage: Storage) -> None:
        await storage.put("lock", b"mine", create_only=True)
        await self.assert_holds(storage, "lock", b"mine")

    async def test_create_only_on_existing_key_raises_conflict_and_keeps_content(self, storage: Storage) -> None:
        await storage.put("lock", b"first")
        with pytest.raises(CheckpointConflictError) as info:
            await storage.put("lock", b"second", create_only=True)
        assert isinstance(info.value, FileExistsError)
        await self.assert_holds(storage, "lock", b"first")
        assert await list_keys(storage) == ["lock"]

    async def test_create_only_after_delete_succeeds(self, storage: Storage) -> None:
        await storage.put("lock", b"first", create_only=True)
        await storage.delete(["lock"])
        await storage.put("lock", b"second", create_only=True)
        await self.assert_holds(storage, "lock", b"second")

    async def test_racing_create_only_puts_exactly_one_wins(self, storage: Storage) -> None:
        contenders = [f"writer {i}".encode() * (i + 1) for i in range(5)]
        results = await asyncio.gather(
            *(storage.put("dir/lock", data, create_only=True) for data in contenders), return_exceptions=True
        )
        winners = [data for data, result in zip(contenders, results) if result is None]
        losers = [result for result in results if result is not None]
        assert len(winners) == 1, results
        assert all(isinstance(exc, CheckpointConflictError) for exc in losers), losers
        await self.assert_holds(storage, "dir/lock", winners[0])
        assert await list_keys(storage) == ["dir/lock"]

    # -- ranges ----------------------------------------------------------------------------

    @pytest.mark.parametrize(("start", "end"), [(0, 1000), (0, 1), (999, 1000), (10, 20), (500, 500), (1000, 1000)])
    async def test_get_range_returns_the_sub_range(self, storage: Storage, start: int, end: int) -> None:
        data = payload(1000, seed=4)
        await storage.put("obj", data)
        got = await storage.get_range("obj", start, end)
        assert type(got) is bytes
        assert got == data[start:end]

    async def test_read_into_fills_exactly_the_buffer(self, storage: Storage) -> None:
        data = payload(1000, seed=5)
        await storage.put("obj", data)
        target = bytearray(b"\xee" * 120)
        await storage.read_into("obj", memoryview(target)[10:110], 300)
        assert target[:10] == b"\xee" * 10
        assert target[10:110] == data[300:400]
        assert target[110:] == b"\xee" * 10

    async def test_read_into_starts_at_zero_by_default(self, storage: Storage) -> None:
        data = payload(64, seed=6)
        await storage.put("obj", data)
        target = bytearray(64)
        await storage.read_into("obj", memoryview(target))
        assert target == data

    async def test_read_into_a_large_buffer(self, storage: Storage) -> None:
        data = payload(3 * MiB + 17, seed=7)
        await storage.put("obj", data)
        target = bytearray(len(data) - 1)
        await storage.read_into("obj", memoryview(target), 1)
        assert target == data[1:]

    @pytest.mark.parametrize(("start", "end"), [(5, 11), (9, 20), (10, 11), (12, 15)])
    async def test_get_range_past_the_end_raises_object_too_short(self, storage: Storage, start: int, end: int) -> None:
        await storage.put("obj", b"0123456789")
        with pytest.raises(ObjectTooShortError) as info:
            await storage.get_range("obj", start, end)
        assert isinstance(info.value, StorageError)
        assert info.value.key == "obj"
        assert "obj" in str(info.value)

    @pytest.mark.parametrize("start", [8, 10, 11])
    async def test_read_into_past_the_end_raises_object_too_short(self, storage: Storage, start: int) -> None:
        await storage.put("obj", b"0123456789")
        with pytest.raises(ObjectTooShortError) as info:
            await storage.read_into("obj", memoryview(bytearray(4)), start)
        assert info.value.key == "obj"

    async def test_read_past_the_end_of_a_large_object_raises_object_too_short(self, storage: Storage) -> None:
        data = payload(3 * MiB + 5, seed=16)
        await storage.put("obj", data)
        with pytest.raises(ObjectTooShortError):
            await storage.read_into("obj", memoryview(bytearray(2 * MiB)), 2 * MiB)
        with pytest.raises(ObjectTooShortError):
            await storage.get_range("obj", 0, len(data) + 1)
        assert await storage.get_range("obj", 0, len(data)) == data  # the object itself is intact

    async def test_read_scatter_fills_the_views_in_order(self, storage: Storage) -> None:
        data = payload(1000, seed=17)
        await storage.put("obj", data)
        target = bytearray(b"\xee" * 300)
        whole = memoryview(target)
        views = [whole[200:210], whole[0:0], whole[0:100], whole[150:151], whole[100:150]]  # not in memory order
        await storage.read_scatter("obj", views, 7)
        assert target[200:210] == data[7:17]
        assert target[0:100] == data[17:117]
        assert target[150:151] == data[117:118]
        assert target[100:150] == data[118:168]
        assert target[151:200] == b"\xee" * 49  # the bytes between the views are untouched
        assert target[210:] == b"\xee" * 90

    async def test_read_scatter_views_straddle_the_chunks_of_a_large_read(self, storage: Storage) -> None:
        data = payload(3 * MiB + 17, seed=18)
        await storage.put("obj", data)
        sizes = [1, 64 * 1024 - 1, 0, 64 * 1024 + 1, MiB + 3, 0, 7, 4096 * 3 + 5]
        start = 5
        sizes.append(len(data) - start - sum(sizes))  # the last view ends where the object does
        buffers = [bytearray(size) for size in sizes]
        await storage.read_scatter("obj", [memoryview(b) for b in buffers], start)
        assert b"".join(buffers) == data[start:]

    async def test_read_scatter_from_an_offset_in_the_middle(self, storage: Storage) -> None:
        data = payload(3 * MiB, seed=19)
        await storage.put("obj", data)
        first, second = bytearray(2 * MiB - 100), bytearray(50)
        await storage.read_scatter("obj", [memoryview(first), memoryview(second)], MiB + 1)
        assert first == data[MiB + 1 : 3 * MiB - 99]
        assert second == data[3 * MiB - 99 : 3 * MiB - 49]

    async def test_read_scatter_of_no_bytes_only_checks_that_the_object_exists(self, storage: Storage) -> None:
        await storage.put("obj", b"0123456789")
        await storage.read_scatter("obj", [])
        await storage.read_scatter("obj", [memoryview(bytearray(0))] * 2, 4)
        for views in ([], [memoryview(bytearray(0))]):
            with pytest.raises(CheckpointNotFoundError):
                await storage.read_scatter("missing", views)

    async def test_read_scatter_of_missing_key_raises_not_found(self, storage: Storage) -> None:
        buffers = [bytearray(10), bytearray(20)]
        with pytest.raises(CheckpointNotFoundError):
            await storage.read_scatter("missing", [memoryview(b) for b in buffers], 0)
        assert buffers == [bytearray(10), bytearray(20)]

    @pytest.mark.parametrize("start", [0, 4, 8, 10, 11])
    async def test_read_scatter_past_the_end_raises_object_too_short(self, storage: Storage, start: int) -> None:
        await storage.put("obj", b"0123456789")
        views = [memoryview(bytearray(4)), memoryview(bytearray(0)), memoryview(bytearray(3)), memoryview(bytearray(4))]
        with pytest.raises(ObjectTooShortError) as info:
            await storage.read_scatter("obj", views, start)
        assert info.value.key == "obj"

    # -- listing ---------------------------------------------------------------------------

    async def test_empty_root_lists_nothing(self, storage: Storage) -> None:
        assert await list_keys(storage) == []
        assert await storage.list_dirs() == []
        assert await storage.list_pending_uploads() == []

    async def test_list_returns_every_object_in_key_order(self, storage: Storage) -> None:
        keys = ["b", "a/c/d", "a0", "a-b", "a/b", "ab/x", "a/b.txt", "B", "a_z"]
        for i, key in enumerate(keys):
            await storage.put(key, b"x" * i)
        infos = await list_infos(storage)
        assert [info.key for info in infos] == sorted(keys)
        assert {info.key: info.size for info in infos} == {key: i for i, key in enumerate(keys)}
        now = time.time()
        for info in infos:
            assert info.last_modified is None or abs(now - info.last_modified) < 3600

    async def test_list_with_prefix_excludes_other_prefixes(self, storage: Storage) -> None:
        for key in ["a/b", "a/c/d", "a-b", "a0", "ab/x", "b/a/x"]:
            await storage.put(key, b"x")
        assert await list_keys(storage, "a/") == ["a/b", "a/c/d"]
        assert await list_keys(storage, "a/c/") == ["a/c/d"]
        assert await list_keys(storage, "a") == ["a-b", "a/b", "a/c/d", "a0", "ab/x"]
        assert await list_keys(storage, "ab") == ["ab/x"]
        assert await list_keys(storage, "a/c/d") == ["a/c/d"]
        assert await list_keys(storage, "nothing/") == []
        assert await list_keys(storage, "zzz") == []

    async def test_list_does_not_show_deleted_objects(self, storage: Storage) -> None:
        await storage.put("a/x", b"1")
        await storage.put("a/y", b"2")
        await storage.delete(["a/x"])
        assert await list_keys(storage) == ["a/y"]

    async def test_list_dirs_names_the_directories_below_a_prefix(self, storage: Storage) -> None:
        for key in ["d1/x", "d1/y/z", "d1/y/w", "d2/w", "f", "d10/q/r"]:
            await storage.put(key, b"x")
        assert await storage.list_dirs() == ["d1", "d10", "d2"]
        assert await storage.list_dirs("d1/") == ["y"]
        assert await storage.list_dirs("d10/") == ["q"]
        assert await storage.list_dirs("d1/y/") == []
        assert await storage.list_dirs("nothing/") == []

    async def test_list_dirs_forgets_a_directory_whose_objects_were_deleted(self, storage: Storage) -> None:
        await storage.put("gone/x", b"1")
        await storage.put("gone/sub/y", b"2")
        await storage.put("kept/z", b"3")
        await storage.delete(["gone/x", "gone/sub/y"])
        assert await storage.list_dirs() == ["kept"]
        assert await storage.list_dirs("gone/") == []

    # -- delete ----------------------------------------------------------------------------

    async def test_delete_removes_the_objects(self, storage: Storage) -> None:
        keys = [f"many/{i:03d}" for i in range(30)] + ["top"]
        for key in keys:
            await storage.put(key, b"x")
        await storage.delete(keys[::2])
        assert await list_keys(storage) == sorted(keys[1::2])
        await storage.delete(iter(keys[1::2]))  # any iterable
        assert await list_keys(storage) == []
        for key in keys[:3]:
            await self.assert_absent(storage, key)

    async def test_delete_ignores_missing_keys(self, storage: Storage) -> None:
        await storage.put("kept", b"1")
        await storage.put("dropped", b"2")
        await storage.delete(["missing", "dropped", "no/such/dir/key"])
        await storage.delete(["dropped"])
        await storage.delete([])
        assert await list_keys(storage) == ["kept"]
        await self.assert_absent(storage, "dropped")

    # -- key validation --------------------------------------------------------------------

    @pytest.mark.parametrize("key", INVALID_KEYS)
    async def test_invalid_key_raises_value_error(self, storage: Storage, key: str) -> None:
        operations: list[Callable[[], Awaitable[object]]] = [
            lambda: storage.get(key),
            lambda: storage.get_range(key, 0, 1),
            lambda: storage.read_into(key, memoryview(bytearray(1))),
            lambda: storage.read_scatter(key, [memoryview(bytearray(1))]),
            lambda: storage.head(key),
            lambda: storage.exists(key),
            lambda: storage.put(key, b"x"),
            lambda: storage.put(key, b"x", create_only=True),
            lambda: storage.delete(["fine", key]),
        ]
        for operation in operations:
            with pytest.raises(ValueError):
                await operation()
        with pytest.raises(ValueError):
            storage.writer(key)
        assert await list_keys(storage) == []

    # -- probes and accounting -------------------------------------------------------------

    async def test_check_root_passes(self, storage: Storage) -> None:
        await storage.check_root()
        await storage.put("a/b", b"x")
        await storage.check_root()

    async def test_url_of_names_the_key_below_the_root(self, storage: Storage) -> None:
        url = storage.url_of("a/b")
        assert url.startswith(f"{storage.kind}://")
        assert url == f"{storage.url.rstrip('/')}/a/b"

    async def test_collect_request_stats_counts_requests(self, storage: Storage) -> None:
        data = payload(1234, seed=10)
        with collect_request_stats() as stats:
            await storage.put("obj", data)
            assert await storage.get("obj") == data
            await storage.head("obj")
        assert stats.requests >= 3
        assert stats.bytes_sent == len(data)
        assert stats.bytes_received == len(data)
        assert stats.objects_written == 1
        before = (stats.requests, stats.bytes_sent, stats.bytes_received)
        await storage.get("obj")
        assert (stats.requests, stats.bytes_sent, stats.bytes_received) == before

    async def test_collect_request_stats_counts_spawned_tasks_and_writers(self, storage: Storage) -> None:
        with collect_request_stats() as stats:
            async with asyncio.TaskGroup() as tg:  # tasks copy the context, so they are counted
                for i in range(3):
                    tg.create_task(storage.put(f"t/{i}", b"x" * 10))
            async with storage.writer("w") as writer:
                await writer.write(b"y" * 100)
                await writer.commit()
            with pytest.raises(CheckpointNotFoundError):
                await storage.get("missing")
        assert stats.objects_written == 4
        assert stats.bytes_sent == 130
        assert stats.requests >= 5
