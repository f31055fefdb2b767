"""One save attempt at an epoch, up to the moment it can commit (see :mod:`.commit`).

A process that holds every node of the job is its own writer: it uploads every shard and
the epoch's index, then the manager decides and publishes. A process of a multi-process
job uploads its shards and receipts under the job's writer and takes part in the job's
agreement (:class:`~asyncckpt.commit.JobCommit`), which decides for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import layout
from ._tasks import shielded
from .commit import JobCommit, stage_commit
from .config import TransferConfig
from .errors import CheckpointError
from .manifest import EpochIndex, EpochManifest, NodeRecord
from .staging import Encoded
from .storage import ByteBudget, Storage
from .transfer import Reuse, discard, upload_nodes

__all__ = ["SaveAttempt", "Staged"]

log = logging.getLogger("asyncckpt")


@dataclass(frozen=True)
class Staged:
    """An uploaded attempt: the records of its nodes and the manifest that commits it;
    ``decided`` when its commit decision already stands (a job decided it)."""

    records: dict[str, NodeRecord]
    manifest: EpochManifest
    decided: bool

    @property
    def index(self) -> EpochIndex:
        return EpochIndex(self.manifest.epoch, self.manifest.writer_id, self.records)


@dataclass(frozen=True)
class SaveAttempt:
    """Attempt ``token`` at ``epoch`` by the process holding the ``encoded`` nodes of the
    job of ``run_id``, whose nodes are ``nodes``."""

    storage: Storage
    budget: ByteBudget
    config: TransferConfig
    db_type: str
    run_id: str
    nodes: Sequence[str]
    epoch: int
    token: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    reuse: Reuse | None = None  # an incremental save

    async def upload(self, encoded: Encoded) -> Staged:
        """Upload; on any failure what this attempt wrote is removed (or, in a job,
        left to the job's abort and gc) and one error names every failed node."""
        if len(encoded) == len(self.nodes):
            return await self._alone(encoded)
        return await self._in_job(encoded)

    async def forget(self, staged: Staged) -> None:
        """After the commit was lost (another writer's manifest, or gc's claim): remove
        what nothing will ever name. A job's objects are left to gc: other processes may
        still be reading them."""
        if len(staged.records) < len(self.nodes):
            return
        keys = [*staged.index.keys, staged.manifest.index]
        if staged.decided:  # another manifest stands: our decision names nothing ever again
            keys.append(layout.decision_key(self.epoch, staged.manifest.writer_id))
        await shielded(discard(self.storage, keys))

    async def _alone(self, encoded: Encoded) -> Staged:
        writer_id = layout.solo_writer_id(self.run_id, self.token)
        limit = self.config.max_nodes_in_flight
        records = await upload_nodes(self.storage, self.budget, self.epoch, writer_id, encoded, limit, reuse=self.reuse)
        index = EpochIndex(self.epoch, writer_id, records)
        try:
            return Staged(records, await stage_commit(self.storage, index, self.db_type, self.metrics), decided=False)
        except BaseException:
            await shielded(discard(self.storage, [*index.keys, layout.index_key(self.epoch, writer_id)]))
            raise

    async def _in_job(self, encoded: Encoded) -> Staged:
        timeout = self.config.commit_timeout
        job = JobCommit(
            self.storage, self.epoch, self.run_id, self.token, self.nodes, time.perf_counter() + timeout, timeout
        )

        async def give_up(written: list[str]) -> None:
            """This process failed to upload: the job aborts the epoch (the other
            processes stop waiting), then this process removes its objects."""
            try:
                standing = await job.give_up(f"node(s) {list(encoded)} failed to save in their process", list(encoded))
            except CheckpointError as exc:
                log.warning("could not record the abort of epoch %d: %s", self.epoch, exc)
                return  # gc decides later; deleting now could pull objects out of a commit
            if standing.verdict != "commit":
                await discard(self.storage, written)

        limit = self.config.max_nodes_in_flight
        records = await upload_nodes(
            self.storage,
            self.budget,
            self.epoch,
            job.writer_id,
            encoded,
            limit,
            token=self.token,
            cleanup=give_up,
            reuse=self.reuse,
        )
        # From here on our receipts may be part of a commit: never delete them.
        return Staged(records, await job.agree(records, self.db_type, self.metrics), decided=True)
