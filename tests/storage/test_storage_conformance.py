"""Every storage backend passes the same conformance suite (asyncckpt.testing.storage_suite)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from asyncckpt.config import MiB, TransferConfig
from asyncckpt.errors import CheckpointNotFoundError, StorageError
from asyncckpt.storage import (
    ByteBudget,
    LocalStorage,
    MemoryStorage,
    PendingUpload,
    S3Storage,
    Storage,
    drop_memory_store,
)
from asyncckpt.storage._s3 import _aiohttp_stream
from asyncckpt.testing.s3_server import REGION, admin_client, delete_bucket, empty_bucket, new_bucket_name
from asyncckpt.testing.storage_suite import StorageConformance, payload
from asyncckpt.testing.wrappers import OPERATIONS, FaultyStorage, LatencyStorage

#: Smallest legal parts, so that StorageConformance.large_size spans three of them.
#: Two attempts: the loopback server needs no retries, and a failing test fails fast.
SMALL_PARTS = TransferConfig(part_size=5 * MiB, max_bytes_in_flight=10 * MiB, max_attempts=2)

#: Objects placed next to every root; nothing may ever list them.
NEIGHBOURS = ("some/prefix-other/outside", "some/prefixed", "outside")


class TestMemoryStorage(StorageConformance):
    @pytest.fixture
    async def storage(self) -> AsyncIterator[MemoryStorage]:
        name = f"test-{uuid.uuid4().hex[:12]}"
        try:
            async with MemoryStorage(name) as whole_store:
                for key in NEIGHBOURS:
                    await whole_store.put(key, b"must never be listed")
            async with MemoryStorage(name, "some/prefix") as storage:
                yield storage
        finally:
            drop_memory_store(name)


class _OnlyGetRange(MemoryStorage):
    """A backend that reads only through ``get_range``: ``read_into`` and
    ``read_scatter`` are the protocol's defaults."""

    read_into = Storage.read_into
    read_scatter = Storage.read_scatter


class TestDefaultReads(StorageConformance):
    """The protocol's default ``read_into``/``read_scatter`` keep a custom backend conforming."""

    @pytest.fixture
    async def storage(self) -> AsyncIterator[MemoryStorage]:
        name = f"test-{uuid.uuid4().hex[:12]}"
        try:
            async with _OnlyGetRange(name, "some/prefix") as storage:
                yield storage
        finally:
            drop_memory_store(name)


