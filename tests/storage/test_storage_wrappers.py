"""FaultyStorage and LatencyStorage: injected faults are counted, deterministic, and reach
the layers above storage as the errors those layers promise (tested through one node's
ShardWriter/ShardReader, the code a manager's save and load run per node).

The conformance suite runs against both wrappers in ``test_storage_conformance.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from asyncckpt import codec
from asyncckpt.config import MiB, TransferConfig
from asyncckpt.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    ObjectTooShortError,
    StorageError,
)
from asyncckpt.manifest import NodeRecord
from asyncckpt.node import ShardReader, ShardWriter
from asyncckpt.storage import ByteBudget, MemoryStorage, Storage, drop_memory_store, storage_for
from asyncckpt.testing.wrappers import Fault, FaultyStorage, LatencyStorage
from tests.support.asserts import assert_same

NODE = "trainer_0"
SHARD = "epoch_1/trainer_0.shard"
RECEIPT = "epoch_1/trainer_0.receipt"
#: Several ranges per shard read, so a fault can hit one range among others.
SMALL_RANGES = TransferConfig(range_size=64 * 1024)


def _blobs(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "weights": rng.standard_normal((256, 256)).astype(np.float32),  # 256 KiB
        "step": seed,
        "name": f"run-{seed}",
    }


async def _write_shard(storage: Storage, blobs: dict[str, Any], budget: ByteBudget | None = None) -> NodeRecord:
    encoded = await asyncio.to_thread(codec.encode_blobs, NODE, blobs)
    writer = ShardWriter(storage, NODE, budget or ByteBudget(64 * MiB))
    return await writer.write(SHARD, encoded, receipt=(RECEIPT, 1, "w-test"))


async def _read_some(reader: ShardReader, names: list[str]) -> dict[str, Any]:
    """Some blobs, as a partial load reads them: the shard's blob index, then their bytes."""
    index = await reader.read_index()
    return await reader.read_some({name: index[name] for name in names})


def _reader(storage: Storage, record: NodeRecord) -> ShardReader:
    return ShardReader(storage, NODE, record, SMALL_RANGES)


@pytest.fixture
async def memory() -> AsyncIterator[MemoryStorage]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    try:
        async with MemoryStorage(name, "ckpt") as storage:
            yield storage
    finally:
        drop_memory_store(name)


# -- the wrappers themselves ------------------------------------------------------------


async def test_fault_fires_on_matching_calls_only_and_is_counted(memory: MemoryStorage) -> None:
    storage = FaultyStorage(memory)
    rule = storage.fail_on(lambda op, key: op == "get" and key == "b", times=2)
    await storage.put("a", b"1")
    await storage.put("b", b"2")
    assert await storage.get("a") == b"1"
    for _ in range(2):
        with pytest.raises(StorageError) as info:
            await storage.get("b")
        assert info.value.key == "b"
        assert info.value.code == "InjectedFault"
    assert await storage.get("b") == b"2"  # only twice
    assert (rule.seen, rule.hits) == (2, 2)
    assert storage.faults == {"get": 2}
    assert storage.calls["get"] == 4


async def test_fault_skips_the_first_matches(memory: MemoryStorage) -> None:
    storage = FaultyStorage(memory, Fault(lambda op, key: op == "put", skip=2, times=1))
    await storage.put("first", b"1")
    await storage.put("second", b"2")
    with pytest.raises(StorageError):
        await storage.put("third", b"3")
    await storage.put("fourth", b"4")
    assert [info.key async for info in storage.list()] == ["first", "fourth", "second"]
    assert (storage.rules[0].seen, storage.rules[0].hits) == (3, 1)


async def test_fault_after_the_effect_stores_the_object_yet_fails_the_call(memory: MemoryStorage) -> None:
    storage = FaultyStorage(memory)
    storage.fail_on(lambda op, key: op == "put", StorageError, times=1, after=True)
    with pytest.raises(StorageError):
        await storage.put("lost-answer", b"stored")
    assert await memory.get("lost-answer") == b"stored"


async def test_fault_raises_an_instance_or_a_factory_result(memory: MemoryStorage) -> None:
    given = CheckpointNotFoundError("gone, as arranged")
    storage = FaultyStorage(memory)
    storage.fail_on(lambda op, key: key == "x", given, times=1)
    storage.fail_on(lambda op, key: key == "y", lambda op, key: ObjectTooShortError(f"{op} {key}", key=key))
    with pytest.raises(CheckpointNotFoundError) as info:
        await storage.head("x")
    assert info.value is given
    with pytest.raises(ObjectTooShortError, match="get_range y"):
        await storage.get_range("y", 0, 1)


async def test_fault_on_delete_is_asked_about_each_key(memory: MemoryStorage) -> None:
    storage = FaultyStorage(memory)
    await storage.put("keep", b"1")
    await storage.put("drop", b"2")
    storage.fail_on(lambda op, key: op == "delete" and key == "keep", times=1)
    with pytest.raises(StorageError) as info:
        await storage.delete(["drop", "keep"])
    assert info.value.key == "keep"
    assert await memory.exists("drop")  # a fault before the call: nothing was deleted
    storage.clear_faults()
    await storage.delete(["drop", "keep"])
    assert [info.key async for info in storage.list()] == []


async def test_injected_cancellation_propagates_and_the_writer_leaves_nothing(memory: MemoryStorage) -> None:
    storage = FaultyStorage(memory)
    storage.fail_on(lambda op, key: op == "write", asyncio.CancelledError, skip=1, times=1)
    with pytest.raises(asyncio.CancelledError):
        async with storage.writer("obj") as writer:
            await writer.write(b"first")
            await writer.write(b"second")  # cancelled here
            await writer.commit()
    assert await memory.head("obj") is None
    assert storage.calls["abort"] == 1  # the block's exit aborted the writer


