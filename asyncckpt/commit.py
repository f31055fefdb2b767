"""The commit protocol: how an attempt becomes an epoch, and how gc may claim one.

An epoch exists once its manifest exists. Every save attempt is a *writer* (see
:mod:`.layout`) that ends in two create-only writes:

1. its **decision** (``<writer>.decision``): ``commit``, carrying the manifest to publish;
2. the **manifest** (``manifest.json``), a copy of that decision's manifest.

Whoever else touches an attempt's objects must first win the same decision key:
garbage collection writes ``abandoned`` there (create-only) before it deletes anything
of a writer, and a multi-process job that gives up writes ``abort``. Exactly one verdict
per writer stands, so:

* a writer whose attempt gc claimed cannot commit (its ``commit`` loses; the save says so);
* gc never deletes a writer that decided to commit: it completes the commit instead
  (publishes the decision's manifest), so no manifest ever names a deleted object;
* of several writers racing for one epoch, the first manifest wins; a writer succeeds
  only if the manifest that stands is its own (a lost response to its own write, or
  gc completing it for it), otherwise :class:`CheckpointConflictError`.

No step depends on clocks: gc's grace period only spares young attempts the work of
being claimed, it is not what keeps them safe.

An incremental save points at objects of its *base*, a committed epoch. Once its index
(or, in a job, every receipt) names those objects, and before it decides, it checks that
the base is still committed by the same writer (:func:`check_bases`); a delete uncommits
an epoch first and only then reads which objects the indexes and receipts name
(:mod:`.housekeeping`). So either the delete sees the save's pointers and keeps the
objects, or the save sees its base gone and fails (DESIGN.md §3 has the argument).

Several processes of one job share one writer (the run id). Each uploads its nodes'
shards and a receipt per node; the process holding the job's first node is the
*committer*: it lists the writer's receipts until all are there, writes the index and
decides ``commit``. The others wait on the one small decision object. A process whose
upload fails decides ``abort`` at once; at the deadline anyone does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import layout
from ._tasks import run_all
from .errors import (
    CheckpointConflictError,
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
)
from .manifest import Decision, EpochIndex, EpochManifest, EpochRef, NodeRecord, read_manifest
from .storage import Storage

__all__ = [
    "JobCommit",
    "check_bases",
    "decide",
    "decide_commit",
    "is_committed",
    "publish_manifest",
    "read_decision",
    "refused",
    "stage_commit",
]

_POLL_FIRST = 0.02
_POLL_MAX = 0.25


async def decide(storage: Storage, decision: Decision) -> Decision:
    """Write ``decision`` create-only; returns the decision that stands (ours, or the
    one written first)."""
    try:
        await storage.put(layout.decision_key(decision.epoch, decision.writer_id), decision.to_json(), create_only=True)
        return decision
    except CheckpointConflictError:
        standing = await read_decision(storage, decision.epoch, decision.writer_id)
        if standing is None:
            raise CheckpointConflictError(
                f"the decision of writer {decision.writer_id} on epoch {decision.epoch} vanished while it was read"
            ) from None
        return standing


async def decide_commit(storage: Storage, manifest: EpochManifest) -> None:
    """Decide to commit ``manifest`` (its writer's verdict, create-only); an attempt that
    gc claimed first raises :class:`CheckpointConflictError` saying so."""
    standing = await decide(storage, Decision(manifest.epoch, manifest.writer_id, "commit", manifest))
    if standing.manifest is None:
        raise refused(standing)


async def read_decision(storage: Storage, epoch: int, writer_id: str) -> Decision | None:
    key = layout.decision_key(epoch, writer_id)
    try:
        data = await storage.get(key)
    except CheckpointNotFoundError:
        return None
    return Decision.from_json(data, storage.url_of(key), epoch=epoch, writer_id=writer_id)


async def publish_manifest(storage: Storage, manifest: EpochManifest) -> EpochManifest:
    """Write ``manifest`` create-only; returns it. If a manifest is there first, it is
    returned when it is the same writer's, else :class:`CheckpointConflictError`."""
    try:
        await storage.put(layout.manifest_key(manifest.epoch), manifest.to_json(), create_only=True)
        return manifest
    except CheckpointConflictError:
        try:
            existing: EpochManifest | None = await read_manifest(storage, manifest.epoch)
        except CheckpointError:  # unreadable: not ours to claim
            existing = None
        if existing is None or existing.writer_id != manifest.writer_id:
            other = existing.writer_id if existing is not None else "an unknown writer"
            raise CheckpointConflictError(f"epoch {manifest.epoch} was committed first by writer {other}") from None
        return existing


async def stage_commit(
    storage: Storage, index: EpochIndex, db_type: str, metrics: Mapping[str, float] | None = None
) -> EpochManifest:
    """Write the index of a writer's attempt, then check its bases (:func:`check_bases`);
    returns the manifest that commits it."""
    key = layout.index_key(index.epoch, index.writer_id)
    data = index.to_json()
    await storage.put(key, data)
    await check_bases(storage, index)
    return EpochManifest.for_index(index, key, data, db_type, metrics)


async def is_committed(storage: Storage, epoch: EpochRef) -> bool:
    """Whether ``epoch.epoch`` stands committed by ``epoch.writer_id`` (its manifest, one GET)."""
    try:
        manifest = await read_manifest(storage, epoch.epoch)
    except (CheckpointNotFoundError, CheckpointCorruptedError):
        return False
    return manifest.writer_id == epoch.writer_id


async def check_bases(storage: Storage, index: EpochIndex) -> None:
    """The epochs whose objects ``index``'s records point at (their ``base``) are all still
    committed: called once the index (or every receipt) naming those objects is stored,
    before the commit decision. :class:`CheckpointConflictError` otherwise: a delete of
    the base may be removing them, and nothing of this attempt may commit."""
    bases: set[EpochRef] = set()
    for node, record in index.nodes.items():
        if record.refs:
            if record.base is None:
                raise CheckpointCorruptedError(f"epoch {index.epoch}: node {node!r} points at objects of no base epoch")
            bases.add(record.base)
    for base in sorted(bases, key=lambda b: (b.epoch, b.writer_id)):
        if not await is_committed(storage, base):
            raise CheckpointConflictError(
                f"epoch {index.epoch} not committed: epoch {base.epoch}, whose stored blobs this save reuses, was "
                "deleted while it saved; save again (the next attempt uploads every blob)"
            )


def refused(decision: Decision) -> CheckpointError:
    """The error of a writer whose attempt ended with ``decision`` other than commit."""
    where = f"epoch {decision.epoch} not committed"
    if decision.verdict == "abandoned":
        return CheckpointConflictError(
            f"{where}: gc claimed this save as abandoned before it could commit (gc's grace period is shorter "
            "than this save took, or clocks disagree); nothing was committed, save again"
        )
    if not decision.missing:  # the job gave up for another reason than a missing node
        return CheckpointConflictError(f"{where}: {decision.reason}")
    return CheckpointTimeoutError(f"{where}: {decision.reason}", missing_nodes=list(decision.missing))


@dataclass(frozen=True)
class JobCommit:
    """The commit of one epoch by the processes of one job incarnation (``run_id``).

    Construct it with every node of the job (in order), this process's attempt
    ``token`` and the perf-counter ``deadline``. :meth:`agree` returns the manifest
    to publish once the job decided to commit; :meth:`give_up` records abort.
    """

    storage: Storage
    epoch: int
    run_id: str
    token: str
    nodes: Sequence[str]
    deadline: float
    commit_timeout: float

    @property
    def writer_id(self) -> str:
        return self.run_id

    async def agree(
        self, local: Mapping[str, NodeRecord], db_type: str, metrics: Mapping[str, float] | None = None
    ) -> EpochManifest:
        if self.nodes[0] in local:
            return await self._collect(local, db_type, metrics)
        return await self._await_decision()

    async def give_up(self, reason: str, missing: Sequence[str]) -> Decision:
        """Decide ``abort``; returns the decision that stands."""
        return await decide(
            self.storage, Decision(self.epoch, self.writer_id, "abort", reason=reason, missing=tuple(missing))
        )

    async def _collect(
        self, local: Mapping[str, NodeRecord], db_type: str, metrics: Mapping[str, float] | None
    ) -> EpochManifest:
        """The committer: wait for every receipt, then write the index and decide."""
        delay = _POLL_FIRST
        while True:
            decision, receipts = await self._listing()
            if decision is not None:  # another process gave up, or gc claimed us
                raise (
                    refused(decision)
                    if decision.verdict != "commit"
                    else CheckpointConflictError(
                        f"epoch {self.epoch}: a second committer decided for job {self.run_id}"
                    )
                )
            twice = {node: keys for node, keys in receipts.items() if len(keys) > 1}
            if twice:
                node, keys = sorted(twice.items())[0]
                standing = await self.give_up(
                    f"node {node!r} was saved by {len(keys)} processes of run {self.run_id} ({', '.join(keys)}): "
                    "two jobs share a run id",
                    [],
                )
                raise refused(standing) if standing.verdict != "abort" else CheckpointConflictError(standing.reason)
            missing = [n for n in self.nodes if n not in local and n not in receipts]
            if not missing:
                records = dict(local)
                remote = [n for n in self.nodes if n not in local]
                for node, record in zip(
                    remote, await run_all((self._read_receipt(n, receipts[n][0]) for n in remote), 16)
                ):
                    records[node] = record
                index = EpochIndex(self.epoch, self.writer_id, {n: records[n] for n in self.nodes})
                try:
                    manifest = await stage_commit(self.storage, index, db_type, metrics)
                except CheckpointConflictError as exc:  # a base was deleted: the other processes stop too
                    standing = await self.give_up(str(exc), [])
                    if standing.verdict != "abort":
                        raise refused(standing) from None
                    raise
                standing = await decide(self.storage, Decision(self.epoch, self.writer_id, "commit", manifest))
                if standing.manifest is None:
                    raise refused(standing)
                return standing.manifest
            if time.perf_counter() >= self.deadline:
                standing = await self.give_up(self._late(missing), missing)
                raise (
                    refused(standing)
                    if standing.manifest is None
                    else CheckpointConflictError(
                        f"epoch {self.epoch}: job {self.run_id} decided to commit without this committer"
                    )
                )
            delay = await self._pause(delay)

    async def _await_decision(self) -> EpochManifest:
        """Every other process: wait on the decision object."""
        delay = _POLL_FIRST
        while True:
            decision = await read_decision(self.storage, self.epoch, self.writer_id)
            if decision is None and time.perf_counter() >= self.deadline:
                _, receipts = await self._listing()
                missing = [n for n in self.nodes if n not in receipts]
                decision = await self.give_up(self._late(missing), missing)
            if decision is not None:
                if decision.manifest is None:
                    raise refused(decision)
                return decision.manifest
            delay = await self._pause(delay)

    def _late(self, missing: Sequence[str]) -> str:
        return (
            f"no receipt from node(s) {list(missing)} within {self.commit_timeout:g} s (their process may have crashed)"
        )

    async def _pause(self, delay: float) -> float:
        now = time.perf_counter()
        await asyncio.sleep(min(delay, max(self.deadline - now, 0.0)) if now < self.deadline else delay)
        return min(delay * 1.5, _POLL_MAX)

    async def _listing(self) -> tuple[Decision | None, dict[str, list[str]]]:
        """One listing of the writer's objects: its decision (read if present) and the
        receipt keys of each node."""
        decision_key = layout.decision_key(self.epoch, self.writer_id)
        has_decision = False
        receipts: dict[str, list[str]] = {}
        async for info in self.storage.list(layout.epoch_dir(self.epoch) + self.writer_id):
            if info.key == decision_key:
                has_decision = True
            elif (parsed := layout.parse_receipt_key(info.key)) is not None and parsed[0] == self.writer_id:
                receipts.setdefault(parsed[2], []).append(info.key)
        decision = await read_decision(self.storage, self.epoch, self.writer_id) if has_decision else None
        return decision, receipts

    async def _read_receipt(self, node: str, key: str) -> NodeRecord:
        where = self.storage.url_of(key)
        epoch, writer_id, record = NodeRecord.from_receipt(await self.storage.get(key), where)
        if epoch != self.epoch or writer_id != self.writer_id or record.node != node or record.receipt != key:
            raise CheckpointCorruptedError(f"{where}: receipt does not describe node {node!r} of epoch {self.epoch}")
        return record
