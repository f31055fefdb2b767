"""One node's shard: write it (``ShardWriter``) and read it back (``ShardReader``).

Only this module turns blobs into a stream of shard bytes and back; it knows one node
and one storage, nothing about other nodes or commits. CPU-heavy work (msgpack encoding,
CRC32C of large arrays, decoding) runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import codec
from ._tasks import run_all
from .codec import BlobEntry, EncodedBlob
from .config import TransferConfig
from .errors import CheckpointCorruptedError, CheckpointNotFoundError, StorageError
from .manifest import NodeRecord, NodeStats
from .storage.base import ByteBudget, Storage, collect_request_stats

__all__ = ["ShardReader", "ShardWriter", "coalesce_ranges"]

_THREAD_MIN = 1 << 20  # buffers at least this big are checksummed off the event loop
_SHORT_READ_CODES = frozenset({"ShortRead", "InvalidRange"})  # the object is shorter than asked


def _checksum_both(view: memoryview, shard_crc: int) -> tuple[int, int]:
    return codec.checksum(view), codec.checksum(view, shard_crc)


@dataclass
class ShardWriter:
    """Writes one node's blobs as one shard object, then its receipt.

    ``encode`` (in a worker thread) validates and encodes every blob first, so an
    unsupported value raises :class:`TypeError` before a byte is written.
    """

    storage: Storage
    node: str
    budget: ByteBudget

    @staticmethod
    async def encode(node: str, blobs: Mapping[str, Any]) -> list[EncodedBlob]:
        return await asyncio.to_thread(codec.encode_blobs, node, blobs)

    async def write(
        self, shard_key: str, receipt_key: str, encoded: list[EncodedBlob], *, epoch: int, writer_id: str
    ) -> NodeRecord:
        """Upload the shard and its receipt; returns the node's record for the manifest."""
        started = time.perf_counter()
        with collect_request_stats() as stats:
            index: dict[str, BlobEntry] = {}
            header = codec.shard_header(self.node)
            size_hint = codec.shard_size_bound(header, encoded)
            async with self.storage.writer(shard_key, budget=self.budget, size_hint=size_hint) as out:
                await out.write(header)
                shard_crc = codec.checksum(header)
                offset = len(header)
                for blob in encoded:
                    blob_crc = 0
                    for view in blob.buffers:
                        if view.nbytes >= _THREAD_MIN:
                            part_crc, shard_crc = await asyncio.to_thread(_checksum_both, view, shard_crc)
                            blob_crc = _combine_sequential(blob_crc, view, part_crc)
                        else:
                            blob_crc = codec.checksum(view, blob_crc)
                            shard_crc = codec.checksum(view, shard_crc)
                        await out.write(view)
                    index[blob.name] = blob.entry(offset, blob_crc)
                    offset += blob.length
                trailer = codec.shard_trailer(index, offset)
                await out.write(trailer)
                shard_crc = codec.checksum(trailer, shard_crc)
                info = await out.commit()
            size = offset + len(trailer)
            assert info.size == size, (info.size, size)
            # the stats count the receipt's own PUT, which follows
            node_stats = NodeStats(time.perf_counter() - started, size, 2, stats.requests + 1, stats.retries)
            record = NodeRecord(self.node, shard_key, receipt_key, size, shard_crc, index, node_stats)
            await self.storage.put(receipt_key, record.receipt_json(epoch, writer_id))
        return record


def _combine_sequential(prefix_crc: int, view: memoryview, view_crc: int) -> int:
    """CRC of (earlier bytes + view) given CRC of the earlier bytes.

    Blobs are written as one buffer each, so the common case is ``prefix_crc == 0``,
    where the answer is ``view_crc``; otherwise continue the running CRC over ``view``.
    """
    return view_crc if prefix_crc == 0 else codec.checksum(view, prefix_crc)


