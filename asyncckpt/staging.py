"""From workspaces to encoded blobs, and the background saves of ``save_async``.

One encode path serves both saves: :func:`encode_workspaces` encodes every node's blobs
in place (``save``: zero-copy, the caller must not mutate until the upload ends) or,
given a :class:`StagingBuffers`, copies every array, nested ones (a state dict's tensors)
included, into warm buffers first (``save_async``: afterwards nothing refers to the
caller's mutable objects).

:class:`BackgroundSaves` keeps at most one save in flight and makes sure a failure is
seen: by ``await handle``, or else by the next save or ``close``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any

import numpy as np

from . import arrays, codec
from .codec import EncodedBlob

__all__ = ["BackgroundSaves", "SaveHandle", "StagingBuffers", "encode_workspaces", "shards_size_bound"]

log = logging.getLogger("asyncckpt")

Encoded = dict[str, list[EncodedBlob]]


class StagingBuffers:
    """Per node, blob and leaf, a host buffer that receives a copy of the caller's array
    (pinned host memory for a CUDA tensor); kept between snapshots so that the second
    snapshot on copies into warm memory."""

    def __init__(self) -> None:
        self._buffers: dict[str, dict[tuple[str, int], Any]] = {}

    def encode(self, node: str, blobs: Mapping[str, Any]) -> list[EncodedBlob]:
        """:func:`codec.encode_blobs` with every array leaf (top-level arrays, the tensors
        of a state dict) copied into a staging buffer first; small arrays, scalars and
        bytes are packed into new bytes by the encoder, and a mutable byte buffer is
        copied. Afterwards the encoded blobs refer to nothing of the caller's."""
        previous = self._buffers.get(node, {})
        current: dict[tuple[str, int], Any] = {}

        def stage(blob: str, leaf: int, value: Any, kind: str) -> np.ndarray[Any, Any]:
            buffer, view = arrays.stage_copy(value, kind, previous.get((blob, leaf)))
            current[(blob, leaf)] = buffer
            return view

        encoded = codec.encode_blobs(node, blobs, stage)
        self._buffers[node] = current  # buffers of blobs gone (or changed shape) are dropped
        return encoded

    def keep_only(self, nodes: Mapping[str, Any]) -> None:
        for stale in set(self._buffers) - set(nodes):
            del self._buffers[stale]


def encode_workspaces(workspaces: Mapping[str, Mapping[str, Any]], staging: StagingBuffers | None = None) -> Encoded:
    """Validate and encode every node's blobs (a :class:`TypeError` names the first
    unsupported one, before anything is written); a ``Stateful`` value is encoded as its
    ``state_dict()``. With ``staging``, arrays are copied into it first. CPU work: run
    it in a worker thread."""
    encoded: Encoded = {}
    for node, blobs in workspaces.items():
        encoded[node] = staging.encode(node, blobs) if staging is not None else codec.encode_blobs(node, blobs)
    if staging is not None:
        staging.keep_only(workspaces)
    return encoded


def shards_size_bound(encoded: Encoded, *, fingerprinted: bool = False) -> int:
    """An upper bound of the bytes the shards of ``encoded`` take (their sizes, known
    before any byte is written; ``fingerprinted``: by an incremental save)."""
    return sum(
        codec.shard_size_bound(codec.shard_header(node), blobs, fingerprinted=fingerprinted)
        for node, blobs in encoded.items()
    )


class SaveHandle:
    """The pending commit of ``save_async``.

    ``await handle`` (or ``await handle.wait()``) returns once the epoch is committed
    and raises the save's error otherwise. Cancelling a waiter does not cancel the
    save; :meth:`cancel` does.
    """

    def __init__(self, epoch: int, task: asyncio.Task[None], blocking_seconds: float):
        self.epoch = epoch
        #: how long ``save_async`` held the caller (the snapshot), in seconds
        self.blocking_seconds = blocking_seconds
        self._task = task
        self._seen = False
        self._waiters = 0

    def done(self) -> bool:
        return self._task.done()

    def cancel(self) -> bool:
        """Cancel the background save (the epoch is then not committed)."""
        return self._task.cancel()

    def exception(self) -> BaseException | None:
        """The save's failure once it has ended with one; ``None`` otherwise."""
        if not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()

    @property
    def awaited(self) -> bool:
        """Somebody is awaiting the handle, or awaited it to its end: a failure reached them."""
        return self._seen or self._waiters > 0

    def mark_seen(self) -> None:
        self._seen = True

    async def settled(self) -> None:
        """Wait until the save ends, without raising its failure."""
        if not self._task.done():
            await asyncio.wait([self._task])

    async def wait(self) -> None:
        self._waiters += 1
        try:
            await asyncio.shield(self._task)
        finally:
            self._waiters -= 1
            if self._task.done():
                self._seen = True

    def __await__(self) -> Any:
        return self.wait().__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "in flight"
        return f"<SaveHandle epoch={self.epoch} {state}>"


class BackgroundSaves:
    """At most one background save at a time, warm staging buffers, and failures that
    are never lost."""

    def __init__(self) -> None:
        self._inflight: SaveHandle | None = None
        self._failed: list[SaveHandle] = []
        self._free_staging: list[StagingBuffers] = []

    async def snapshot(self, workspaces: Mapping[str, Mapping[str, Any]]) -> tuple[Encoded, StagingBuffers]:
        """Copy and encode the workspaces into staging buffers (in a worker thread).
        Pass the buffers to :meth:`start`, which takes them back when the save ends."""
        staging = self._free_staging.pop() if self._free_staging else StagingBuffers()
        current = {node: dict(blobs) for node, blobs in workspaces.items()}
        try:
            encoded = await asyncio.to_thread(encode_workspaces, current, staging)
        except BaseException:
            self._free_staging.append(staging)
            raise
        return encoded, staging

    def start(
        self, epoch: int, upload: Coroutine[Any, Any, None], staging: StagingBuffers, blocking_seconds: float
    ) -> SaveHandle:
        """Run ``upload`` in the background; its staging buffers come back when it ends."""
        task = asyncio.create_task(upload)
        handle = SaveHandle(epoch, task, blocking_seconds)
        self._inflight = handle

        def finished(_: asyncio.Task[None]) -> None:
            self._free_staging.append(staging)
            failure = handle.exception()
            if failure is not None:
                self._failed.append(handle)
                if not handle.awaited:
                    log.error("background save of epoch %d failed: %s", epoch, failure)

        task.add_done_callback(finished)
        return handle

    async def drain(self, *, raise_failures: bool = True) -> None:
        """Wait for the save in flight; then raise the first failure nobody has seen."""
        handle, self._inflight = self._inflight, None
        if handle is not None:
            await handle.settled()
        if raise_failures:
            self.raise_unseen()

    def raise_unseen(self) -> None:
        unseen = [h for h in self._failed if not h.awaited]
        self._failed.clear()
        if unseen:
            unseen[0].mark_seen()
            failure = unseen[0].exception()
            assert failure is not None
            raise failure

    def release(self) -> None:
        """Drop the staging buffers (the manager is closing)."""
        self._free_staging.clear()
