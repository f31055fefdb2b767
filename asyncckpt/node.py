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

from . import codec
from ._tasks import run_all
from .codec import BlobEntry, EncodedBlob
from .config import TransferConfig
from .errors import CheckpointCorruptedError, CheckpointNotFoundError, ObjectTooShortError
from .manifest import NodeRecord, NodeStats
from .storage._base import ByteBudget, Storage, collect_request_stats

__all__ = ["ShardReader", "ShardWriter", "coalesce_ranges"]

_THREAD_MIN = 1 << 20  # buffers at least this big are checksummed off the event loop


@dataclass
class ShardWriter:
    """Writes one node's encoded blobs (:func:`asyncckpt.codec.encode_blobs`) as one
    shard object, then its receipt."""

    storage: Storage
    node: str
    budget: ByteBudget

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
                        # one pass: the blob's CRC, then combined into the shard's
                        if view.nbytes >= _THREAD_MIN:
                            view_crc = await asyncio.to_thread(codec.checksum, view)
                        else:
                            view_crc = codec.checksum(view)
                        blob_crc = codec.checksum_combine(blob_crc, view_crc, view.nbytes)
                        shard_crc = codec.checksum_combine(shard_crc, view_crc, view.nbytes)
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
        # The decoded arrays are views into this memory. A bytearray, not np.empty:
        # numpy asks for transparent huge pages on large arrays, and where the kernel
        # compacts memory to find them (THP defrag "madvise"), first touch is far slower.
        buffer = memoryview(bytearray(end - start))
        step = self.config.range_size
        key = self.record.shard
        try:
            await run_all(
                self.storage.read_into(key, buffer[offset : offset + step], start + offset)
                for offset in range(0, end - start, step)
            )
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(f"{self._where()}: shard object is missing") from None
        except ObjectTooShortError:
            raise CheckpointCorruptedError(
                f"{self._where()}: shard is shorter than the manifest's {self.record.size} bytes (truncated)"
            ) from None
        return buffer

    def check_size(self, size: int) -> None:
        """The shard object's size (from a HEAD) is the recorded one."""
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
        return await asyncio.to_thread(self.decode, data)

    def decode(self, data: memoryview) -> dict[str, Any]:
        """Verify a whole shard's bytes against the record (header, trailer, index, the
        CRC32C of every blob and of the shard) and decode every blob. CPU work: the
        arrays are views into ``data``. Damage is :class:`CheckpointCorruptedError`."""
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
        crcs = {name: codec.checksum(data[e.offset : e.offset + e.length]) for name, e in self.record.blobs.items()}
        for name, entry in self.record.blobs.items():
            if crcs[name] != entry.crc32c:
                raise CheckpointCorruptedError(f"{where}, blob {name!r}: CRC32C mismatch (stored bytes are corrupted)")
        if _shard_checksum(data, self.record.blobs, crcs) != self.record.crc32c:
            raise CheckpointCorruptedError(f"{where}: shard CRC32C mismatch (stored bytes are corrupted)")
        return {
            name: codec.decode_blob(
                entry, data[entry.offset : entry.offset + entry.length], f"{where}, blob {name!r}", verify=False
            )
            for name, entry in self.record.blobs.items()
        }

    async def read_some(self, names: Iterable[str]) -> dict[str, Any]:
        """Only the named blobs (each must be in the record), fetched with ranged GETs of
        just their bytes (adjacent blobs share one request). The caller checks that the
        shard exists with its recorded size (:meth:`check_size` on a HEAD)."""
        wanted = {name: self.record.blobs[name] for name in names}
        if not wanted:
            return {}
        ranges = coalesce_ranges((e.offset, e.offset + e.length) for e in wanted.values())
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


def _shard_checksum(data: memoryview, blobs: Mapping[str, BlobEntry], crcs: Mapping[str, int]) -> int:
    """The whole shard's CRC32C from the blobs' (already computed) CRCs: the bytes between
    and around the blobs are read, the blobs themselves are not read again."""
    crc, pos = 0, 0
    for name, entry in sorted(blobs.items(), key=lambda item: item[1].offset):
        if entry.offset < pos:  # overlapping entries: no shortcut, read everything
            return codec.checksum(data)
        crc = codec.checksum(data[pos : entry.offset], crc)
        crc = codec.checksum_combine(crc, crcs[name], entry.length)
        pos = entry.offset + entry.length
    return codec.checksum(data[pos:], crc)
