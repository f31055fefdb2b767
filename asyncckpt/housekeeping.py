"""Which epochs a location holds, and the removal of what interrupted saves left behind."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from . import layout
from ._tasks import run_all
from .errors import CheckpointCorruptedError, CheckpointNotFoundError
from .manifest import EpochManifest, manifest_or_none, read_manifest
from .storage import ObjectInfo, Storage

__all__ = ["GcReport", "collect_garbage", "committed_manifests", "epoch_dirs", "latest_committed_epoch"]

log = logging.getLogger("asyncckpt")


@dataclass(frozen=True)
class GcReport:
    """What :meth:`MultiNodeCheckpointManager.gc` deleted (or, in a dry run, would delete)."""

    deleted: list[str]
    aborted_uploads: list[str]
    kept_recent: int
    skipped_epochs: list[int]
    dry_run: bool


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


async def committed_manifests(storage: Storage, max_concurrency: int) -> list[EpochManifest]:
    """The manifest of every committed epoch, by epoch. An epoch directory without a
    manifest (an interrupted save) is left out, and so, with a warning, is one whose
    manifest does not parse. A storage failure is raised as it is."""
    epochs = await epoch_dirs(storage)
    found = await run_all((manifest_or_none(storage, e) for e in epochs), limit=max_concurrency)
    return [manifest for manifest in found if manifest is not None]


async def collect_garbage(storage: Storage, *, grace_period: float, dry_run: bool) -> GcReport:
    """Delete the leftovers of interrupted or losing saves; see ``MultiNodeCheckpointManager.gc``."""
    cutoff = time.time() - grace_period
    by_epoch: dict[int, list[ObjectInfo]] = {}
    async for info in storage.list(layout.EPOCHS_DIR + "/"):
        epoch = layout.epoch_of_key(info.key)
        if epoch is not None:
            by_epoch.setdefault(epoch, []).append(info)
    garbage: list[str] = []
    kept_recent = 0
    skipped: list[int] = []
    for epoch, infos in sorted(by_epoch.items()):
        keep: set[str] = set()
        manifest_key = layout.manifest_key(epoch)
        if any(info.key == manifest_key for info in infos):
            try:
                manifest = await read_manifest(storage, epoch)
            except CheckpointNotFoundError:
                pass  # deleted since the listing: the epoch is uncommitted now
            except CheckpointCorruptedError as exc:
                log.warning("gc: leaving epoch %d alone, its manifest does not parse: %s", epoch, exc)
                skipped.append(epoch)
                continue
            else:
                keep = {manifest_key} | {k for r in manifest.nodes.values() for k in (r.shard, r.receipt)}
        for info in infos:
            if info.key in keep:
                continue
            if info.last_modified is not None and info.last_modified > cutoff:
                kept_recent += 1
            else:
                garbage.append(info.key)
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
        kept_recent=kept_recent,
        skipped_epochs=skipped,
        dry_run=dry_run,
    )
