"""Loads into workspaces: in-place restore, the undo journal and ``Stateful`` values.

A blob whose workspace entry already holds an array or tensor of the same dtype and
shape (a numpy array, a CPU or CUDA tensor; for a ``Stateful`` value, the tensors of its
``state_dict()``, which share memory with the live parameters and optimizer state) is
written into that object: where it is C-contiguous host memory, the shard's bytes are
read straight into it, otherwise they are fetched and copied in. Everything else is
decoded into new values, as :class:`~asyncckpt.node.ShardReader` does. A ``jax.Array``
is immutable: a new one is made on the target's sharding.

All or nothing. Before any byte is written into a target, everything that can be checked
without the data is (manifest, blob index, the shard's size, dtype and shape of every
target). Before a target is overwritten, its bytes are copied, in a worker thread, into
an :class:`UndoJournal` (a temporary file: page cache, not this process's memory). Then
every byte is read and checked (each leaf's and blob's CRC32C, and for whole loads the
shard's, combined from them), and only then is ``load_state_dict`` called on each
``Stateful`` value and are the workspaces updated. If anything fails (I/O, a CRC
mismatch, another node's failure, a ``load_state_dict``, cancellation), the reads and
copies still in flight are waited for, every journaled target gets its old bytes back,
and only then does the error propagate; the journal is closed either way. A
``load_state_dict`` that already ran is not undone beyond its tensors: non-tensor
settings (an optimizer's ``lr``) it took may stay.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from . import arrays, codec
from ._tasks import run_all
from .codec import BlobEntry, LeafEntry
from .config import TransferConfig
from .errors import CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError
from .manifest import EpochIndex, NodeStats
from .node import ShardReader, fresh_buffer
from .storage import Storage
from .transfer import plan_partial_load, read_nodes

__all__ = ["UndoJournal", "restore_partial", "restore_workspaces"]

T = TypeVar("T")
log = logging.getLogger("asyncckpt")

_BLOB = -1  # the part of a blob that is not a tree: the whole blob
_SKELETON = -2  # a tree's skeleton


class UndoJournal:
    """The bytes of each target before a load overwrites it, in a temporary file, to put
    them back if the load fails. Its methods block: call them in a worker thread."""

    def __init__(self) -> None:
        self._file: io.BufferedRandom | None = None
        self._saved: list[tuple[Any, int, np.dtype[Any], tuple[int, ...]]] = []

    def save(self, targets: Iterable[Any]) -> None:
        """Journal each target (a numpy array or a tensor; each once; jax arrays are
        immutable and skipped). A failure to write the journal is
        :class:`CheckpointError`: the targets not journaled yet have not been touched."""
        seen = {id(target) for target, *_ in self._saved}
        for target in targets:
            kind = arrays.array_kind(target)
            if kind is None or kind == "jax" or id(target) in seen:
                continue
            seen.add(id(target))
            try:
                current = arrays.host_view(target, kind)  # a view in host memory, a copy from a device
            except arrays.UnsupportedArray:
                continue  # not an array asyncckpt writes into
            if not current.size:
                continue  # nothing to put back
            try:
                if self._file is None:
                    self._file = tempfile.TemporaryFile()
                offset = self._file.seek(0, 2)
                self._file.write(np.ascontiguousarray(current).reshape(-1).view(np.uint8).data)
            except OSError as exc:
                raise CheckpointError(f"could not write the undo journal of a load: {exc}") from exc
            self._saved.append((target, offset, current.dtype, current.shape))

    def undo(self) -> None:
        """Put every journaled target's bytes back, last first."""
        for target, offset, dtype, shape in reversed(self._saved):
            assert self._file is not None
            self._file.seek(offset)
            view = arrays.host_target(target, dtype, shape)
            host = view if view is not None and view.flags.c_contiguous else np.empty(shape, dtype)
            raw = host.reshape(-1).view(np.uint8).data
            got = 0
            while got < raw.nbytes:
                n = self._file.readinto(raw[got:])
                if not n:
                    raise CheckpointError("the undo journal of a load is truncated")
                got += n
            if host is not view:
                arrays.assign(target, host)
        self._saved.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Guard:
    """A load's undo journals and the work in flight that writes into targets."""

    def __init__(self) -> None:
        self.journals: list[UndoJournal] = []
        self.inflight: set[asyncio.Task[Any]] = set()
        #: id -> (a Stateful destination, its state dict before the load)
        self.previous: dict[int, tuple[Any, Any]] = {}
        #: the Stateful destinations whose load_state_dict was called, in order
        self.loaded: list[Any] = []

    def journal(self) -> UndoJournal:
        journal = UndoJournal()
        self.journals.append(journal)
        return journal

    async def run(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` as a task that cancelling the caller does not stop (it writes
        into targets: a rollback must wait for it)."""
        task = asyncio.ensure_future(aw)
        self.inflight.add(task)
        return await asyncio.shield(task)

    async def rollback(self) -> None:
        """Wait for the work in flight, then undo every journal (last first); cancelling
        the caller meanwhile does not stop this, and is raised once it is done."""
        cancelled = await _settle(self.inflight)
        undo = asyncio.ensure_future(asyncio.to_thread(self._undo))
        cancelled = await _settle({undo}) or cancelled
        undo.result()
        if cancelled:
            raise asyncio.CancelledError

    def _undo(self) -> None:
        """The journaled bytes back, then each ``load_state_dict`` that ran given its
        previous state dict (whose tensors now hold their old bytes again)."""
        for journal in reversed(self.journals):
            journal.undo()
        for dest in reversed(self.loaded):
            try:
                dest.load_state_dict(self.previous[id(dest)][1])
            except Exception as exc:  # the tensors are back; other settings may not be
                log.warning("could not give %s its previous state back: %s", type(dest).__name__, exc)

    def close(self) -> None:
        for journal in self.journals:
            journal.close()


async def _settle(tasks: set[asyncio.Task[Any]]) -> bool:
    """Wait until every task is done, whatever happens to the caller meanwhile; whether
    the caller was cancelled. The tasks' own failures are consumed (the load's first
    error is the one raised)."""
    cancelled = False
    pending = {task for task in tasks if not task.done()}
    while pending:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
        pending = {task for task in pending if not task.done()}
    for task in tasks:
        if not task.cancelled():
            task.exception()
    return cancelled


# --------------------------------------------------------------------------- one shard


@dataclass
class _Piece:
    """A byte range that is checked on its own: a blob, a tree's skeleton or leaf, or the
    bytes around the blobs (``blob`` None), in the shard (``ref`` None) or in the object
    ``record.refs[ref]`` (an incremental save's pointer)."""

    start: int
    end: int
    blob: str | None = None
    part: int = _BLOB  # _BLOB, _SKELETON or a leaf number
    spec: BlobEntry | LeafEntry | None = None  # the array it holds, when it is one
    target: Any = None
    direct: memoryview | None = None  # the target's memory, read straight into
    data: memoryview | None = None
    ref: int | None = None
    spanned: bool = True  # in its blob's span (covered by the blob's CRC32C): not a leaf stored elsewhere

    @property
    def writes_target(self) -> bool:
        return self.target is not None and arrays.array_kind(self.target) != "jax"


@dataclass(frozen=True)
class _Leaf:
    """A placeholder for leaf ``number`` while a skeleton is matched to a live state dict."""

    number: int


def _array_spec(spec: BlobEntry | LeafEntry) -> tuple[np.dtype[Any], tuple[int, ...]]:
    assert spec.dtype is not None and spec.shape is not None
    return arrays.dtype_from_spec(spec.dtype), spec.shape


def _fits(target: Any, spec: BlobEntry | LeafEntry) -> bool:
    """Whether ``target`` can take the array of ``spec`` in place (a jax array: its sharding)."""
    kind = arrays.array_kind(target)
    if kind is None:
        return False
    dtype, shape = _array_spec(spec)
    if kind == "jax":
        return spec.kind == "jax" and target.dtype == dtype and tuple(target.shape) == shape
    return arrays.host_target(target, dtype, shape) is not None or arrays.device_target(target, dtype, shape)


def _match(decoded: Any, live: Any, found: dict[int, Any]) -> None:
    """Pair each leaf placeholder of ``decoded`` with the value at the same place in ``live``."""
    if isinstance(decoded, _Leaf):
        found[decoded.number] = live
    elif isinstance(decoded, dict) and isinstance(live, Mapping):
        for key, item in decoded.items():
            if key in live:
                _match(item, live[key], found)
    elif isinstance(decoded, (list, tuple)) and isinstance(live, (list, tuple)) and len(decoded) == len(live):
        for item, live_item in zip(decoded, live):
            _match(item, live_item, found)


def _arrays_in(value: Any, out: list[Any], depth: int = 0) -> None:
    """Every array or tensor inside a (state dict) container."""
    if arrays.array_kind(value) is not None:
        out.append(value)
    elif depth < 128 and isinstance(value, Mapping):
        for item in value.values():
            _arrays_in(item, out, depth + 1)
    elif depth < 128 and isinstance(value, (list, tuple)):
        for item in value:
            _arrays_in(item, out, depth + 1)


async def _targets(
    source: Callable[[int | None], ShardReader],
    entries: Mapping[str, BlobEntry],
    destinations: Mapping[str, Any],
    guard: _Guard,
) -> dict[tuple[str, int], Any]:
    """(blob, part) -> the live object that part is restored into (``source(ref)``: the
    reader of the object an entry's ``ref`` names). Each ``Stateful`` destination's
    current state dict is kept in ``guard`` (its arrays to be journaled:
    ``load_state_dict`` may write into any of them)."""
    targets: dict[tuple[str, int], Any] = {}
    trees: dict[str, Any] = {}
    for blob, entry in entries.items():
        dest: Any = destinations.get(blob)
        if entry.encoding == "ndarray" and _fits(dest, entry):
            targets[(blob, _BLOB)] = dest
        elif entry.stateful and arrays.is_stateful(dest):
            guard.previous[id(dest)] = (dest, dest.state_dict())
            if entry.encoding == "tree":
                trees[blob] = dest
    skeletons = await run_all(
        source(entries[blob].ref).fetch(entries[blob].offset, entries[blob].offset + (entries[blob].skeleton or 0))
        for blob in trees
    )
    for (blob, dest), skeleton in zip(trees.items(), skeletons):
        entry = entries[blob]
        try:
            placeholders = codec.decode_tree(entry, skeleton, _Leaf)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointCorruptedError(
                f"{source(entry.ref).where()}, blob {blob!r}: skeleton does not decode ({type(exc).__name__}: {exc})"
            ) from None
        found: dict[int, Any] = {}
        _match(placeholders, guard.previous[id(dest)][1], found)
        for number, live in found.items():
            if _fits(live, entry.leaves[number]):
                targets[(blob, number)] = live
    return targets


def _pieces(entries: Mapping[str, BlobEntry], targets: Mapping[tuple[str, int], Any]) -> list[_Piece]:
    """The pieces of ``entries``, blob by blob, each blob's in its order (skeleton, then
    leaf by leaf), each in the object that holds it."""
    pieces: list[_Piece] = []
    for blob, entry in entries.items():
        if entry.encoding == "tree":
            assert entry.skeleton is not None
            pieces.append(_Piece(entry.offset, entry.offset + entry.skeleton, blob, _SKELETON, ref=entry.ref))
            for number, leaf in enumerate(entry.leaves):
                target = targets.get((blob, number))
                if leaf.ref is not None:  # stored in another object, at an absolute offset
                    end = leaf.offset + leaf.length
                    pieces.append(_Piece(leaf.offset, end, blob, number, leaf, target, ref=leaf.ref, spanned=False))
                else:
                    start = entry.offset + leaf.offset
                    pieces.append(_Piece(start, start + leaf.length, blob, number, leaf, target, ref=entry.ref))
        else:
            spec = entry if entry.encoding == "ndarray" else None
            target = targets.get((blob, _BLOB))
            pieces.append(_Piece(entry.offset, entry.offset + entry.length, blob, _BLOB, spec, target, ref=entry.ref))
    for piece in pieces:
        if piece.writes_target and piece.spec is not None:
            view = arrays.host_target(piece.target, *_array_spec(piece.spec))
            stored = view.T if view is not None and piece.spec.order == "F" else view
            if stored is not None and stored.flags.c_contiguous and stored.nbytes == piece.end - piece.start > 0:
                piece.direct = stored.reshape(-1).view(np.uint8).data
    return pieces


def _framed(pieces: list[_Piece], shard_size: int, where: str) -> list[_Piece]:
    """The shard's ``pieces`` in shard order and the bytes around them: pieces covering
    the whole shard."""
    framed: list[_Piece] = []
    pos = 0
    for piece in sorted(pieces, key=lambda p: p.start):
        if piece.start < pos:
            raise CheckpointCorruptedError(f"{where}: blobs overlap")
        if piece.start > pos:
            framed.append(_Piece(pos, piece.start))
        framed.append(piece)
        pos = piece.end
    framed.append(_Piece(pos, shard_size))
    return framed


async def _read(reader: ShardReader, pieces: list[_Piece], guard: _Guard) -> None:
    """Every piece's bytes (``pieces``: of one object, in its order), one scatter read per
    run of pieces that lie at most ``config.coalesce_gap`` bytes apart: a direct piece is
    read straight into its target's memory, the others (and the bytes between pieces, read
    and dropped) into one fresh buffer per run."""
    runs: list[list[_Piece]] = []
    for piece in pieces:
        if piece.end == piece.start:
            piece.data = memoryview(b"")
        elif runs and 0 <= piece.start - runs[-1][-1].end <= reader.config.coalesce_gap:
            runs[-1].append(piece)
        else:
            runs.append([piece])
    await run_all(_read_run(reader, run, guard) for run in runs)


async def _read_run(reader: ShardReader, run: list[_Piece], guard: _Guard) -> None:
    """One run of :func:`_read`: one scatter read whose views are the direct pieces'
    targets and, between them, slices of the fresh buffer (one per stretch of other
    pieces and gaps: a load into new memory reads a whole run into one view)."""
    start = pos = run[0].start
    fresh = run[-1].end - start - sum(piece.end - piece.start for piece in run if piece.direct is not None)
    buffer = await fresh_buffer(fresh)  # every byte of the run that is not a target's
    views: list[memoryview] = []
    used = viewed = 0  # bytes of the buffer given to pieces and gaps / to views
    for piece in run:
        used += piece.start - pos  # a gap's bytes: read with their neighbours, then dropped
        if piece.direct is None:
            piece.data = buffer[used : used + piece.end - piece.start]
            used += piece.end - piece.start
        else:
            if used > viewed:
                views.append(buffer[viewed:used])
                viewed = used
            piece.data = piece.direct
            views.append(piece.direct)
        pos = piece.end
    if used > viewed:
        views.append(buffer[viewed:used])
    await reader.read_scatter(views, start, inflight=guard.inflight)


def _finish(
    entries: Mapping[str, BlobEntry],
    pieces: list[_Piece],
    framed: list[_Piece] | None,
    shard_crc: int | None,
    where: Callable[[int | None], str],
) -> dict[str, Any]:
    """Check every piece's CRC32C (each leaf's, each blob's span, and over ``framed``,
    the pieces covering the whole shard, the shard's), copy the fetched bytes of targets
    that were not read into directly, and build the values; ``where(ref)`` names the
    object of a piece. CPU work."""
    every = {id(piece): piece for piece in (*pieces, *(framed or ()))}  # framed holds the shard's pieces too
    crcs = {key: codec.checksum(piece.data) for key, piece in every.items()}
    parts: dict[str, list[_Piece]] = {}
    for piece in pieces:
        if piece.blob is not None:
            parts.setdefault(piece.blob, []).append(piece)
    for blob, entry in entries.items():
        for piece in parts[blob]:
            if isinstance(piece.spec, LeafEntry) and crcs[id(piece)] != piece.spec.crc32c:
                raise CheckpointCorruptedError(
                    f"{where(piece.ref)}, blob {blob!r}: CRC32C mismatch in leaf {piece.part} (stored bytes are corrupted)"
                )
        span = [piece for piece in parts[blob] if piece.spanned]
        blob_crc = codec.combine_checksums([crcs[id(p)] for p in span], [p.end - p.start for p in span])
        if blob_crc != entry.crc32c:
            raise CheckpointCorruptedError(
                f"{where(entry.ref)}, blob {blob!r}: CRC32C mismatch (stored bytes are corrupted)"
            )
    if framed is not None and shard_crc is not None:
        if codec.combine_checksums([crcs[id(p)] for p in framed], [p.end - p.start for p in framed]) != shard_crc:
            raise CheckpointCorruptedError(f"{where(None)}: shard CRC32C mismatch (stored bytes are corrupted)")

    def value(piece: _Piece) -> Any:
        assert piece.spec is not None and piece.data is not None
        if piece.target is None:
            return arrays.from_host(codec.leaf_array(piece.spec, piece.data), piece.spec.kind or "numpy")
        if not piece.writes_target:  # a jax array: a new one, on the target's sharding
            return arrays.from_host(codec.leaf_array(piece.spec, piece.data), "jax", like=piece.target)
        if piece.direct is None:
            arrays.assign(piece.target, codec.leaf_array(piece.spec, piece.data))
        return piece.target

    values: dict[str, Any] = {}
    for blob, entry in entries.items():
        first = parts[blob][0]
        assert first.data is not None
        try:
            if entry.encoding == "tree":
                leaves = parts[blob][1:]
                values[blob] = codec.decode_tree(entry, first.data, functools.partial(_leaf_value, value, leaves))
            elif first.target is not None:
                values[blob] = value(first)
            else:
                values[blob] = codec.decode_blob(entry, first.data, f"{where(entry.ref)}, blob {blob!r}", verify=False)
        except CheckpointError:
            raise
        except Exception as exc:  # verified bytes that do not decode
            raise CheckpointCorruptedError(
                f"{where(entry.ref)}, blob {blob!r}: blob does not decode ({type(exc).__name__}: {exc})"
            ) from None
    return values


def _leaf_value(value: Callable[[_Piece], Any], leaves: Sequence[_Piece], number: int) -> Any:
    return value(leaves[number])


def _holders(reader: ShardReader, entries: Mapping[str, BlobEntry]) -> dict[int, ShardReader]:
    """ref -> a reader of each object of another epoch that blobs of ``entries`` (or, format
    4, leaves of their trees) point at (``record.refs[ref]``)."""
    refs = {entry.ref for entry in entries.values()} | {leaf.ref for e in entries.values() for leaf in e.leaves}
    return {ref: reader.holder(ref) for ref in sorted(ref for ref in refs if ref is not None)}


async def _read_shard(
    reader: ShardReader, entries: Mapping[str, BlobEntry], whole: bool, destinations: Mapping[str, Any], guard: _Guard
) -> tuple[dict[str, Any], set[str]]:
    """The blobs of ``entries`` (of the shard's checked index; ``whole``: all of them, and
    the shard's CRC32C is checked too), restored in place into the matching
    ``destinations``: their values and the names of the ``Stateful`` ones. Blobs an
    incremental save pointed at objects of other epochs (or, format 4, leaves of their
    trees) are read from those (each object's size checked first); the shard's CRC32C
    covers the bytes in the shard."""
    known = set(guard.previous)
    holders = _holders(reader, entries)
    await run_all(holder.check_size() for holder in holders.values())

    def source(ref: int | None) -> ShardReader:
        return reader if ref is None else holders[ref]

    pieces = _pieces(entries, await _targets(source, entries, destinations, guard))
    by_source: dict[int | None, list[_Piece]] = {None: []}
    for piece in sorted(pieces, key=lambda p: p.start):
        by_source.setdefault(piece.ref, []).append(piece)
    framed = _framed(by_source[None], reader.record.size, reader.where()) if whole else None
    if framed is not None:
        by_source[None] = framed
    live: list[Any] = [p.target for p in pieces if p.writes_target]
    for key, (_, state) in guard.previous.items():
        if key not in known:
            _arrays_in(state, live)
    if live:
        await guard.run(asyncio.to_thread(guard.journal().save, live))  # a rollback waits for it
    await run_all(_read(source(ref), group, guard) for ref, group in by_source.items())
    where = {ref: source(ref).where() for ref in by_source}
    finish = functools.partial(_finish, entries, pieces, framed, reader.record.crc32c, where.__getitem__)
    values = await guard.run(asyncio.to_thread(finish))
    return values, {blob for blob, entry in entries.items() if entry.stateful}


# --------------------------------------------------------------------------- loads


def _load_states(
    workspaces: Mapping[str, Mapping[str, Any]], loaded: Mapping[str, tuple[dict[str, Any], set[str]]], guard: _Guard
) -> None:
    for node, (values, stateful) in loaded.items():
        for blob in sorted(stateful):
            dest: Any = workspaces[node].get(blob)
            if arrays.is_stateful(dest):
                guard.loaded.append(dest)
                try:
                    dest.load_state_dict(values[blob])
                except Exception as exc:
                    raise CheckpointError(
                        f"node {node!r}, blob {blob!r}: load_state_dict failed ({type(exc).__name__}: {exc})"
                    ) from exc


async def restore_workspaces(
    storage: Storage, config: TransferConfig, index: EpochIndex, workspaces: Mapping[str, MutableMapping[str, Any]]
) -> dict[str, NodeStats]:
    """Every blob of every node of ``workspaces`` into it, all or nothing (see the module
    docstring); per-node stats, or one error naming every failed node."""
    guard = _Guard()
    try:

        async def read_node(node: str) -> tuple[tuple[dict[str, Any], set[str]], int]:
            reader = ShardReader(storage, node, index.nodes[node], config)
            await reader.check_size()
            entries = await reader.read_index()
            return await _read_shard(reader, entries, True, workspaces[node], guard), reader.record.load_bytes

        what = f"load of epoch {index.epoch}"
        loaded, stats = await read_nodes(what, workspaces, read_node, config.max_nodes_in_flight)
        await guard.run(asyncio.to_thread(_load_states, workspaces, loaded, guard))
    except BaseException:
        await guard.rollback()
        raise
    finally:
        guard.close()
    for node, (values, stateful) in loaded.items():
        workspace = workspaces[node]
        workspace.update(
            {
                blob: v
                for blob, v in values.items()
                if not (blob in stateful and arrays.is_stateful(workspace.get(blob)))
            }
        )
    return stats


async def restore_partial(
    storage: Storage,
    config: TransferConfig,
    index: EpochIndex,
    nodes: Sequence[str],
    names: Sequence[str],
    session: MutableMapping[str, Any],
) -> dict[str, NodeStats] | None:
    """The named blobs of ``nodes`` (see :func:`~asyncckpt.transfer.plan_partial_load`)
    into ``session``, keyed as named, in place into its arrays and tensors that match (a
    ``Stateful`` blob comes as its plain state dict); per-node stats, or ``None`` (and
    ``session`` untouched) when a node's shard object is missing. All or nothing."""
    readers = {node: ShardReader(storage, node, index.nodes[node], config) for node in nodes}

    async def blob_index(reader: ShardReader) -> dict[str, BlobEntry]:
        await reader.check_size()
        return await reader.read_index()

    try:
        found = await run_all((blob_index(reader) for reader in readers.values()), config.max_concurrency)
    except CheckpointNotFoundError:
        return None
    blobs = dict(zip(readers, found))
    plan = plan_partial_load(blobs, nodes, names)
    guard = _Guard()
    try:

        async def read_node(node: str) -> tuple[dict[str, Any], int]:
            entries = {blob: blobs[node][blob] for blob in plan[node]}
            destinations = {blob: session.get(key) for blob, key in plan[node].items()}
            values, _ = await _read_shard(readers[node], entries, False, destinations, guard)
            return values, sum(entry.payload_length for entry in entries.values())

        what = f"partial load of epoch {index.epoch}"
        loaded, stats = await read_nodes(what, plan, read_node, config.max_nodes_in_flight)
    except BaseException:
        await guard.rollback()
        raise
    finally:
        guard.close()
    session.update({plan[node][blob]: value for node, got in loaded.items() for blob, value in got.items()})
    return stats
