"""node: one node's shard written by ShardWriter and read back by ShardReader, on a
MemoryStorage, through their public methods only.

Damage is :class:`CheckpointCorruptedError` naming the node, the object and (where one
blob is at fault) the blob; a missing shard is :class:`CheckpointNotFoundError`.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from asyncckpt import CheckpointCorruptedError, CheckpointNotFoundError, MiB, NodeRecord, TransferConfig, codec
from asyncckpt.layout import receipt_key, shard_key
from asyncckpt.node import ShardReader, ShardWriter
from asyncckpt.storage import ByteBudget, MemoryStorage, drop_memory_store
from tests.support.asserts import assert_same

NODE = "trainer_0"
EPOCH = 3
WRITER = "run0.0a1b2c"
SHARD = shard_key(EPOCH, WRITER, NODE)
RECEIPT = receipt_key(EPOCH, WRITER, "tok", NODE)
#: Small ranges: a shard is fetched in several ranged reads.
SMALL_RANGES = TransferConfig(range_size=4096)


def sample_blobs() -> dict[str, Any]:
    return {
        "weights": np.arange(3000, dtype=np.float32).reshape(30, 100),  # the last and largest blob
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "empty": np.zeros((0, 3)),
        "raw": b"\x00\x01raw bytes",
        "step": 12,
        "name": "run",
        "config": {"lr": 0.1, "layers": [64, 32]},
    }


@pytest.fixture
async def storage() -> AsyncIterator[MemoryStorage]:
    name = f"unit-node-{uuid.uuid4().hex[:12]}"
    try:
        async with MemoryStorage(name, "ckpt") as opened:
            yield opened
    finally:
        drop_memory_store(name)


async def write_shard(storage: MemoryStorage, blobs: dict[str, Any]) -> NodeRecord:
    writer = ShardWriter(storage, NODE, ByteBudget(64 * MiB))
    return await writer.write(SHARD, codec.encode_blobs(NODE, blobs), receipt=(RECEIPT, EPOCH, WRITER))


async def read_some(reader: ShardReader, names: list[str]) -> dict[str, Any]:
    """As a partial load reads: the shard's size, its blob index from its tail, the blobs."""
    await reader.check_size()
    index = await reader.read_index()
    return await reader.read_some({name: index[name] for name in names})


def reader(storage: MemoryStorage, record: NodeRecord, node: str = NODE) -> ShardReader:
    return ShardReader(storage, node, record, SMALL_RANGES)


async def replace_shard(storage: MemoryStorage, change: Any) -> bytes:
    """Overwrite the stored shard with ``change(its bytes)``; returns the new bytes."""
    data = change(bytearray(await storage.get(SHARD)))
    await storage.put(SHARD, bytes(data))
    return bytes(data)


# --------------------------------------------------------------------------- round trips


async def test_a_written_shard_reads_back_whole_with_a_record_that_describes_it(storage: MemoryStorage) -> None:
    blobs = sample_blobs()
    record = await write_shard(storage, blobs)
    stored = await storage.get(SHARD)
    assert (record.node, record.shard, record.receipt) == (NODE, SHARD, RECEIPT)
    assert record.size == len(stored)
    assert record.crc32c == codec.checksum(stored)
    assert sorted(await reader(storage, record).read_index()) == sorted(blobs)
    epoch, writer, receipt = NodeRecord.from_receipt(await storage.get(RECEIPT), "receipt")
    assert (epoch, writer, dataclasses.replace(receipt, stats=record.stats)) == (EPOCH, WRITER, record)
    await reader(storage, record).check_size()
    assert_same(await reader(storage, record).read_all(), blobs)


async def test_some_blobs_read_back_alone(storage: MemoryStorage) -> None:
    blobs = sample_blobs()
    record = await write_shard(storage, blobs)
    some = await read_some(reader(storage, record), ["weights", "step", "fortran"])
    assert_same(some, {name: blobs[name] for name in ("weights", "step", "fortran")})
    assert await reader(storage, record).read_some({}) == {}


async def test_decode_of_the_stored_bytes_equals_read_all(storage: MemoryStorage) -> None:
    blobs = sample_blobs()
    record = await write_shard(storage, blobs)
    stored = await storage.get(SHARD)
    assert_same(reader(storage, record).decode(memoryview(bytearray(stored))), blobs)


# --------------------------------------------------------------------------- damage


