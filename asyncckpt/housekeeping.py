"""Which epochs a location holds, and the removal of what interrupted saves left behind.

Epochs may share objects (format 3: an incremental save points at objects of its base
epoch). Whoever deletes (:func:`delete_epochs`, :func:`prune`, :func:`collect_garbage`)
first makes what it deletes unreachable (uncommits the epoch, or claims the writer),
then lists and reads every index and receipt still stored (:func:`live_objects`) and
deletes only what none of them names. See DESIGN.md §3 for why a concurrent save that
points at those objects either keeps them alive or fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from . import layout
from ._tasks import run_all
from .commit import decide, publish_manifest, read_decision
from .errors import CheckpointConflictError, CheckpointCorruptedError, CheckpointNotFoundError
from .manifest import Decision, EpochIndex, EpochManifest, NodeRecord, manifest_or_none, read_index, read_manifest
from .retention import Retention
from .storage import ObjectInfo, Storage

__all__ = [
    "GcReport",
    "collect_garbage",
    "committed_manifests",
    "delete_epoch",
    "delete_epochs",
    "epoch_dirs",
    "epoch_is_intact",
    "latest_committed_epoch",
    "live_objects",
    "prune",
]

log = logging.getLogger("asyncckpt")


@dataclass(frozen=True)
class GcReport:
    """What :meth:`MultiNodeCheckpointManager.gc` deleted (or, in a dry run, would delete).

    ``abandoned``: the writers gc claimed (create-only) before deleting their objects;
    ``completed_epochs``: epochs whose writer had decided to commit but never published
    its manifest, which gc published for it; ``kept_referenced``: garbage otherwise, kept
    because an index or receipt still points at it (a deleted epoch's shard holding
    blobs of a later, incremental epoch).
    """

    deleted: list[str]
    aborted_uploads: list[str]
    kept_recent: int
    skipped_epochs: list[int]
    dry_run: bool
    abandoned: list[str] = field(default_factory=list)
    completed_epochs: list[int] = field(default_factory=list)
    kept_referenced: int = 0


async def epoch_dirs(storage: Storage) -> list[int]:
    """The epochs that have a directory (committed or not), ascending."""
    names = await storage.list_dirs(layout.EPOCHS_DIR + "/")
    return sorted(e for e in (layout.parse_epoch_dir(n) for n in names) if e is not None)


async def latest_committed_epoch(storage: Storage) -> int | None:
    """The newest epoch whose manifest exists and parses (damaged ones are skipped, logged)."""
    for epoch in reversed(await epoch_dirs(storage)):
        if await manifest_or_none(storage, epoch) is not None:
            return epoch
    return None


async def epoch_is_intact(storage: Storage, epoch: int, max_concurrency: int) -> bool:
    """``epoch`` is committed and every shard its index names, and every object of other
    epochs its blobs live in, is there with its recorded size (HEADs). A missing or
    damaged manifest or index raises as reading them does."""
    index = await read_index(storage, await read_manifest(storage, epoch))
    sizes = {r.shard: r.size for r in index.nodes.values()}
    sizes.update((ref.key, ref.size) for r in index.nodes.values() for ref in r.refs)
    infos = await run_all((storage.head(key) for key in sizes), max_concurrency)
    return all(info is not None and info.size == size for info, size in zip(infos, sizes.values()))


async def delete_epoch(storage: Storage, epoch: int, max_concurrency: int = 8) -> None:
    """Remove a committed epoch (:func:`delete_epochs` of one)."""
    await delete_epochs(storage, [epoch], max_concurrency)


async def delete_epochs(storage: Storage, epochs: Iterable[int], max_concurrency: int) -> None:
    """Remove committed epochs: each stops existing at once, then the objects go that
    nothing else needs.

    1. per epoch, in order: its writer's decision (with the manifest still there nothing
       needs it, and once the manifest is gone gc must find no commit decision to
       complete again), then the manifest: from here on the epoch does not exist;
    2. every index and receipt still stored is read (:func:`live_objects`);
    3. what the epochs' indexes name (their shards, receipts and the objects of other
       epochs they point at) and the indexes go, except what step 2 found named.

    A crash at any point leaves every other epoch loadable (nothing it names is ever
    deleted) and objects that gc removes like those of any unfinished save. Raises
    :class:`CheckpointNotFoundError` when an epoch is not committed (the epochs before it
    are deleted).
    """
    doomed: set[str] = set()
    for epoch in epochs:
        manifest = await read_manifest(storage, epoch)
        try:
            index = await read_index(storage, manifest)
            doomed |= index.keys | index.referenced
        except CheckpointCorruptedError as exc:  # a damaged index: the commit still goes, gc takes the rest
            log.warning("deleting epoch %d without its index: %s", epoch, exc)
        if manifest.index:
            doomed.add(manifest.index)
        await storage.delete([layout.decision_key(epoch, manifest.writer_id)])
        await storage.delete([layout.manifest_key(epoch)])
    live = await live_objects(storage, doomed, max_concurrency)
    if live is None:
        doomed = {key for key in doomed if not key.endswith(layout.SHARD_SUFFIX)}  # gc takes them later
    await storage.delete(sorted(doomed - (live or set())))


async def live_objects(storage: Storage, dropping: Collection[str], max_concurrency: int) -> set[str] | None:
    """Every object named by an index or receipt stored now (listed after the caller made
    what it deletes unreachable), except those in ``dropping``: their shards, receipts
    and the objects of other epochs they point at. Committed or not, an index counts: a
    save's index names the objects it points at before the save decides to commit.

    ``None`` when one of them can not be read (damaged, or deleted between the listing
    and the read): the caller must then assume any shard is named.
    """
    keys = [
        info.key
        async for info in storage.list(layout.EPOCHS_DIR + "/")
        if info.key not in dropping and layout.parse_record_key(info.key) is not None
    ]

    async def named_by(key: str) -> set[str] | None:
        parsed = layout.parse_record_key(key)
        assert parsed is not None
        epoch, writer_id = parsed
        where = storage.url_of(key)
        try:
            data = await storage.get(key)
            if key.endswith(layout.RECEIPT_SUFFIX):
                records: Iterable[NodeRecord] = [NodeRecord.from_receipt(data, where)[2]]
            else:
                records = EpochIndex.from_json(data, where, epoch=epoch, writer_id=writer_id).nodes.values()
        except (CheckpointNotFoundError, CheckpointCorruptedError) as exc:
            log.warning("keeping every shard: %s can not be read (%s)", where, exc)
            return None
        return {name for record in records for name in (*record.keys, *record.referenced)}

    live: set[str] = set()
    for named in await run_all((named_by(key) for key in keys), max_concurrency):
        if named is None:
            return None
        live |= named
    return live


async def prune(storage: Storage, rules: Retention, *, dry_run: bool, max_concurrency: int) -> list[int]:
    """Delete the committed epochs ``rules`` do not keep (oldest first, :func:`delete_epochs`);
    returns them. With ``dry_run`` nothing is deleted."""
    manifests = await committed_manifests(storage, max_concurrency)
    kept = rules.kept(manifests)
    doomed = [m.epoch for m in manifests if m.epoch not in kept]
    if not dry_run and doomed:
        await delete_epochs(storage, doomed, max_concurrency)
    return doomed


async def committed_manifests(storage: Storage, max_concurrency: int) -> list[EpochManifest]:
    """The manifest of every committed epoch, by epoch. An epoch directory without a
    manifest (an interrupted save) is left out, and so, with a warning, is one whose
    manifest does not parse. A storage failure is raised as it is."""
    epochs = await epoch_dirs(storage)
    found = await run_all((manifest_or_none(storage, e) for e in epochs), limit=max_concurrency)
    return [manifest for manifest in found if manifest is not None]


async def collect_garbage(
    storage: Storage, *, grace_period: float, dry_run: bool, max_concurrency: int = 8
) -> GcReport:
    """Delete what interrupted, failed or losing saves left behind, by the commit protocol.

    Per epoch: with a manifest, every object it does not name (through its index) goes.
    Without one, each writer whose newest object is older than ``grace_period`` seconds
    is first claimed with an ``abandoned`` decision (create-only, see :mod:`.commit`):
    a claimed writer can no longer commit, so its objects go (its decision stays, so it
    never can). A writer that had decided to commit is completed instead. Of all that,
    what an index or receipt stored after the claims still names stays
    (:func:`live_objects`): the shards of deleted epochs that later epochs point at.
    In a dry run nothing is written or deleted, and the report lists what would be.
    """
    cutoff = time.time() - grace_period
    by_epoch: dict[int, list[ObjectInfo]] = {}
    async for info in storage.list(layout.EPOCHS_DIR + "/"):
        epoch = layout.epoch_of_key(info.key)
        if epoch is not None:
            by_epoch.setdefault(epoch, []).append(info)
    report = _Sweep(storage, cutoff, dry_run)
    for epoch, infos in sorted(by_epoch.items()):
        await report.sweep_epoch(epoch, infos)
    garbage = report.garbage
    if garbage:
        live = await live_objects(storage, set(garbage), max_concurrency)
        garbage = [
            key for key in garbage if not (key in live if live is not None else key.endswith(layout.SHARD_SUFFIX))
        ]
    stale_uploads = [
        u
        for u in await storage.list_pending_uploads(layout.EPOCHS_DIR + "/")
        if u.initiated is None or u.initiated <= cutoff
    ]
    if not dry_run:
        if garbage:
            await storage.delete(garbage)
        for upload in stale_uploads:
            await storage.abort_pending_upload(upload)
    return GcReport(
        deleted=garbage,
        aborted_uploads=[u.key for u in stale_uploads],
        kept_recent=report.kept_recent,
        skipped_epochs=report.skipped,
        dry_run=dry_run,
        abandoned=report.abandoned,
        completed_epochs=report.completed,
        kept_referenced=len(report.garbage) - len(garbage),
    )


@dataclass
class _Sweep:
    storage: Storage
    cutoff: float
    dry_run: bool
    garbage: list[str] = field(default_factory=list)
    kept_recent: int = 0
    skipped: list[int] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)

    def _old(self, info: ObjectInfo) -> bool:
        return info.last_modified is None or info.last_modified <= self.cutoff

    async def sweep_epoch(self, epoch: int, infos: list[ObjectInfo]) -> None:
        manifest_key = layout.manifest_key(epoch)
        if any(info.key == manifest_key for info in infos):
            try:
                manifest = await read_manifest(self.storage, epoch)
                keep = {manifest_key, manifest.index, layout.decision_key(epoch, manifest.writer_id)}
                keep |= (await read_index(self.storage, manifest)).keys
            except CheckpointNotFoundError:
                pass  # deleted since the listing: the epoch is uncommitted now
            except CheckpointCorruptedError as exc:
                log.warning("gc: leaving epoch %d alone, its manifest or index does not parse: %s", epoch, exc)
                self.skipped.append(epoch)
                return
            else:  # committed: nothing else can ever be named, whoever wrote it
                self._collect_old([info for info in infos if info.key not in keep])
                return
        writers: dict[str | None, list[ObjectInfo]] = {}
        for info in infos:
            writers.setdefault(layout.writer_of_key(info.key), []).append(info)
        for writer, objects in writers.items():
            if writer is None:  # a stray key of no writer
                self._collect_old(objects)
            elif all(info.key == layout.decision_key(epoch, writer) for info in objects):
                continue  # a verdict alone: it keeps its writer from ever committing
            elif not all(self._old(info) for info in objects):
                self.kept_recent += len(objects)  # a save may still be running
            else:
                await self._claim(epoch, writer, objects)

    async def _claim(self, epoch: int, writer: str, objects: list[ObjectInfo]) -> None:
        decision_key = layout.decision_key(epoch, writer)
        others = [info for info in objects if info.key != decision_key]
        if self.dry_run:
            standing = await read_decision(self.storage, epoch, writer)
            if standing is None or standing.verdict != "commit":
                self.abandoned.append(writer)
                self._collect(others)
            return
        standing = await decide(self.storage, Decision(epoch, writer, "abandoned"))
        if standing.manifest is not None:  # it decided to commit: finish its commit
            try:
                await publish_manifest(self.storage, standing.manifest)
            except CheckpointConflictError:
                pass  # another writer's manifest stands: this one's objects are garbage
            else:
                self.completed.append(epoch)
                return
        else:
            self.abandoned.append(writer)
        self._collect(others)

    def _collect(self, infos: Iterable[ObjectInfo]) -> None:
        self.garbage.extend(info.key for info in infos)

    def _collect_old(self, infos: list[ObjectInfo]) -> None:
        old = [info for info in infos if self._old(info)]
        self.kept_recent += len(infos) - len(old)
        self._collect(old)
