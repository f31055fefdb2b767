"""``StorageWriter``: DCP's save path onto asyncckpt storage, with a create-only commit."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint import storage as dcp_storage
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.futures import Future

from .. import codec
from .._tasks import shielded
from ..config import TransferConfig
from ..errors import CheckpointConflictError, CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError
from ..storage import Storage
from ._format import ALIGN, DATA_PREFIX, METADATA_KEY, StoredItem, data_key, decode_metadata, encode_metadata
from ._format import tensor_payload as _tensor_payload
from ._plugin import LocatedPlugin, Location, is_location
from ._session import StorageSession

__all__ = ["StorageWriter"]

_log = logging.getLogger(__name__)

#: A data object holds at most about this many multipart parts of items (S3 allows 10,000).
_PARTS_PER_OBJECT = 1000
_THREAD_MIN = 1 << 20  # payloads at least this big are checksummed off the event loop

WriteItem = dcp_planner.WriteItem
WriteResult = dcp_storage.WriteResult


class StorageWriter(LocatedPlugin, dcp_storage.StorageWriter):
    """Writes a ``torch.distributed.checkpoint`` checkpoint to a location (``s3://bucket/prefix``,
    ``file:///dir`` or a path, ``memory://name/prefix``): a directory of one checkpoint.

    ``storage_options`` are the location's (S3's endpoint and credentials...), ``config``
    its :class:`~asyncckpt.TransferConfig`. Every rank writes its items into data objects
    of its own under a key new for each attempt; the coordinator commits DCP's metadata
    last and create-only. A location is written once: a save to a location that holds a
    committed checkpoint raises :class:`~asyncckpt.CheckpointConflictError` before any
    data is written (DCP reports it inside its ``CheckpointException``), and of two racing
    saves exactly one commits. Data of a save that fails is removed where its outcome is
    known; leftovers of ranks that never learnt of the failure go at the next commit.

    Each plugin drives its storage from a private event loop thread; it is closed at the
    end of every save (and by :meth:`close`), and opened again by the next.
    """

    def __init__(
        self,
        location: Location,
        *,
        storage_options: Mapping[str, Any] | None = None,
        config: TransferConfig | None = None,
    ) -> None:
        super().__init__(location, storage_options=storage_options, config=config)
        self._save_id = uuid.uuid4().hex
        self._rank = 0
        self._is_coordinator = True

    # -- DCP's calls, in their order ----------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new save, at ``checkpoint_id`` when given (a location URL or a path)."""
        if checkpoint_id:
            self._retarget(checkpoint_id)
        self._save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise ValueError(
                "asyncckpt.dcp.StorageWriter commits one metadata object per checkpoint; "
                "use_collectives=False (rank-local metadata) is not supported"
            )
        self._is_coordinator = is_coordinator
        self._rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan: dcp_planner.SavePlan) -> dcp_planner.SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[dcp_planner.SavePlan]) -> list[dcp_planner.SavePlan]:
        """The coordinator refuses a location that holds a committed checkpoint, before
        any rank writes."""
        self._run(_refuse_committed)
        return plans

    def write_data(self, plan: dcp_planner.SavePlan, planner: dcp_planner.SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items; the returned future is already done."""
        try:
            results = self._run(lambda session: _write_items(session, plan.items, planner, self._rank, self._config))
        finally:
            if not self._is_coordinator:  # finish() is the coordinator's last call, this is ours
                self.close()
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit: write the metadata create-only, then remove data objects no committed
        item names (leftovers of failed attempts)."""
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = {result.index: result.storage_data for rank in results for result in rank}
        metadata.storage_meta = self.storage_meta()
        try:
            self._run(lambda session: _commit(session, metadata))
        finally:
            self.close()

    def storage_meta(self) -> StorageMeta:
        return StorageMeta(checkpoint_id=self._url, save_id=self._save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` is a location asyncckpt accepts."""
        return is_location(checkpoint_id)


async def _refuse_committed(session: StorageSession) -> None:
    storage = session.storage
    if await storage.head(METADATA_KEY) is not None:
        raise CheckpointConflictError(
            f"{storage.url_of(METADATA_KEY)}: a checkpoint is already committed at {storage.url}; "
            "a DCP checkpoint location is written once, save to a new one"
        )


# -------------------------------------------------------------------------- write_data


def _planned_size(item: WriteItem) -> int:
    """A tensor item's bytes as planned (its chunk), 0 for ``BYTE_IO``."""
    if item.tensor_data is None:
        return 0
    count = 1
    for n in item.tensor_data.chunk.sizes:
        count *= n
    return count * item.tensor_data.properties.dtype.itemsize


def _padded(size: int) -> int:
    return size + ALIGN - 1


def _grouped(sized: Sequence[tuple[WriteItem, int]], cap: int) -> list[list[tuple[WriteItem, int]]]:
    """Consecutive items in groups of at most ``cap`` (padded) bytes; a larger item alone."""
    groups: list[list[tuple[WriteItem, int]]] = []
    total = 0
    for entry in sized:
        size = _padded(entry[1])
        if not groups or (groups[-1] and total + size > cap):
            groups.append([])
            total = 0
        groups[-1].append(entry)
        total += size
    return groups


async def _write_items(
    session: StorageSession,
    items: Sequence[WriteItem],
    planner: dcp_planner.SavePlanner,
    rank: int,
    config: TransferConfig,
) -> list[WriteResult]:
    """Write ``items`` into new data objects (one, unless they are many GiB); returns
    their results. Objects of a failed call are deleted."""
    storage = session.storage
    byte_items = [item for item in items if item.type == dcp_planner.WriteItemType.BYTE_IO]
    # BYTE_IO payloads are small pickles DCP makes: resolved first, their sizes plan the objects
    payloads = await asyncio.to_thread(lambda: {id(item): _resolve_bytes(planner, item) for item in byte_items})
    sized = [(item, len(payloads[id(item)])) for item in byte_items]
    sized += [(item, _planned_size(item)) for item in items if item.type != dcp_planner.WriteItemType.BYTE_IO]
    token = uuid.uuid4().hex[:16]
    written: list[str] = []
    results: list[WriteResult] = []
    try:
        for part, group in enumerate(_grouped(sized, config.part_size * _PARTS_PER_OBJECT)):
            key = data_key(token, rank, part)
            results += await _write_object(session, key, group, payloads, planner)
            written.append(key)
    except BaseException:
        await shielded(_delete_quietly(storage, written))
        raise
    return results


async def _write_object(
    session: StorageSession,
    key: str,
    group: Sequence[tuple[WriteItem, int]],
    payloads: Mapping[int, bytes],
    planner: dcp_planner.SavePlanner,
) -> list[WriteResult]:
    storage = session.storage
    bound = sum(_padded(size) for _, size in group)
    results = []
    async with storage.writer(key, budget=session.budget, size_hint=bound) as writer:
        offset = 0
        for item, planned in group:
            where = f"{storage.url_of(key)}, item {item.index.fqn!r}"
            if offset % ALIGN:
                pad = ALIGN - offset % ALIGN
                await writer.write(bytes(pad))
                offset += pad
            dtype: str | None = None
            shape: tuple[int, ...] | None = None
            if id(item) in payloads:
                view = memoryview(payloads[id(item)])
                crc = (
                    codec.checksum(view) if view.nbytes < _THREAD_MIN else await asyncio.to_thread(codec.checksum, view)
                )
            else:
                view, dtype, shape, crc = await asyncio.to_thread(_resolve_tensor, planner, item, where)
                if view.nbytes != planned:
                    raise ValueError(f"{where}: the planner resolved {view.nbytes} bytes, its plan says {planned}")
            await writer.write(view)
            stored = StoredItem(key, offset, view.nbytes, crc, dtype, shape)
            results.append(WriteResult(index=item.index, size_in_bytes=view.nbytes, storage_data=stored))
            offset += view.nbytes
        await writer.commit()
    return results


def _resolve_bytes(planner: dcp_planner.SavePlanner, item: WriteItem) -> bytes:
    data = planner.resolve_data(item)
    if not isinstance(data, io.BytesIO):
        raise TypeError(f"item {item.index.fqn!r}: the planner resolved a BYTE_IO item to {type(data).__name__}")
    return data.getvalue()


def _resolve_tensor(
    planner: dcp_planner.SavePlanner, item: WriteItem, where: str
) -> tuple[memoryview, str, tuple[int, ...], int]:
    """A tensor item's bytes, dtype, shape and CRC32C (CPU work, in a worker thread)."""
    data = planner.resolve_data(item)
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{where}: the planner resolved a tensor item to {type(data).__name__}")
    view, dtype, shape = _tensor_payload(data, where)
    return view, dtype, shape, codec.checksum(view)


# ------------------------------------------------------------------------------ commit


async def _commit(session: StorageSession, metadata: Metadata) -> None:
    storage = session.storage
    where = storage.url_of(METADATA_KEY)
    ours = {item.key for item in metadata.storage_data.values()}
    data = await asyncio.to_thread(encode_metadata, metadata)
    try:
        await storage.put(METADATA_KEY, data, create_only=True)
    except CheckpointConflictError:
        if not await _committed_by(storage, ours):
            await shielded(_delete_quietly(storage, ours))
            raise CheckpointConflictError(
                f"{where}: another save committed a checkpoint at {storage.url} first; "
                "this save's data was removed, save to a new location"
            ) from None
    await _sweep(storage, ours)


async def _committed_by(storage: Storage, keys: set[str]) -> bool:
    """Whether the committed metadata names any of ``keys`` (our own commit, whose
    response was lost and retried)."""
    try:
        standing = decode_metadata(await storage.get(METADATA_KEY), storage.url_of(METADATA_KEY))
    except (CheckpointNotFoundError, CheckpointCorruptedError):
        return False
    return any(item.key in keys for item in standing.storage_data.values())


async def _sweep(storage: Storage, keep: set[str]) -> None:
    """Delete data objects that no committed item names (best effort: a failure is logged)."""
    try:
        stale = [info.key async for info in storage.list(DATA_PREFIX) if info.key not in keep]
        await storage.delete(stale)
    except CheckpointError as exc:
        _log.warning("could not remove stale data objects at %s: %s", storage.url, exc)


async def _delete_quietly(storage: Storage, keys: Sequence[str] | set[str]) -> None:
    """Delete a failed save's objects (best effort: a failure is logged)."""
    try:
        await storage.delete(sorted(keys))
    except CheckpointError as exc:
        _log.warning("could not remove the data objects of a failed save at %s: %s", storage.url, exc)