class TestLocalStorage(StorageConformance):
    @pytest.fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[LocalStorage]:
        for key in NEIGHBOURS:
            (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / key).write_bytes(b"must never be listed")
        async with LocalStorage(tmp_path / "some" / "prefix", fsync=False) as storage:
            yield storage

    async def test_fsync_writes_round_trip(self, tmp_path: Path) -> None:
        async with LocalStorage(tmp_path / "synced") as storage:
            assert storage.fsync
            await storage.put("a/b", b"durable", create_only=True)
            async with storage.writer("c") as writer:
                await writer.write(b"also durable")
                await writer.commit()
            assert await storage.get("a/b") == b"durable"
            assert await storage.get("c") == b"also durable"

    async def test_writer_block_left_without_commit_removes_its_temp_file(self, storage: LocalStorage) -> None:
        async with storage.writer("dir/obj") as writer:
            await writer.write(b"forgotten")
        assert [p.name for p in storage.root.rglob("*") if p.is_file()] == []

    async def test_list_skips_a_file_gone_between_the_walk_and_its_stat(self, storage: LocalStorage) -> None:
        # a dangling link is what a file deleted by a concurrent gc looks like to the
        # walk: named in its directory, gone when stat'ed; a listing must not fail on it
        await storage.put("epochs/1/kept", b"kept")
        (storage.root / "epochs" / "1" / "gone").symlink_to(storage.root / "nowhere")
        assert [info.key for info in [i async for i in storage.list("epochs/")]] == ["epochs/1/kept"]

    async def test_check_root_fails_when_the_root_is_a_file(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_bytes(b"")
        async with LocalStorage(tmp_path / "file" / "ckpt") as storage:
            with pytest.raises(StorageError):
                await storage.check_root()


class TestLatencyStorage(StorageConformance):
    """A wrapper that only yields to the event loop before every operation changes nothing."""

    @pytest.fixture
    async def storage(self) -> AsyncIterator[LatencyStorage]:
        name = f"test-{uuid.uuid4().hex[:12]}"
        try:
            async with MemoryStorage(name) as whole_store:
                for key in NEIGHBOURS:
                    await whole_store.put(key, b"must never be listed")
            async with LatencyStorage(MemoryStorage(name, "some/prefix"), delay=0) as storage:
                yield storage
        finally:
            drop_memory_store(name)


class TestFaultyStorage(StorageConformance):
    """A fault injector without rules is a transparent wrapper (here around a directory)."""

    @pytest.fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[FaultyStorage]:
        for key in NEIGHBOURS:
            (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / key).write_bytes(b"must never be listed")
        async with FaultyStorage(LocalStorage(tmp_path / "some" / "prefix", fsync=False)) as storage:
            yield storage

    async def test_every_forwarded_operation_is_counted(self, storage: FaultyStorage) -> None:
        await storage.put("a/b", b"x")
        async with storage.writer("c") as writer:
            await writer.write(b"y")
            await writer.commit()
        assert await storage.get("a/b") == b"x"
        assert [info.key async for info in storage.list()] == ["a/b", "c"]
        await storage.delete(["a/b", "c"])
        assert storage.calls["open"] == 1
        assert (storage.calls["put"], storage.calls["write"], storage.calls["commit"]) == (1, 1, 1)
        assert (storage.calls["get"], storage.calls["list"], storage.calls["delete"]) == (1, 1, 1)
        assert storage.faults == {}
        assert set(storage.calls) <= OPERATIONS


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def shared_s3_root(s3_endpoint: str, s3_admin_session: Any) -> AsyncIterator[tuple[Any, S3Storage]]:
    """One bucket (with neighbours outside the root) and one opened S3Storage per class."""
    options = {"endpoint_url": s3_endpoint, "region_name": REGION, "addressing_style": "path"}
    async with admin_client(s3_admin_session, s3_endpoint) as client:
        bucket = new_bucket_name()
        await client.create_bucket(Bucket=bucket)
        try:
            for key in NEIGHBOURS:
                await client.put_object(Bucket=bucket, Key=key, Body=b"must never be listed")
            async with S3Storage(bucket, "some/prefix", options=options, config=SMALL_PARTS) as storage:
                yield client, storage
        finally:
            await delete_bucket(client, bucket)


@pytest.mark.asyncio(loop_scope="class")
class TestS3Storage(StorageConformance):
    """One bucket and one opened S3Storage for the whole class, its root emptied before
    each test: opening an S3Storage builds a botocore session (about 0.2 s of model
    loading), which would dominate a suite of ~80 small tests."""

    @pytest_asyncio.fixture(loop_scope="class")
    async def storage(self, shared_s3_root: tuple[Any, S3Storage]) -> AsyncIterator[S3Storage]:
        client, storage = shared_s3_root
        await empty_bucket(client, storage.bucket, "some/prefix/")
        yield storage

    async def test_large_writer_is_a_pending_multipart_upload_until_commit(self, storage: S3Storage) -> None:
        data = payload(11 * MiB, seed=11)
        async with storage.writer("big") as writer:
            await writer.write(data)
            pending = await storage.list_pending_uploads()
            assert [upload.key for upload in pending] == ["big"]
            await writer.commit()
        assert await storage.list_pending_uploads() == []
        info = await storage.head("big")
        assert info is not None and info.size == len(data)
        assert info.etag is not None and info.etag.strip('"').endswith("-3")  # three parts

    async def test_abort_pending_upload_drops_an_abandoned_upload(self, storage: S3Storage) -> None:
        async with storage.writer("abandoned") as writer:
            await writer.write(payload(6 * MiB, seed=12))  # one part sent, then the writer is abandoned
            (pending,) = await storage.list_pending_uploads()
            assert pending.key == "abandoned"
            await storage.abort_pending_upload(pending)
            await storage.abort_pending_upload(pending)  # already gone: a no-op
            assert await storage.list_pending_uploads() == []
        assert await storage.head("abandoned") is None

    async def test_writer_whose_upload_vanished_fails_with_storage_error(
        self, storage: S3Storage, shared_s3_root: tuple[Any, S3Storage]
    ) -> None:
        # moto answers the orphaned CompleteMultipartUpload with a 500 (a KeyError inside
        # moto); real S3 and MinIO answer 404 NoSuchUpload, which must not read as
        # "the object does not exist" either
        client, _ = shared_s3_root
        budget = ByteBudget(10 * MiB)
        with pytest.raises(StorageError) as raised:
            async with storage.writer("vanished", budget=budget) as writer:
                await writer.write(payload(5 * MiB, seed=15))  # exactly one part, sent in the background
                (pending,) = await storage.list_pending_uploads()
                await _wait_for_parts(client, storage, pending, 1)
                await storage.abort_pending_upload(pending)  # e.g. a lifecycle rule or an operator
                await writer.commit()
        assert not isinstance(raised.value, CheckpointNotFoundError), repr(raised.value)
        assert budget.in_use == 0
        assert await storage.head("vanished") is None
        assert await storage.list_pending_uploads() == []

    async def test_s3_body_exposes_the_aiohttp_stream(self, storage: S3Storage) -> None:
        # reads take aiobotocore's body apart for speed (_aiohttp_stream); an upgrade that
        # moves its insides must fail here, not quietly fall back to the slower path
        data = payload(300_000, seed=17)
        await storage.put("obj", data)
        response = await storage._call("get_object", "obj", Key=storage._key("obj"))
        try:
            stream = _aiohttp_stream(response["Body"])
            assert stream is not None
            assert await stream.read() == data
        finally:
            response["Body"].close()

    async def test_missing_bucket_is_a_storage_error(self, s3_options: dict[str, Any]) -> None:
        async with S3Storage(f"missing-{uuid.uuid4().hex[:12]}", "p", options=s3_options) as storage:
            with pytest.raises(StorageError) as info:
                await storage.check_root()
            assert info.value.code == "NoSuchBucket"
            with pytest.raises(StorageError) as info:
                await storage.get("key")
            assert info.value.code == "NoSuchBucket"

    async def test_closed_storage_raises_storage_error(self, storage: S3Storage, s3_options: dict[str, Any]) -> None:
        other = S3Storage(storage.bucket, "some/prefix", options=s3_options)
        with pytest.raises(StorageError):
            await other.get("key")  # never opened
        await other.open()
        await other.close()
        await other.close()  # twice is fine
        with pytest.raises(StorageError):
            await other.put("key", b"x")


async def _wait_for_parts(client: Any, storage: S3Storage, upload: PendingUpload, count: int) -> None:
    """Wait until ``count`` parts of ``upload`` have landed on the server."""
    for _ in range(500):
        response = await client.list_parts(
            Bucket=storage.bucket, Key=f"{storage.prefix}/{upload.key}", UploadId=upload.upload_id
        )
        if len(response.get("Parts", [])) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} part(s) of {upload.key} never landed")
