"""One node's shard: write it (``ShardWriter``) and read it back (``ShardReader``).

Only this module turns blobs into a stream of shard bytes and back; it knows one node
and one storage, nothing about other nodes or commits. A shard carries its own blob
index in its trailer; the node's record (shard key, size, CRC32C of the whole shard)
vouches for all of it. CPU-heavy work (CRC32C of large arrays, decoding) runs in worker
threads, never on the event loop.

An incremental save (:class:`PriorBlobs`) fingerprints each blob as it is written (CRC32C
and XXH3-128 in one pass, before any of its bytes are sent); a blob whose fingerprint and
layout equal its entry in the epoch the save builds on is not written again: its entry
points at the object that already holds those bytes (``ref``, see :mod:`.manifest`), and
readers fetch it from there with a ranged GET (:meth:`ShardReader.read_referenced`).
Inside a tree blob that changed (a module's state dict with a frozen backbone and a
trained head), each leaf of at least :data:`REUSE_MIN` bytes is compared the same way
with the leaf of the same number in the base's blob of the same name
(:meth:`PriorBlobs.reusable_leaves`): an unchanged leaf points at the bytes already
stored (format 4 records), the skeleton and the changed leaves are written.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import arrays, codec
from ._tasks import run_all
from .codec import BlobEntry, EncodedBlob
from .config import TransferConfig
from .errors import CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError, ObjectTooShortError
from .manifest import EpochRef, NodeRecord, NodeStats, ObjectRef
from .progress import advance
from .storage import ByteBudget, ObjectWriter, Storage, collect_request_stats

__all__ = ["PriorBlobs", "ShardReader", "ShardWriter", "coalesce_ranges", "fresh_buffer"]

_THREAD_MIN = 1 << 20  # buffers at least this big are checksummed off the event loop
_GATHER_MIN = 64 << 10  # pieces smaller than this are gathered into one write...
_GATHER_BYTES = 256 << 10  # ... of about this many bytes
_TAIL_GUESS = 64 << 10  # bytes read from a shard's end to find its blob index
#: Blobs smaller than this are always written again: pointing at them would save little
#: upload and cost a load one more ranged GET.
REUSE_MIN = 64 << 10


@dataclass(frozen=True)
class PriorBlobs:
    """One node's blobs in ``base``, the committed epoch an incremental save builds on:
    its record and its shard's blob index (:meth:`ShardReader.read_prior`)."""

    base: EpochRef
    record: NodeRecord
    entries: Mapping[str, BlobEntry]

    def reusable(
        self,
        blob: EncodedBlob,
        crc: int,
        leaf_crcs: Sequence[int] | None,
        xxh3: bytes,
        leaf_digests: Sequence[bytes | None] | None = None,
    ) -> tuple[BlobEntry, ObjectRef] | None:
        """The entry of ``blob`` in ``base`` and the object holding its bytes, if its
        bytes (CRC32C, XXH3-128, length) and its layout are the same (encoding, dtype
        name, shape, order, kind: numpy, torch or jax; ``stateful``; a tree's skeleton
        length and every leaf's offset, length, CRC32C, digest and layout, none of them
        stored elsewhere); else ``None``."""
        entry = self.entries.get(blob.name)
        if entry is None or entry.xxh3 is None:
            return None
        if blob.entry(entry.offset, crc, leaf_crcs, xxh3, entry.ref, leaf_digests) != entry:
            return None
        return entry, self._holder(entry.ref)

    def reusable_leaves(
        self, blob: EncodedBlob, leaf_crcs: Sequence[int], leaf_digests: Sequence[bytes | None]
    ) -> dict[int, tuple[ObjectRef, int]]:
        """Leaf number -> (the object holding its bytes, their absolute offset there) for
        each leaf of the tree ``blob`` whose bytes (length, CRC32C, XXH3-128) and layout
        (dtype name, shape, order, kind) equal the leaf of the same number of the base's
        tree of the same name. Matching is by number, so two leaves never point at the
        same bytes; what the skeleton says around them (keys, small inline arrays) may
        differ: the skeleton is written again."""
        entry = self.entries.get(blob.name)
        if entry is None or entry.encoding != "tree":
            return {}
        found: dict[int, tuple[ObjectRef, int]] = {}
        new = blob.entry(0, 0, leaf_crcs, None, None, leaf_digests).leaves
        for number, (mine, theirs) in enumerate(zip(new, entry.leaves)):
            if mine.xxh3 is None or mine != replace(theirs, offset=mine.offset, ref=None):
                continue
            if theirs.ref is not None:  # the base pointed already: at the object holding the bytes
                found[number] = (self.record.refs[theirs.ref], theirs.offset)
            else:
                found[number] = (self._holder(entry.ref), entry.offset + theirs.offset)
        return found

    def _holder(self, ref: int | None) -> ObjectRef:
        """The object of ``base`` holding bytes at an entry's offset: its shard, or ``refs[ref]``."""
        return ObjectRef(self.record.shard, self.record.size) if ref is None else self.record.refs[ref]


