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
from typing import Any

from . import layout
from ._tasks import run_all, settle_all, shielded
from .codec import BlobEntry, EncodedBlob
from .config import TransferConfig
from .errors import CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError, combine_node_failures
from .manifest import EpochIndex, EpochRef, NodeRecord, NodeStats
from .node import PriorBlobs, ShardReader, ShardWriter
from .storage import ByteBudget, Storage, collect_request_stats

__all__ = ["Reuse", "discard", "load_partial", "load_whole", "plan_partial_load", "read_nodes", "upload_nodes"]

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


ReadNode = Callable[[str], Awaitable[tuple[dict[str, Any], int]]]


async def read_nodes(
    what: str, nodes: Iterable[str], read_node: ReadNode, max_nodes: int
) -> tuple[dict[str, dict[str, Any]], dict[str, NodeStats]]:
    """Run ``read_node`` (returning a node's values and the bytes it read) for every
    node, concurrently: every node's values and stats, or one error naming every
    failed node (``what`` says what failed)."""

    async def timed(node: str) -> tuple[dict[str, Any], NodeStats]:
        started = time.perf_counter()
        with collect_request_stats() as counted:
            values, nbytes = await read_node(node)
        return values, NodeStats(time.perf_counter() - started, nbytes, 1, counted.requests, counted.retries)

    results, failures = await settle_all({n: timed(n) for n in nodes}, max_nodes)
    if failures:
        raise combine_node_failures(what, failures)
    return {n: values for n, (values, _) in results.items()}, {n: stats for n, (_, stats) in results.items()}


async def load_whole(
    storage: Storage, config: TransferConfig, index: EpochIndex, nodes: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, NodeStats]]:
    """Every blob of every one of ``nodes``, verified, and per-node stats; one error
    naming every failed node otherwise."""

    async def read_node(node: str) -> tuple[dict[str, Any], int]:
        record = index.nodes[node]
        return await ShardReader(storage, node, record, config).read_all(), record.size + record.stats.reused_bytes

    return await read_nodes(f"load of epoch {index.epoch}", nodes, read_node, config.max_nodes_in_flight)


async def load_partial(
    storage: Storage, config: TransferConfig, index: EpochIndex, nodes: Sequence[str], names: Sequence[str]
) -> tuple[dict[str, Any], dict[str, NodeStats]] | None:
    """The named blobs of ``nodes`` (see :func:`plan_partial_load`), keyed as named, and
    per-node stats; ``None`` when a node's shard object is missing. Each shard's size is
    checked (HEAD) and its blob index read from its tail before any blob is fetched."""
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

    async def read_node(node: str) -> tuple[dict[str, Any], int]:
        wanted = {blob: blobs[node][blob] for blob in plan[node]}
        return await readers[node].read_blobs(wanted), sum(entry.length for entry in wanted.values())

    what = f"partial load of epoch {index.epoch}"
    values, stats = await read_nodes(what, plan, read_node, config.max_nodes_in_flight)
    return {plan[node][blob]: value for node, got in values.items() for blob, value in got.items()}, stats


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
