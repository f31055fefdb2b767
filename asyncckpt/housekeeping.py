"""Which epochs a location holds, and the removal of what interrupted saves left behind."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import layout
from ._tasks import run_all
from .commit import decide, publish_manifest, read_decision
from .errors import CheckpointConflictError, CheckpointCorruptedError, CheckpointNotFoundError
from .manifest import Decision, EpochManifest, manifest_or_none, read_index, read_manifest
from .retention import Retention
from .storage import ObjectInfo, Storage

__all__ = [
    "GcReport",
    "collect_garbage",
    "committed_manifests",
    "delete_epoch",
    "epoch_dirs",
    "epoch_is_intact",
    "latest_committed_epoch",
    "prune",
]

log = logging.getLogger("asyncckpt")


@dataclass(frozen=True)
class GcReport:
    """What :meth:`MultiNodeCheckpointManager.gc` deleted (or, in a dry run, would delete).

    ``abandoned``: the writers gc claimed (create-only) before deleting their objects;
    ``completed_epochs``: epochs whose writer had decided to commit but never published
    its manifest, which gc published for it.
    """

    deleted: list[str]
    aborted_uploads: list[str]
    kept_recent: int
    skipped_epochs: list[int]
    dry_run: bool
    abandoned: list[str] = field(default_factory=list)
    completed_epochs: list[int] = field(default_factory=list)


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
    """``epoch`` is committed and every shard its index names is there with its recorded
    size (HEADs). A missing or damaged manifest or index raises as reading them does."""
    index = await read_index(storage, await read_manifest(storage, epoch))
    records = list(index.nodes.values())
    infos = await run_all((storage.head(r.shard) for r in records), max_concurrency)
    return all(info is not None and info.size == r.size for info, r in zip(infos, records))


async def delete_epoch(storage: Storage, epoch: int) -> None:
    """Remove a committed epoch: it stops existing at once, then its objects go.

    1. its writer's decision (with the manifest still there nothing needs it, and once
       the manifest is gone gc must find no commit decision to complete again);
    2. the manifest: from here on the epoch does not exist;
    3. what its index names, and the index.

    A crash after step 2 leaves objects that gc claims and removes like any unfinished
    save. Nothing of another epoch or another writer is touched. Raises
    :class:`CheckpointNotFoundError` when the epoch is not committed.
    """
    manifest = await read_manifest(storage, epoch)
    try:
        named = (await read_index(storage, manifest)).keys
    except CheckpointCorruptedError as exc:  # a damaged index: the commit still goes, gc takes the rest
        log.warning("deleting epoch %d without its index: %s", epoch, exc)
        named = set()
    await storage.delete([layout.decision_key(epoch, manifest.writer_id)])
    await storage.delete([layout.manifest_key(epoch)])
    await storage.delete(sorted(named | ({manifest.index} if manifest.index else set())))


async def prune(storage: Storage, rules: Retention, *, dry_run: bool, max_concurrency: int) -> list[int]:
    """Delete the committed epochs ``rules`` do not keep (oldest first); returns them.
    With ``dry_run`` nothing is deleted."""
    manifests = await committed_manifests(storage, max_concurrency)
    kept = rules.kept(manifests)
    doomed = [m.epoch for m in manifests if m.epoch not in kept]
    if not dry_run:
        for epoch in doomed:
            await delete_epoch(storage, epoch)
    return doomed


async def committed_manifests(storage: Storage, max_concurrency: int) -> list[EpochManifest]:
    """The manifest of every committed epoch, by epoch. An epoch directory without a
    manifest (an interrupted save) is left out, and so, with a warning, is one whose
    manifest does not parse. A storage failure is raised as it is."""
    epochs = await epoch_dirs(storage)
    found = await run_all((manifest_or_none(storage, e) for e in epochs), limit=max_concurrency)
    return [manifest for manifest in found if manifest is not None]


async def collect_garbage(storage: Storage, *, grace_period: float, dry_run: bool) -> GcReport:
    """Delete what interrupted, failed or losing saves left behind, by the commit protocol.

    Per epoch: with a manifest, every object it does not name (through its index) goes.
    Without one, each writer whose newest object is older than ``grace_period`` seconds
    is first claimed with an ``abandoned`` decision (create-only, see :mod:`.commit`):
    a claimed writer can no longer commit, so its objects go (its decision stays, so it
    never can). A writer that had decided to commit is completed instead. In a dry run
    nothing is written or deleted, and the report lists what would be.
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
    stale_uploads = [
        u
        for u in await storage.list_pending_uploads(layout.EPOCHS_DIR + "/")
        if u.initiated is None or u.initiated <= cutoff
    ]
    if not dry_run:
        if report.garbage:
            await storage.delete(report.garbage)
        for upload in stale_uploads:
            await storage.abort_pending_upload(upload)
    return GcReport(
        deleted=report.garbage,
        aborted_uploads=[u.key for u in stale_uploads],
        kept_recent=report.kept_recent,
        skipped_epochs=report.skipped,
        dry_run=dry_run,
        abandoned=report.abandoned,
        completed_epochs=report.completed,
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
