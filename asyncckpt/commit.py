"""The commit of an epoch: a create-only manifest, agreed on by every process of a job.

An epoch exists once its manifest exists. The manifest is written create-only, so of
two writers racing on one epoch exactly one wins; the loser recognises its own job's
manifest (a lost response to its own write, or another process of its job) as success
and anybody else's as :class:`CheckpointConflictError`.

When a job's nodes live in several processes (each with its own manager and the same
run id), each process uploads its nodes' shards and receipts, then waits until every
node's receipt exists. The job then records its decision, create-only, in one small
object per epoch: ``commit`` (all receipts are there) or ``abort`` (a receipt was still
missing at the deadline). Any process may write the manifest once the job decided to
commit; after ``abort`` none can, so a straggler never commits an epoch the others gave
up on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import layout
from ._tasks import run_all
from .errors import (
    CheckpointConflictError,
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
)
from .manifest import EpochManifest, NodeRecord, read_manifest
from .storage import Storage

__all__ = ["JobCommit", "publish_manifest"]

_COMMIT = b"commit"
_ABORT = b"abort"


async def publish_manifest(storage: Storage, manifest: EpochManifest) -> EpochManifest:
    """Write ``manifest`` create-only; returns the manifest that stands.

    That is ``manifest`` itself, or a manifest of the same job (same run id) that was
    there first. A manifest of another writer raises :class:`CheckpointConflictError`.
    """
    try:
        await storage.put(layout.manifest_key(manifest.epoch), manifest.to_json(), create_only=True)
        return manifest
    except CheckpointConflictError:
        existing = await _standing_manifest(storage, manifest.epoch)
        if existing is None or existing.run_id != manifest.run_id:
            other = existing.writer_id if existing is not None else "an unknown writer"
            raise CheckpointConflictError(f"epoch {manifest.epoch} was committed first by writer {other}") from None
        return existing


async def _standing_manifest(storage: Storage, epoch: int) -> EpochManifest | None:
    try:
        return await read_manifest(storage, epoch)
    except CheckpointError:  # unreadable: not ours to claim
        return None


@dataclass
class _EpochListing:
    has_manifest: bool = False
    has_decision: bool = False
    receipts: dict[str, str] = field(default_factory=dict)  # node -> newest receipt key of this job


@dataclass(frozen=True)
class JobCommit:
    """The multi-process agreement of one job incarnation (``run_id``) on its epochs."""

    storage: Storage
    run_id: str
    nodes: Sequence[str]  # every node of the job, in order
    commit_timeout: float
    db_type: str

    async def agree(
        self, epoch: int, writer_id: str, local: Mapping[str, NodeRecord], started: float
    ) -> tuple[EpochManifest | None, EpochManifest | None]:
        """Wait until every node of the job has a receipt, then agree to commit or abort.

        Returns ``(committed manifest, None)`` when this job's manifest already exists,
        or ``(None, manifest to write)`` once the job decided to commit. At the deadline
        (``started + commit_timeout``, perf-counter seconds) a process decides "abort" and
        raises :class:`CheckpointTimeoutError` naming the missing nodes; so does every
        process that finds the job's decision is "abort". A manifest of another job
        raises :class:`CheckpointConflictError`.
        """
        deadline = started + self.commit_timeout
        decision_key = layout.decision_key(epoch, self.run_id)
        delay = 0.02
        while True:
            listing = await self._listing(epoch)
            if listing.has_manifest:
                existing = await read_manifest(self.storage, epoch)
                if existing.run_id != self.run_id:
                    raise CheckpointConflictError(f"epoch {epoch} was committed first by writer {existing.writer_id}")
                return existing, None
            missing = [n for n in self.nodes if n not in local and n not in listing.receipts]
            decision = await self._read_decision(decision_key) if listing.has_decision else None
            if decision is None and not missing:
                decision = await self._decide(decision_key, _COMMIT)
            elif decision is None and time.perf_counter() >= deadline:
                decision = await self._decide(decision_key, _ABORT)
                if decision == _ABORT:
                    raise CheckpointTimeoutError(
                        f"epoch {epoch} not committed: no receipt from node(s) {missing} within "
                        f"{self.commit_timeout:g} s (their process may have crashed)",
                        missing_nodes=missing,
                    )
            if decision == _ABORT:
                raise CheckpointTimeoutError(
                    f"epoch {epoch} not committed: the job gave up on it at the deadline (node(s) {missing} "
                    "were late); save a later epoch",
                    missing_nodes=missing,
                )
            if decision == _COMMIT and not missing:
                return None, await self._manifest_from_receipts(epoch, writer_id, local, listing.receipts)
            now = time.perf_counter()
            await asyncio.sleep(min(delay, max(deadline - now, 0.0)) if now < deadline else delay)
            delay = min(delay * 1.5, 0.25)

    async def _decide(self, key: str, decision: bytes) -> bytes:
        """Write ``decision`` create-only; returns the decision that stands."""
        try:
            await self.storage.put(key, decision, create_only=True)
            return decision
        except CheckpointConflictError:
            standing = await self._read_decision(key)
            assert standing is not None
            return standing

    async def _read_decision(self, key: str) -> bytes | None:
        try:
            data = await self.storage.get(key)
        except CheckpointNotFoundError:
            return None
        if data not in (_COMMIT, _ABORT):
            raise CheckpointCorruptedError(f"{self.storage.url_of(key)}: not a commit decision")
        return data

    async def _listing(self, epoch: int) -> _EpochListing:
        """One listing of the epoch's directory: manifest, this job's decision, and this
        job's receipt key per node (the newest attempt of each node)."""
        listing = _EpochListing()
        newest: dict[str, tuple[float, str]] = {}
        manifest_key = layout.manifest_key(epoch)
        decision_key = layout.decision_key(epoch, self.run_id)
        async for info in self.storage.list(layout.epoch_dir(epoch)):
            if info.key == manifest_key:
                listing.has_manifest = True
            elif info.key == decision_key:
                listing.has_decision = True
            elif (parsed := layout.parse_receipt_key(info.key)) is not None:
                writer_id, node = parsed
                if layout.split_writer_id(writer_id)[0] == self.run_id:
                    stamp = (info.last_modified or 0.0, info.key)
                    if node not in newest or stamp > newest[node]:
                        newest[node] = stamp
        listing.receipts = {node: key for node, (_, key) in newest.items()}
        return listing

    async def _manifest_from_receipts(
        self, epoch: int, writer_id: str, local: Mapping[str, NodeRecord], receipts: Mapping[str, str]
    ) -> EpochManifest:
        """The epoch's manifest: our local records plus every other node's receipt."""
        records = dict(local)
        remote = [n for n in self.nodes if n not in local]

        async def read(node: str) -> NodeRecord:
            where = self.storage.url_of(receipts[node])
            got_epoch, _, record = NodeRecord.from_receipt(await self.storage.get(receipts[node]), where)
            if got_epoch != epoch or record.node != node or record.receipt != receipts[node]:
                raise CheckpointCorruptedError(f"{where}: receipt does not describe node {node!r} of epoch {epoch}")
            return record

        for node, record in zip(remote, await run_all(read(n) for n in remote)):
            records[node] = record
        return EpochManifest(epoch, writer_id, {n: records[n] for n in self.nodes}, self.db_type)
