"""Every storage backend passes the same conformance suite (asyncckpt.storage.testing)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from asyncckpt.config import MiB, TransferConfig
from asyncckpt.errors import StorageError
from asyncckpt.storage import LocalStorage, MemoryStorage, S3Storage, drop_memory_store
from asyncckpt.storage.testing import StorageConformance, payload

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

    async def test_check_root_fails_when_the_root_is_a_file(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_bytes(b"")
        async with LocalStorage(tmp_path / "file" / "ckpt") as storage:
            with pytest.raises(StorageError):
                await storage.check_root()


class TestS3Storage(StorageConformance):
    @pytest.fixture
    async def storage(self, s3_client: Any, s3_bucket: str, s3_options: dict[str, Any]) -> AsyncIterator[S3Storage]:
        for key in NEIGHBOURS:
            await s3_client.put_object(Bucket=s3_bucket, Key=key, Body=b"must never be listed")
        async with S3Storage(s3_bucket, "some/prefix", options=s3_options, config=SMALL_PARTS) as storage:
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
        writer = storage.writer("abandoned")
        await writer.write(payload(6 * MiB, seed=12))  # one part sent, the writer is never closed
        (pending,) = await storage.list_pending_uploads()
        await storage.abort_pending_upload(pending)
        await storage.abort_pending_upload(pending)  # already gone: a no-op
        assert await storage.list_pending_uploads() == []
        await writer.abort()
        assert await storage.head("abandoned") is None

    async def test_missing_bucket_is_a_storage_error(self, s3_options: dict[str, Any]) -> None:
        async with S3Storage(f"missing-{uuid.uuid4().hex[:12]}", "p", options=s3_options) as storage:
            with pytest.raises(StorageError) as info:
                await storage.check_root()
            assert info.value.code == "NoSuchBucket"
            with pytest.raises(StorageError) as info:
                await storage.get("key")
            assert info.value.code == "NoSuchBucket"

    async def test_closed_storage_raises_storage_error(self, s3_bucket: str, s3_options: dict[str, Any]) -> None:
        storage = S3Storage(s3_bucket, options=s3_options)
        with pytest.raises(StorageError):
            await storage.get("key")
        await storage.open()
        await storage.close()
        await storage.close()  # twice is fine
        with pytest.raises(StorageError):
            await storage.put("key", b"x")
