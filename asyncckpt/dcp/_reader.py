"""``StorageReader``: DCP's load path from asyncckpt storage, every read checked."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint import storage as dcp_storage
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.futures import Future

from .. import codec
from .._tasks import run_all
from ..config import TransferConfig
from ..errors import CheckpointCorruptedError, CheckpointNotFoundError, ObjectTooShortError
from ..node import fresh_buffer, split_range
from ._format import METADATA_KEY, StoredItem, decode_metadata, narrow, tensor_from
from ._plugin import LocatedPlugin, Location, is_location
from ._session import StorageSession

__all__ = ["StorageReader"]

ReadItem = dcp_planner.ReadItem


class StorageReader(LocatedPlugin, dcp_storage.StorageReader):
    """Reads a checkpoint that :class:`~asyncckpt.dcp.StorageWriter` committed at a location.

    Loads fetch only the items the plan asks for, with ranged reads of their data objects
    (items at most ``config.coalesce_gap`` bytes apart share one request, a request
    reads at most about ``config.range_size`` bytes), at most ``config.max_concurrency``
    at once and ``config.max_bytes_in_flight`` bytes buffered. Every item is checked
    against its CRC32C before DCP sees it: damage is
    :class:`~asyncckpt.CheckpointCorruptedError` naming the object and the item, a
    missing object :class:`~asyncckpt.CheckpointNotFoundError`. (DCP 2.13 reports a
    failure of :meth:`read_metadata` during ``dcp.load`` as an ``AssertionError`` carrying
    its message; called directly, it raises the error itself.)

    Each plugin drives its storage from a private event loop thread; it is closed at the
    end of every load (and by :meth:`close`), and opened again by the next.
    """

    def __init__(
        self,
        location: Location,
        *,
        storage_options: Mapping[str, Any] | None = None,
        config: TransferConfig | None = None,
    ) -> None:
        super().__init__(location, storage_options=storage_options, config=config)
        self._load_id = uuid.uuid4().hex
        self._items: dict[MetadataIndex, StoredItem] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new load, from ``checkpoint_id`` when given (a location URL or a path)."""
        if checkpoint_id:
            self._retarget(checkpoint_id)
        self._items = {}
        self._load_id = uuid.uuid4().hex

    # ``**options``, not ``**kwargs``: DCP then does not retry with rank-local metadata,
    # which asyncckpt never writes
    def read_metadata(self, *args: Any, **options: Any) -> Metadata:
        """The committed checkpoint's metadata, checked (CRC32C and every item record)."""
        metadata = self._run(_read_metadata)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self._load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not isinstance(metadata.storage_data, dict):
            raise CheckpointCorruptedError(f"{self._url}: the metadata holds no item records")
        self._items = dict(metadata.storage_data)

    def prepare_local_plan(self, plan: dcp_planner.LoadPlan) -> dcp_planner.LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[dcp_planner.LoadPlan]) -> list[dcp_planner.LoadPlan]:
        return plans

    def read_data(self, plan: dcp_planner.LoadPlan, planner: dcp_planner.LoadPlanner) -> Future[None]:
        """Read, check and hand over this rank's items; the returned future is already done."""
        wanted = []
        for request in plan.items:
            item = self._items.get(request.storage_index)
            if item is None:
                raise CheckpointCorruptedError(f"{self._url}: the metadata has no record of {request.storage_index}")
            wanted.append((request, item))
        try:
            self._run(lambda session: _read_items(session, wanted, planner, self._config))
        finally:
            self.close()  # a load's last call
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` is a location asyncckpt accepts."""
        return is_location(checkpoint_id)


async def _read_metadata(session: StorageSession) -> Metadata:
    storage = session.storage
    where = storage.url_of(METADATA_KEY)
    try:
        data = await storage.get(METADATA_KEY)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(
            f"no DCP checkpoint is committed at {storage.url} ({where} does not exist)"
        ) from None
    return await asyncio.to_thread(decode_metadata, data, where)


@dataclass
class _Batch:
    """One ranged read: bytes ``[start, end)`` of a data object and the requests in them."""

    key: str
    start: int
    end: int
    requests: list[tuple[ReadItem, StoredItem]]


def _batches(wanted: Sequence[tuple[ReadItem, StoredItem]], gap: int, size: int) -> list[_Batch]:
    """The wanted items as ranged reads: per object in offset order, an item joins the
    previous read when at most ``gap`` bytes lie between them and the read stays within
    ``size`` bytes (an item larger than that is one read of its own)."""
    by_key: dict[str, list[tuple[ReadItem, StoredItem]]] = {}
    for request, item in wanted:
        by_key.setdefault(item.key, []).append((request, item))
    batches: list[_Batch] = []
    for key, requests in sorted(by_key.items()):
        requests.sort(key=lambda pair: pair[1].offset)
        current: _Batch | None = None
        for request, item in requests:
            end = item.offset + item.length
            if (
                current is not None
                and item.offset <= current.end + gap
                and max(end, current.end) - current.start <= size
            ):
                current.end = max(current.end, end)
                current.requests.append((request, item))
            else:
                current = _Batch(key, item.offset, end, [(request, item)])
                batches.append(current)
    return batches


async def _read_items(
    session: StorageSession,
    wanted: Sequence[tuple[ReadItem, StoredItem]],
    planner: dcp_planner.LoadPlanner,
    config: TransferConfig,
) -> None:
    planner_lock = threading.Lock()  # DCP's planners are not made for concurrent calls

    async def read(batch: _Batch) -> None:
        assert session.budget is not None
        length = batch.end - batch.start
        await session.budget.acquire(length)
        try:
            buffer = await _fetch(session, batch, config.range_size)
            await asyncio.to_thread(_deliver, session.storage.url_of(batch.key), buffer, batch, planner, planner_lock)
        finally:
            session.budget.release(length)

    batches = _batches(wanted, config.coalesce_gap, config.range_size)
    await run_all((read(batch) for batch in batches), config.max_concurrency)


async def _fetch(session: StorageSession, batch: _Batch, range_size: int) -> memoryview:
    """The batch's bytes in a fresh writable buffer (large ones in parallel pieces; its
    pages faulted in off the loop, not zero-filled on it)."""
    storage = session.storage
    buffer = await fresh_buffer(batch.end - batch.start)
    pieces = split_range(batch.start, batch.end, range_size)
    try:
        await run_all(
            storage.read_into(batch.key, buffer[lo - batch.start : hi - batch.start], lo) for lo, hi in pieces
        )
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"{storage.url_of(batch.key)}: data object is missing") from None
    except ObjectTooShortError:
        raise CheckpointCorruptedError(
            f"{storage.url_of(batch.key)}: data object ends before byte {batch.end} (truncated)"
        ) from None
    return buffer


def _deliver(
    where: str, view: memoryview, batch: _Batch, planner: dcp_planner.LoadPlanner, lock: threading.Lock
) -> None:
    """Check every item of ``batch`` against its CRC32C, then hand each request to the
    planner (CPU work, in a worker thread)."""
    checked: set[StoredItem] = set()
    for request, item in batch.requests:
        at = item.offset - batch.start
        if item not in checked:
            if codec.checksum(view[at : at + item.length]) != item.crc32c:
                raise CheckpointCorruptedError(
                    f"{where}, item {request.storage_index.fqn!r} (bytes {item.offset}-{item.offset + item.length}): "
                    "CRC32C mismatch (stored bytes are corrupted)"
                )
            checked.add(item)
        if request.type == dcp_planner.LoadItemType.BYTE_IO:
            with lock:
                planner.load_bytes(request, io.BytesIO(view[at : at + item.length].tobytes()))
            continue
        if item.dtype is None:
            raise CheckpointCorruptedError(
                f"{where}, item {request.storage_index.fqn!r}: stored as bytes, not a tensor"
            )
        stored = narrow(tensor_from(view, at, item), request.storage_offsets, request.lengths)
        with lock:
            target = planner.resolve_tensor(request).detach()
        if target.size() != stored.size():
            raise CheckpointCorruptedError(
                f"{where}, item {request.storage_index.fqn!r}: the plan reads a {tuple(stored.size())} box "
                f"into a {tuple(target.size())} tensor"
            )
        target.copy_(stored)
        with lock:
            planner.commit_tensor(request, target)
