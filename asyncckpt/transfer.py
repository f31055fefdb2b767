"""Every local node at once: the per-node fan-out of saves and loads.

:mod:`.node` moves one node's shard; this module runs one such transfer per node,
concurrently and bounded, and turns the nodes' failures into one error that names
every failed node (``exc.failures`` maps each to its cause).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from . import layout
from ._tasks import settle_all, shielded
from .codec import BlobEntry, EncodedBlob
from .config import TransferConfig
from .errors import CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError, combine_node_failures
from .manifest import EpochIndex, EpochRef, NodeRecord, NodeStats
from .node import PriorBlobs, ShardReader, ShardWriter
from .storage import ByteBudget, Storage, collect_request_stats

__all__ = ["Reuse", "discard", "plan_partial_load", "read_nodes", "upload_nodes"]

log = logging.getLogger("asyncckpt")


Cleanup = Callable[[list[str]], Awaitable[None]]


@dataclass(frozen=True)
class Reuse:
    """An incremental save (``TransferConfig.incremental``): every blob is fingerprinted,
    and those unchanged since ``base`` (a committed epoch in the same storage, if any)
    point at its objects instead of being uploaded again."""

    config: TransferConfig
    base: EpochIndex | None = None

    async def prior(self, storage: Storage, node: str) -> PriorBlobs | None:
        """``node``'s blobs in the base, or ``None`` (no base, the node is not in it, or
        its shard can no longer be read: then every blob is uploaded)."""
        if self.base is None or node not in self.base.nodes:
            return None
        reader = ShardReader(storage, node, self.base.nodes[node], self.config)
        try:
            return await reader.read_prior(EpochRef(self.base.epoch, self.base.writer_id))
        except (CheckpointNotFoundError, CheckpointCorruptedError) as exc:
            log.info(
                "node %r: every blob is uploaded, its shard of epoch %d is unreadable: %s", node, self.base.epoch, exc
            )
            return None


async def upload_nodes(
    storage: Storage,
    budget: ByteBudget,
    epoch: int,
    writer_id: str,
    encoded: Mapping[str, list[EncodedBlob]],
    max_nodes: int,
    *,
    token: str | None = None,
    cleanup: Cleanup | None = None,
    reuse: Reuse | None = None,
) -> dict[str, NodeRecord]:
    """Upload every node's shard for writer ``writer_id`` of ``epoch``; returns each
    node's record, in the order of ``encoded``. With ``token`` (a process of a
    multi-process job) the shards go under it and each gets a receipt. With ``reuse``
    the save is incremental (:class:`Reuse`).

    On any failure one error names every failed node, after ``cleanup`` (default:
    :func:`discard`) was handed the keys this call wrote (shielded from cancellation).
    """
    written: list[str] = []

    async def save_node(node: str) -> NodeRecord:
        shard = layout.shard_key(epoch, writer_id, node, token)
        receipt = (layout.receipt_key(epoch, writer_id, token, node), epoch, writer_id) if token is not None else None
        prior = await reuse.prior(storage, node) if reuse is not None else None
        written.append(shard)
        if receipt is not None:
            written.append(receipt[0])
        writer = ShardWriter(storage, node, budget, incremental=reuse is not None)
        return await writer.write(shard, encoded[node], receipt=receipt, prior=prior)

    try:
        records, failures = await settle_all({node: save_node(node) for node in encoded}, max_nodes)
        if failures:
            raise combine_node_failures(f"save of epoch {epoch}", failures)
    except BaseException:
        await shielded(cleanup(written) if cleanup is not None else discard(storage, written))
        raise
    return {node: records[node] for node in encoded}


async def discard(storage: Storage, keys: list[str]) -> None:
    """Best-effort removal of an uncommitted attempt's objects (gc catches the rest)."""
    if not keys:
        return
    try:
        await storage.delete(keys)
    except CheckpointError as exc:
        log.warning("could not remove %d object(s) of a failed save: %s", len(keys), exc)


T = TypeVar("T")


async def read_nodes(
    what: str, nodes: Iterable[str], read_node: Callable[[str], Awaitable[tuple[T, int]]], max_nodes: int
) -> tuple[dict[str, T], dict[str, NodeStats]]:
    """Run ``read_node`` (returning a node's values and the bytes it read) for every
    node, concurrently: every node's values and stats, or one error naming every
    failed node (``what`` says what failed)."""

    async def timed(node: str) -> tuple[T, NodeStats]:
        started = time.perf_counter()
        with collect_request_stats() as counted:
            values, nbytes = await read_node(node)
        return values, NodeStats(time.perf_counter() - started, nbytes, 1, counted.requests, counted.retries)

    results, failures = await settle_all({n: timed(n) for n in nodes}, max_nodes)
    if failures:
        raise combine_node_failures(what, failures)
    return {n: values for n, (values, _) in results.items()}, {n: stats for n, (_, stats) in results.items()}


def plan_partial_load(
    blobs: Mapping[str, Mapping[str, BlobEntry]], nodes: Sequence[str], names: Sequence[str]
) -> dict[str, dict[str, str]]:
    """node -> {blob name: session key} for the requested names, given each node's blob
    index. A name is a blob of one of ``nodes`` or ``"node/blob"``; names found nowhere
    are left out; a plain name held by several listed nodes is a :class:`ValueError`."""
    plan: dict[str, dict[str, str]] = {}
    for name in names:
        hits = [(node, name) for node in nodes if name in blobs[node]]
        if not hits and "/" in name:
            node, _, blob = name.partition("/")
            if node in nodes and blob in blobs[node]:
                hits = [(node, blob)]
        if len(hits) > 1:
            raise ValueError(
                f"blob {name!r} exists on nodes {[n for n, _ in hits]}; name it as 'node/{name}' to pick one"
            )
        for node, blob in hits:
            plan.setdefault(node, {})[blob] = name
    return plan