def coalesce_ranges(ranges: Iterable[tuple[int, int]], max_gap: int = 0) -> list[tuple[int, int]]:
    """Merge ``[start, end)`` ranges that overlap or are at most ``max_gap`` apart."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + max_gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass
class ShardReader:
    """Fetches and verifies one node's shard (or some of its blobs) and decodes it."""

    storage: Storage
    node: str
    record: NodeRecord
    config: TransferConfig

    def _where(self, key: str | None = None) -> str:
        return f"node {self.node!r}, object {self.storage.url_of(key or self.record.shard)}"

    async def _fetch(self, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` of the shard in a fresh writable buffer, fetched in
        parallel ranges when large."""
        # np.empty: no zero-fill pass; the decoded arrays are views into this memory
        buffer = memoryview(np.empty(end - start, dtype=np.uint8)) if end > start else memoryview(bytearray())
        step = self.config.range_size
        key = self.record.shard
        try:
            await run_all(
                self.storage.read_into(key, buffer[offset : offset + step], start + offset)
                for offset in range(0, end - start, step)
            )
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(f"{self._where()}: shard object is missing") from None
        except StorageError as exc:
            if exc.code in _SHORT_READ_CODES:
                raise CheckpointCorruptedError(
                    f"{self._where()}: shard is shorter than the manifest's {self.record.size} bytes (truncated)"
                ) from None
            raise
        return buffer

    async def _check_size(self) -> None:
        """One HEAD: the shard exists and has the recorded size."""
        info = await self.storage.head(self.record.shard)
        if info is None:
            raise CheckpointNotFoundError(f"{self._where()}: shard object is missing")
        self.check_size(info.size)

    def check_size(self, size: int) -> None:
        if size != self.record.size:
            raise CheckpointCorruptedError(
                f"{self._where()}: shard is {size} bytes, the manifest says {self.record.size} (truncated or replaced)"
            )

    async def read_all(self) -> dict[str, Any]:
        """Every blob of the shard, verified (sizes, CRC32C of every blob, header, index).

        No HEAD first: a shorter object fails the read, a longer or replaced one fails
        the trailer and checksum checks.
        """
        data = await self._fetch(0, self.record.size)
        return await asyncio.to_thread(self._verify_and_decode, data)

    def _verify_and_decode(self, data: memoryview) -> dict[str, Any]:
        where = self._where()
        header = codec.parse_header(data, where)
        if header.get("node") != self.node:
            raise CheckpointCorruptedError(f"{where}: shard belongs to node {header.get('node')!r}")
        index_offset, index_length, index_crc = codec.parse_trailer(
            data[data.nbytes - codec.TRAILER_SIZE :], data.nbytes, where
        )
        index = codec.parse_index(data[index_offset : index_offset + index_length], index_crc, where)
        if index != dict(self.record.blobs):
            differing = sorted(
                n for n in set(index) | set(self.record.blobs) if index.get(n) != self.record.blobs.get(n)
            )
            shown = ", ".join(repr(n) for n in differing[:5]) + (" ..." if len(differing) > 5 else "")
            raise CheckpointCorruptedError(f"{where}: shard index does not match the manifest for blob(s) {shown}")
        if codec.checksum(data) != self.record.crc32c:
            # a per-blob check below names the blob when the damage is inside one
            for name, entry in self.record.blobs.items():
                payload = data[entry.offset : entry.offset + entry.length]
                if codec.checksum(payload) != entry.crc32c:
                    raise CheckpointCorruptedError(
                        f"{where}, blob {name!r}: CRC32C mismatch (stored bytes are corrupted)"
                    )
            raise CheckpointCorruptedError(f"{where}: shard CRC32C mismatch (stored bytes are corrupted)")
        return {
            name: codec.decode_blob(entry, data[entry.offset : entry.offset + entry.length], f"{where}, blob {name!r}")
            for name, entry in self.record.blobs.items()
        }

    async def read_some(self, names: Iterable[str], *, max_gap: int = 0, checked: bool = False) -> dict[str, Any]:
        """Only the named blobs (each must be in the record), fetched with ranged GETs of
        just their bytes (neighbours within ``max_gap`` bytes share one request).
        ``checked``: the caller already verified the shard's size."""
        wanted = {name: self.record.blobs[name] for name in names}
        if not wanted:
            return {}
        if not checked:  # the caller has not HEADed the shard yet
            await self._check_size()
        ranges = coalesce_ranges(((e.offset, e.offset + e.length) for e in wanted.values()), max_gap)
        buffers: dict[tuple[int, int], memoryview] = {}

        async def fetch(rng: tuple[int, int]) -> None:
            buffers[rng] = await self._fetch(*rng)

        await run_all(fetch(rng) for rng in ranges)

        def decode() -> dict[str, Any]:
            out = {}
            for name, entry in wanted.items():
                start, end = next(r for r in ranges if r[0] <= entry.offset and entry.offset + entry.length <= r[1])
                buf = buffers[(start, end)]
                payload = buf[entry.offset - start : entry.offset - start + entry.length]
                out[name] = codec.decode_blob(entry, payload, f"{self._where()}, blob {name!r}")
            return out

        return await asyncio.to_thread(decode)