@dataclass
class ShardWriter:
    """Writes one node's encoded blobs (:func:`asyncckpt.codec.encode_blobs`) as one
    shard object, then, for multi-process saves, its receipt.

    With ``incremental`` every blob of at least :data:`REUSE_MIN` bytes is fingerprinted
    (its entry keeps the XXH3-128 digest for the next save to compare), and given
    ``prior`` the blobs unchanged since then are not written (see :class:`PriorBlobs`).
    """

    storage: Storage
    node: str
    budget: ByteBudget
    incremental: bool = False

    async def write(
        self,
        shard_key: str,
        encoded: list[EncodedBlob],
        *,
        receipt: tuple[str, int, str] | None = None,
        prior: PriorBlobs | None = None,
    ) -> NodeRecord:
        """Upload the shard; returns the node's record. With ``receipt`` = (key, epoch,
        writer id) the record is also written there, after the shard."""
        started = time.perf_counter()
        refs: dict[ObjectRef, int] = {}  # the objects reused blobs live in, numbered in order of use
        reused = 0
        leaf_reuse = False  # some leaves point at other objects: a format 4 record
        with collect_request_stats() as stats:
            header = codec.shard_header(self.node)
            size_hint = codec.shard_size_bound(header, encoded, fingerprinted=self.incremental)
            index = codec.ShardIndex(len(encoded))
            async with self.storage.writer(shard_key, budget=self.budget, size_hint=size_hint) as writer:
                out = _GatheredWrites(writer)
                await out.write(header)
                offset = len(header)
                for blob in encoded:
                    views = blob.buffers
                    xxh3: bytes | None = None
                    digests: list[bytes | None] | None = None
                    if self.incremental and blob.length >= REUSE_MIN:
                        each = REUSE_MIN if blob.leaves else None
                        if blob.length >= _THREAD_MIN:
                            crcs, xxh3, digests = await asyncio.to_thread(codec.fingerprint, views, each)
                        else:
                            crcs, xxh3, digests = codec.fingerprint(views, each)
                    else:
                        crcs = [await _checksum(view) for view in views]
                    blob_crc = codec.combine_checksums(crcs, [view.nbytes for view in views])
                    leaf_crcs, leaf_digests = (
                        (crcs[1:], digests[1:] if digests else None) if blob.leaves else (None, None)
                    )
                    found = None
                    if prior is not None and xxh3 is not None:
                        found = prior.reusable(blob, blob_crc, leaf_crcs, xxh3, leaf_digests)
                    if found is not None:  # unchanged: point at the bytes already stored
                        entry, stored_in = found
                        ref = refs.setdefault(stored_in, len(refs))
                        index.add(blob, entry.offset, blob_crc, leaf_crcs, xxh3, ref, leaf_digests)
                        reused += blob.length
                        advance(blob.length)
                        continue
                    leaf_refs: dict[int, tuple[int, int]] = {}
                    if prior is not None and leaf_crcs is not None and leaf_digests is not None:
                        for number, (stored_in, at) in prior.reusable_leaves(blob, leaf_crcs, leaf_digests).items():
                            leaf_refs[number] = (refs.setdefault(stored_in, len(refs)), at)
                    # the span holds the skeleton and the leaves not pointed at (all, usually)
                    written = [(view, crc) for n, (view, crc) in enumerate(zip(views, crcs)) if n - 1 not in leaf_refs]
                    for view, crc in written:
                        await out.write(view, crc)
                    length = sum(view.nbytes for view, _ in written)
                    if leaf_refs:
                        leaf_reuse = True
                        blob_crc = codec.combine_checksums([crc for _, crc in written], [v.nbytes for v, _ in written])
                        reused += blob.length - length
                        advance(blob.length - length)
                    index.add(blob, offset, blob_crc, leaf_crcs, xxh3, None, leaf_digests, leaf_refs)
                    offset += length
                trailer, index_crc = index.trailer(offset)
                await out.write(trailer)
                await out.flush()
                info = await writer.commit()
            size = offset + len(trailer)
            assert info.size == size, (info.size, size)
            objects, requests = (1, stats.requests) if receipt is None else (2, stats.requests + 1)
            seconds = time.perf_counter() - started
            node_stats = NodeStats(seconds, size, objects, requests, stats.retries, reused)
            receipt_key = receipt[0] if receipt else None
            base = prior.base if prior is not None and refs else None
            record = NodeRecord(
                self.node, shard_key, size, out.crc, node_stats, receipt_key, index_crc, tuple(refs), base, leaf_reuse
            )
            if receipt is not None:
                key, epoch, writer_id = receipt
                await self.storage.put(key, record.receipt_json(epoch, writer_id))
        return record