async def test_a_flipped_byte_is_corrupted_error_naming_node_blob_and_object(storage: MemoryStorage) -> None:
    blobs = sample_blobs()
    record = await write_shard(storage, blobs)
    entry = (await reader(storage, record).read_index())["weights"]

    def flip(data: bytearray) -> bytearray:
        data[entry.offset + entry.length // 2] ^= 0x01
        return data

    damaged = await replace_shard(storage, flip)
    url = storage.url_of(SHARD)
    with pytest.raises(CheckpointCorruptedError) as whole:
        await reader(storage, record).read_all()
    with pytest.raises(CheckpointCorruptedError) as decoded:
        reader(storage, record).decode(memoryview(bytearray(damaged)))
    with pytest.raises(CheckpointCorruptedError) as one:
        await read_some(reader(storage, record), ["weights"])
    for info in (whole, decoded, one):
        message = str(info.value)
        assert repr(NODE) in message and repr("weights") in message and url in message, message
        assert isinstance(info.value, ValueError)
    assert_same(await read_some(reader(storage, record), ["step"]), {"step": 12})  # its neighbours are intact


async def test_a_truncated_shard_is_corrupted_error(storage: MemoryStorage) -> None:
    record = await write_shard(storage, sample_blobs())
    truncated = await replace_shard(storage, lambda data: data[: record.size // 2])
    with pytest.raises(CheckpointCorruptedError, match="truncated"):
        await reader(storage, record).read_all()
    with pytest.raises(CheckpointCorruptedError, match="truncated"):
        await read_some(reader(storage, record), ["weights"])
    with pytest.raises(CheckpointCorruptedError, match="truncated"):
        await reader(storage, record).read_index()  # without the size check first: the tail is short
    with pytest.raises(CheckpointCorruptedError):
        reader(storage, record).decode(memoryview(bytearray(truncated)))


async def test_a_shard_that_lost_its_tail_is_corrupted_error(storage: MemoryStorage) -> None:
    record = await write_shard(storage, sample_blobs())
    await replace_shard(storage, lambda data: data[:-1])
    with pytest.raises(CheckpointCorruptedError, match=repr(NODE)):
        await reader(storage, record).read_all()


async def test_another_nodes_shard_is_corrupted_error(storage: MemoryStorage) -> None:
    record = await write_shard(storage, sample_blobs())
    with pytest.raises(CheckpointCorruptedError, match=f"belongs to node {NODE!r}"):
        await reader(storage, record, node="trainer_1").read_all()
    other = await write_shard(storage, {**sample_blobs(), "step": 13})  # same key and size, another index
    with pytest.raises(CheckpointCorruptedError, match="blob index differs"):
        await reader(storage, record).read_index()
    assert other.index_crc32c != record.index_crc32c


async def test_a_record_claiming_a_huge_shard_fails_before_any_allocation(storage: MemoryStorage) -> None:
    """The size a record claims is checked against the object (a HEAD) before a buffer
    of that size is made: a hostile record claiming 1 TiB is corruption, not MemoryError."""
    record = await write_shard(storage, sample_blobs())
    huge = dataclasses.replace(record, size=1 << 40)
    with pytest.raises(CheckpointCorruptedError, match=f"{record.size} bytes, the manifest says {1 << 40}"):
        await reader(storage, huge).read_all()


async def test_a_missing_shard_is_not_found_naming_the_node(storage: MemoryStorage) -> None:
    record = await write_shard(storage, sample_blobs())
    await storage.delete([SHARD])
    with pytest.raises(CheckpointNotFoundError, match=repr(NODE)):
        await reader(storage, record).read_all()
    with pytest.raises(CheckpointNotFoundError, match=repr(NODE)):
        await read_some(reader(storage, record), ["step"])


async def test_tiny_blobs_cost_little_memory_beyond_the_shard_they_make(storage: MemoryStorage) -> None:
    # Python allocations (tracemalloc: deterministic, unlike RSS) of encoding and writing
    # 20k tiny arrays, the stored shard included: about 0.4 KB per blob, where one
    # memoryview, entry and index dict per blob used to cost 1.6 KB
    count = 20_000
    blobs = {f"blob_{i:06d}": np.full(10, i % 251, dtype=np.uint8) for i in range(count)}
    tracemalloc.start()
    try:
        encoded = codec.encode_blobs(NODE, blobs)
        record = await ShardWriter(storage, NODE, ByteBudget(64 * MiB)).write(SHARD, encoded)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 * count, f"{peak / count:.0f} bytes per blob"
    del encoded
    restored = await reader(storage, record).read_all()
    assert_same(restored, blobs)
