"""The manager's methods that look after the epochs of its save location: list them,
delete them, apply retention rules, collect garbage (see :mod:`.housekeeping`)."""

from __future__ import annotations

from . import layout
from .config import TransferConfig
from .housekeeping import GcReport, collect_garbage, committed_manifests, delete_epoch, prune
from .manifest import EpochManifest
from .retention import Retention
from .storage import Storage

__all__ = ["EpochMaintenance"]


class EpochMaintenance:
    """Mixed into :class:`~asyncckpt.MultiNodeCheckpointManager`, which provides the
    attributes and the two hooks declared here."""

    _storage: Storage
    _config: TransferConfig
    _retention: Retention | None

    async def _ensure_open(self) -> None:
        raise NotImplementedError

    def _forget(self, epoch: int) -> None:
        """Drop what the manager remembers of a deleted epoch."""
        raise NotImplementedError

    async def committed_manifests(self) -> list[EpochManifest]:
        """The manifest of every committed epoch in the save location, by epoch.

        An epoch directory without a manifest (an interrupted save) is left out, and so,
        with a warning, is one whose manifest does not parse.
        """
        await self._ensure_open()
        return await committed_manifests(self._storage, self._config.max_concurrency)

    async def committed_epochs(self) -> list[int]:
        """Every committed epoch in the save location (manifest present and valid), ascending."""
        return [manifest.epoch for manifest in await self.committed_manifests()]

    async def gc(self, *, grace_period: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Remove what interrupted, failed or losing saves left in the save location.

        In a committed epoch, every object its manifest does not name (through its index)
        goes once older than ``grace_period`` seconds. An unfinished save whose newest
        object is older than that is first claimed with a create-only "abandoned"
        decision, so it can never commit, then deleted; one that had decided to commit is
        completed instead (its manifest published). Unfinished multipart uploads older
        than the grace period are aborted. Safe beside any saves, with any clocks: the
        grace period only spares young saves the work of being claimed. An epoch whose
        manifest exists but does not parse is left alone (``skipped_epochs``). With
        ``dry_run`` nothing is written or deleted; the report lists what would be.
        """
        if not isinstance(grace_period, (int, float)) or isinstance(grace_period, bool) or grace_period < 0:
            raise ValueError(f"grace_period must be a non-negative number of seconds, got {grace_period!r}")
        await self._ensure_open()
        return await collect_garbage(
            self._storage, grace_period=grace_period, dry_run=dry_run, max_concurrency=self._config.max_concurrency
        )

    async def delete_epoch(self, epoch: int) -> None:
        """Delete a committed epoch of the save location: its commit record goes first (the
        epoch stops existing at once), then its objects, except those that other epochs'
        indexes still name (an incremental epoch points at the shards of the epoch it
        built on); the objects of deleted epochs it pointed at go too once nothing names
        them. A crash midway leaves only what :meth:`gc` removes; a load racing the
        delete gets that epoch's exact data or :class:`~asyncckpt.CheckpointNotFoundError`,
        which is also raised if the epoch is not committed. No other committed epoch
        loses anything it needs.
        """
        layout.validate_epoch(epoch)
        await self._ensure_open()
        await delete_epoch(self._storage, epoch, self._config.max_concurrency)
        self._forget(epoch)

    async def prune(self, retention: Retention | None = None, *, dry_run: bool = False) -> list[int]:
        """Delete the committed epochs that ``retention`` (default: the manager's) does not
        keep; returns them, ascending. With ``dry_run`` nothing is deleted."""
        rules = retention if retention is not None else self._retention
        if not isinstance(rules, Retention):
            raise ValueError("prune() needs Retention rules: pass one, or give the manager retention=...")
        await self._ensure_open()
        deleted = await prune(self._storage, rules, dry_run=dry_run, max_concurrency=self._config.max_concurrency)
        if not dry_run:
            for epoch in deleted:
                self._forget(epoch)
        return deleted