class _GatheredWrites:
    """Writes to an :class:`ObjectWriter`, gathering small pieces into one write of up
    to :data:`_GATHER_BYTES` (one call and one buffer per many tiny blobs, not one per
    blob), and keeps the CRC32C of everything written."""

    def __init__(self, writer: ObjectWriter):
        self._writer = writer
        self._pending = bytearray()
        self.crc = 0

    async def write(self, view: bytes | bytearray | memoryview, crc: int | None = None) -> None:
        """Append ``view`` (``crc``: its CRC32C, when the caller has it already)."""
        size = memoryview(view).nbytes
        if size < _GATHER_MIN:
            self._pending += view
            if len(self._pending) >= _GATHER_BYTES:
                await self.flush()
            return
        await self.flush()
        if crc is None:
            crc = await asyncio.to_thread(codec.checksum, view) if size >= _THREAD_MIN else codec.checksum(view)
        self.crc = codec.checksum_combine(self.crc, crc, size)
        await self._writer.write_borrowed(view)  # the blobs' memory stays as it is until the shard is committed
        advance(size)

    async def flush(self) -> None:
        """Write what is gathered."""
        if self._pending:
            pending, self._pending = self._pending, bytearray()
            self.crc = codec.checksum(pending, self.crc)
            await self._writer.write_borrowed(pending)  # never changed again: the next pieces gather in a new one
            advance(len(pending))


async def _checksum(view: memoryview) -> int:
    """CRC32C of ``view``, computed in a worker thread when it is large."""
    return await asyncio.to_thread(codec.checksum, view) if view.nbytes >= _THREAD_MIN else codec.checksum(view)