async def test_latency_delays_each_operation(memory: MemoryStorage) -> None:
    storage = LatencyStorage(memory, delay=0.0, delays={"get": 0.05})
    await storage.put("obj", b"x")  # no delay
    started = time.perf_counter()
    assert await storage.get("obj") == b"x"
    assert time.perf_counter() - started >= 0.05
    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:  # concurrent calls wait concurrently
        for _ in range(4):
            tg.create_task(storage.get("obj"))
    assert time.perf_counter() - started < 4 * 0.05
    assert storage.calls["get"] == 5


def test_latency_rejects_unknown_operations_and_negative_delays(memory: MemoryStorage) -> None:
    with pytest.raises(ValueError, match="unknown storage operation"):
        LatencyStorage(memory, delays={"gte": 1.0})
    with pytest.raises(ValueError, match="negative"):
        LatencyStorage(memory, delay=-1.0)


# -- faults seen through one node's save and load ---------------------------------------


async def test_shard_round_trips_through_both_wrappers(memory: MemoryStorage) -> None:
    storage = LatencyStorage(FaultyStorage(memory), delay=0.001)
    blobs = _blobs(1)
    record = await _write_shard(storage, blobs)
    assert_same(await _reader(storage, record).read_all(), blobs)
    assert_same(await _read_some(_reader(storage, record), ["step"]), {"step": 1})


@pytest.mark.parametrize("location_kind", ["memory", "file", "s3"])
async def test_truncated_shard_reads_as_corrupted_on_every_backend(location: Any) -> None:
    """A real short object (no injection): each backend's ObjectTooShortError becomes the
    node's CheckpointCorruptedError naming the truncation."""
    async with storage_for(location.url, options=location.options) as storage:
        record = await _write_shard(storage, _blobs(2))
        index = await _reader(storage, record).read_index()
        whole = await storage.get(SHARD)
        await storage.put(SHARD, whole[: record.size // 2])
        with pytest.raises(CheckpointCorruptedError, match="truncated") as info:
            await _reader(storage, record).read_all()  # the HEAD finds it short before any buffer is made
        assert not isinstance(info.value, StorageError)
        last = max(index, key=lambda name: index[name].offset)  # past the cut
        with pytest.raises(CheckpointCorruptedError, match="shorter than the manifest"):
            await _reader(storage, record).read_some({last: index[last]})


async def test_injected_short_read_reads_as_corrupted(memory: MemoryStorage) -> None:
    record = await _write_shard(memory, _blobs(3))
    storage = FaultyStorage(memory)
    rule = storage.fail_on(lambda op, key: op == "read_into" and key == SHARD, ObjectTooShortError, skip=1, times=1)
    with pytest.raises(CheckpointCorruptedError, match=r"shard is shorter than the manifest's \d+ bytes \(truncated\)"):
        await _reader(storage, record).read_all()
    assert rule.hits == 1


async def test_injected_storage_error_on_read_passes_through_unchanged(memory: MemoryStorage) -> None:
    record = await _write_shard(memory, _blobs(4))
    storage = FaultyStorage(memory)
    storage.fail_on(lambda op, key: op == "read_into", times=1)
    with pytest.raises(StorageError) as info:
        await _reader(storage, record).read_all()
    assert info.value.code == "InjectedFault"
    assert not isinstance(info.value, (ObjectTooShortError, CheckpointCorruptedError))


async def test_missing_shard_reads_as_not_found(memory: MemoryStorage) -> None:
    record = await _write_shard(memory, _blobs(5))
    storage = FaultyStorage(memory)
    storage.fail_on(lambda op, key: op == "read_into", CheckpointNotFoundError, times=1)
    with pytest.raises(CheckpointNotFoundError, match="shard object is missing"):
        await _reader(storage, record).read_all()


@pytest.mark.parametrize("op", ["write", "commit"])
async def test_failed_shard_upload_leaves_no_shard_and_no_receipt(memory: MemoryStorage, op: str) -> None:
    budget = ByteBudget(64 * MiB)
    storage = FaultyStorage(memory)
    rule = storage.fail_on(lambda o, key: o == op and key == SHARD, times=1, skip=1 if op == "write" else 0)
    with pytest.raises(StorageError) as info:
        await _write_shard(storage, _blobs(6), budget)
    assert info.value.code == "InjectedFault" and rule.hits == 1
    assert [info.key async for info in memory.list()] == []
    assert budget.in_use == 0


async def test_failed_receipt_leaves_the_shard_but_no_receipt(memory: MemoryStorage) -> None:
    storage = FaultyStorage(memory)
    storage.fail_on(lambda op, key: op == "put" and key == RECEIPT)
    with pytest.raises(StorageError):
        await _write_shard(storage, _blobs(7))
    assert [info.key async for info in memory.list()] == [SHARD]


async def test_cancelled_shard_upload_propagates_and_leaves_nothing(memory: MemoryStorage) -> None:
    storage = FaultyStorage(memory)
    storage.fail_on(lambda op, key: op == "write" and key == SHARD, asyncio.CancelledError, skip=1, times=1)
    with pytest.raises(asyncio.CancelledError):
        await _write_shard(storage, _blobs(8))
    assert [info.key async for info in memory.list()] == []


async def test_cancelled_shard_read_propagates(memory: MemoryStorage) -> None:
    record = await _write_shard(memory, _blobs(9))
    storage = FaultyStorage(memory)
    storage.fail_on(lambda op, key: op == "read_into", asyncio.CancelledError, skip=1, times=1)
    with pytest.raises(asyncio.CancelledError):
        await _reader(storage, record).read_all()