def coalesce_ranges(ranges: Iterable[tuple[int, int]], max_gap: int = 0) -> list[tuple[int, int]]:
    """Merge ``[start, end)`` ranges that overlap or are at most ``max_gap`` apart."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + max_gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


async def fresh_buffer(nbytes: int) -> memoryview:
    """:func:`arrays.host_memory`, populated in a worker thread when it is large (the
    kernel's work of faulting its pages in, ~0.2 ms per MiB, stays off the loop)."""
    if nbytes < _THREAD_MIN:
        return arrays.host_memory(nbytes)
    return await asyncio.to_thread(arrays.host_memory, nbytes)


def split_range(start: int, end: int, step: int) -> list[tuple[int, int]]:
    """``[start, end)`` in pieces of at most ``step`` bytes, all about the same size (no
    tiny last piece)."""
    count = max(1, -(-(end - start) // step))
    size = -(-(end - start) // count)
    return [(lo, min(lo + size, end)) for lo in range(start, end, size)] or [(start, end)]


@dataclass
class ShardReader:
    """Fetches and verifies one node's shard (or some of its blobs) and decodes it."""

    storage: Storage
    node: str
    record: NodeRecord
    config: TransferConfig

    def where(self) -> str:
        return f"node {self.node!r}, object {self.storage.url_of(self.record.shard)}"

    async def fetch(self, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` of the shard in a fresh writable buffer, fetched in
        parallel ranges when large."""
        buffer = await fresh_buffer(end - start)  # the decoded arrays are views into it
        await self.read_scatter([buffer], start)
        return buffer

    async def read_scatter(
        self, views: Sequence[memoryview], start: int, *, inflight: set[asyncio.Task[None]] | None = None
    ) -> None:
        """Fill ``views`` (writable byte views: fresh buffers, or a load's target memory),
        one after the other, with the shard's bytes from ``start`` on. The whole span is
        read in parallel ranges of about ``config.range_size``, each one storage read of
        the views (or parts of views) it covers: ``read_into`` where that is one view,
        else ``read_scatter`` (one ranged GET on S3).

        With ``inflight``, each range is a task added to it that cancelling this call
        does not stop (a local read runs in a worker thread that nothing stops): the
        caller waits for them before it touches the views again."""
        key = self.record.shard
        # bounds[i]: where views[i] starts in the shard; bounds[-1]: where the span ends
        bounds = list(itertools.accumulate((view.nbytes for view in views), initial=start))
        if bounds[-1] == start:
            return

        def covering(lo: int, hi: int) -> list[memoryview]:
            """The views, cut to ``[lo, hi)``, that hold those bytes."""
            parts = []
            at = bisect.bisect_right(bounds, lo) - 1  # the last view starting at or before lo
            while at < len(views) and bounds[at] < hi:
                first, last = max(lo, bounds[at]) - bounds[at], min(hi, bounds[at + 1]) - bounds[at]
                if last > first:
                    parts.append(views[at][first:last])
                at += 1
            return parts

        async def piece(lo: int, hi: int) -> None:
            parts = covering(lo, hi)
            read = (
                self.storage.read_into(key, parts[0], lo)
                if len(parts) == 1
                else self.storage.read_scatter(key, parts, lo)
            )
            if inflight is None:
                await read
            else:
                task = asyncio.ensure_future(read)
                inflight.add(task)
                await asyncio.shield(task)
            advance(hi - lo)

        try:
            await run_all(piece(lo, hi) for lo, hi in split_range(start, bounds[-1], self.config.range_size))
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(f"{self.where()}: shard object is missing") from None
        except ObjectTooShortError:
            raise CheckpointCorruptedError(
                f"{self.where()}: shard is shorter than the manifest's {self.record.size} bytes (truncated)"
            ) from None

    async def check_size(self) -> None:
        """The shard object exists with its recorded size (a HEAD): checked before any
        buffer of the recorded size is allocated."""
        info = await self.storage.head(self.record.shard)
        if info is None:
            raise CheckpointNotFoundError(f"{self.where()}: shard object is missing")
        if info.size != self.record.size:
            raise CheckpointCorruptedError(
                f"{self.where()}: shard is {info.size} bytes, the manifest says {self.record.size} "
                "(truncated or replaced)"
            )

    async def read_all(self) -> dict[str, Any]:
        """Every blob of the shard, verified (sizes, CRC32C of every blob, header, index)."""
        await self.check_size()
        data = await self.fetch(0, self.record.size)
        values = await asyncio.to_thread(self.decode, data)
        if self.record.refs:  # format 3: some blobs (format 4: some leaves) live in objects of other epochs
            entries = await asyncio.to_thread(self._referenced_entries, data)
            values.update(await self.read_referenced({n: e for n, e in entries.items() if e.ref is not None}))
            values.update(await self._read_trees(data, {n: e for n, e in entries.items() if e.leaf_refs}))
        return values

    def decode(self, data: memoryview) -> dict[str, Any]:
        """Verify a whole shard's bytes (header, trailer, index, the CRC32C of every blob
        and of the shard against the record) and decode every blob. CPU work: the arrays
        are views into ``data``. Damage is :class:`CheckpointCorruptedError`."""
        where = self.where()
        if data.nbytes != self.record.size:
            raise CheckpointCorruptedError(f"{where}: shard is {data.nbytes} bytes, the record says {self.record.size}")
        header = codec.parse_header(data, where)
        if header.get("node") != self.node:
            raise CheckpointCorruptedError(f"{where}: shard belongs to node {header.get('node')!r}")
        index = self._parse_index(data[data.nbytes - codec.TRAILER_SIZE :], lambda lo, hi: data[lo:hi])
        index = {name: entry for name, entry in index.items() if entry.ref is None}  # see read_referenced
        # (the spans of trees with leaves in other objects are checked here, decoded by _read_trees)
        crcs = {name: codec.checksum(data[e.offset : e.offset + e.length]) for name, e in index.items()}
        for name, entry in index.items():
            if crcs[name] != entry.crc32c:
                raise CheckpointCorruptedError(f"{where}, blob {name!r}: CRC32C mismatch (stored bytes are corrupted)")
        if _shard_checksum(data, index, crcs) != self.record.crc32c:
            raise CheckpointCorruptedError(f"{where}: shard CRC32C mismatch (stored bytes are corrupted)")
        return {
            name: codec.decode_blob(
                entry, data[entry.offset : entry.offset + entry.length], f"{where}, blob {name!r}", verify=False
            )
            for name, entry in index.items()
            if not entry.leaf_refs
        }

    def _parse_index(self, trailer: memoryview, body_at: Callable[[int, int], memoryview]) -> dict[str, BlobEntry]:
        where = self.where()
        offset, length, crc = codec.parse_trailer(trailer, self.record.size, where)
        if self.record.index_crc32c is not None and crc != self.record.index_crc32c:
            raise CheckpointCorruptedError(f"{where}: blob index differs from the record's (a shard of another node?)")
        index = codec.parse_index(body_at(offset, offset + length), crc, where)
        for name, entry in index.items():
            if entry.ref is not None:
                refs = self.record.refs
                if entry.ref >= len(refs) or entry.offset + entry.length > refs[entry.ref].size:
                    raise CheckpointCorruptedError(f"{where}, blob {name!r}: points outside the objects of its record")
            elif entry.offset + entry.length > offset:
                raise CheckpointCorruptedError(f"{where}, blob {name!r}: lies outside the shard's payloads")
            for number, leaf in enumerate(entry.leaves):
                if leaf.ref is not None and (
                    leaf.ref >= len(self.record.refs) or leaf.offset + leaf.length > self.record.refs[leaf.ref].size
                ):
                    raise CheckpointCorruptedError(
                        f"{where}, blob {name!r}: leaf {number} points outside the objects of its record"
                    )
        return index

    async def read_index(self) -> dict[str, BlobEntry]:
        """The shard's blob index, from its tail (one ranged GET, two for a large index).
        The caller checks the object's size first (:meth:`check_size`)."""
        size = self.record.size
        start = max(0, size - _TAIL_GUESS)
        tail = await self.fetch(start, size)
        offset, _, _ = codec.parse_trailer(tail[tail.nbytes - codec.TRAILER_SIZE :], size, self.where())
        if offset < start:  # a large index: fetch it whole
            start, tail = offset, await self.fetch(offset, size)
        return self._parse_index(tail[tail.nbytes - codec.TRAILER_SIZE :], lambda lo, hi: tail[lo - start : hi - start])

    async def read_prior(self, base: EpochRef) -> PriorBlobs:
        """This node's blobs in ``base`` (the epoch of this record), for an incremental
        save: the object's size is checked, then its blob index read from its tail."""
        await self.check_size()
        return PriorBlobs(base, self.record, await self.read_index())

    def _referenced_entries(self, data: memoryview) -> dict[str, BlobEntry]:
        """The entries of the whole shard ``data`` whose bytes, or some of whose leaves'
        bytes, live in other objects."""
        index = self._parse_index(data[data.nbytes - codec.TRAILER_SIZE :], lambda lo, hi: data[lo:hi])
        return {name: entry for name, entry in index.items() if entry.ref is not None or entry.leaf_refs}

    def holder(self, ref: int) -> ShardReader:
        """A reader of ``record.refs[ref]``, an object of another epoch holding some of
        this node's bytes (its blob index is not this node's: read only byte ranges)."""
        stored_in = self.record.refs[ref]
        return ShardReader(
            self.storage, self.node, NodeRecord(self.node, stored_in.key, stored_in.size, 0), self.config
        )

    async def _read_trees(self, data: memoryview, entries: Mapping[str, BlobEntry]) -> dict[str, Any]:
        """The tree blobs of ``entries``, whose spans are in the (verified) shard ``data``
        and some of whose leaves are in other objects: those leaves are fetched with
        ranged GETs (each object's size checked first), each checked against its CRC32C."""
        holders = {
            leaf.ref: self.holder(leaf.ref) for e in entries.values() for leaf in e.leaves if leaf.ref is not None
        }
        await run_all((holder.check_size() for holder in holders.values()), self.config.max_concurrency)
        wanted = [(name, n) for name, e in entries.items() for n, leaf in enumerate(e.leaves) if leaf.ref is not None]

        def fetch(name: str, number: int) -> Awaitable[memoryview]:
            leaf = entries[name].leaves[number]
            assert leaf.ref is not None
            return holders[leaf.ref].fetch(leaf.offset, leaf.offset + leaf.length)

        got = await run_all((fetch(name, n) for name, n in wanted), self.config.max_concurrency)
        fetched = dict(zip(wanted, got))

        def decode() -> dict[str, Any]:
            out = {}
            for (name, number), buffer in fetched.items():
                leaf = entries[name].leaves[number]
                assert leaf.ref is not None
                if codec.checksum(buffer) != leaf.crc32c:
                    raise CheckpointCorruptedError(
                        f"{holders[leaf.ref].where()}, blob {name!r}: CRC32C mismatch in leaf {number} "
                        "(stored bytes are corrupted)"
                    )
            for name, entry in entries.items():
                assert entry.skeleton is not None
                start = entry.offset

                def leaf_bytes(number: int, entry: BlobEntry = entry, name: str = name) -> memoryview:
                    leaf = entry.leaves[number]
                    if leaf.ref is not None:
                        return fetched[(name, number)]
                    return data[entry.offset + leaf.offset : entry.offset + leaf.offset + leaf.length]

                try:
                    out[name] = codec.tree_value(entry, data[start : start + entry.skeleton], leaf_bytes)
                except CheckpointError as exc:  # a framework or dtype library this blob needs is missing
                    raise type(exc)(f"{self.where()}, blob {name!r}: {exc}") from None
                except Exception as exc:  # verified bytes that do not decode
                    raise CheckpointCorruptedError(
                        f"{self.where()}, blob {name!r}: blob does not decode ({type(exc).__name__}: {exc})"
                    ) from None
            return out

        return await asyncio.to_thread(decode)

    async def read_referenced(self, entries: Mapping[str, BlobEntry]) -> dict[str, Any]:
        """The blobs of ``entries`` (each with ``ref``), fetched with ranged GETs from the
        objects of other epochs that hold them (``record.refs``), each object's size
        checked first, each blob checked against its CRC32C."""
        groups: dict[int, dict[str, BlobEntry]] = {}
        for name, entry in entries.items():
            assert entry.ref is not None
            groups.setdefault(entry.ref, {})[name] = entry

        async def read_group(ref: int, group: dict[str, BlobEntry]) -> dict[str, Any]:
            holder = self.holder(ref)
            await holder.check_size()
            return await holder.read_some(group)

        values: dict[str, Any] = {}
        for got in await run_all(
            (read_group(ref, group) for ref, group in groups.items()), self.config.max_concurrency
        ):
            values.update(got)
        return values

    async def read_some(self, wanted: Mapping[str, BlobEntry]) -> dict[str, Any]:
        """Only the ``wanted`` blobs (entries of :meth:`read_index`, none with leaves
        stored in other objects), fetched with ranged
        GETs of their bytes: blobs at most ``config.coalesce_gap`` bytes apart share one
        request. Each blob is checked against its CRC32C."""
        if not wanted:
            return {}
        ranges = coalesce_ranges(((e.offset, e.offset + e.length) for e in wanted.values()), self.config.coalesce_gap)
        buffers = await run_all(self.fetch(lo, hi) for lo, hi in ranges)
        starts = [lo for lo, _ in ranges]

        def decode() -> dict[str, Any]:
            out = {}
            for name, entry in wanted.items():
                at = bisect.bisect_right(starts, entry.offset) - 1
                buf, lo = buffers[at], starts[at]
                payload = buf[entry.offset - lo : entry.offset - lo + entry.length]
                out[name] = codec.decode_blob(entry, payload, f"{self.where()}, blob {name!r}")
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
