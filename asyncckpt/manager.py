"""``MultiNodeCheckpointManager``: caffe2's multi-node checkpoint manager, on asyncio.

The manager keeps caffe2's surface and delegates: :mod:`.staging` encodes workspaces
and runs background saves, :mod:`.attempt` uploads one save attempt, :mod:`.commit`
commits it (create-only decision and manifest, the multi-process agreement),
:mod:`.transfer` moves every node's shard at once (:mod:`.restore`: loads, in place), :mod:`.housekeeping` lists epochs
and collects garbage (its methods: :mod:`.maintenance`), :mod:`.handler` calls the
user's metadata handler and
:mod:`.stats` keeps the reports. What is left here is the order of things: which
nodes, which epoch, which storage, all or nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import layout
from .attempt import SaveAttempt
from .commit import decide_commit, is_committed, publish_manifest
from .config import TransferConfig
from .errors import (
    CheckpointConflictError,
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointStateError,
)
from .handler import HandlerCalls, MetadataHandler
from .housekeeping import (
    epoch_is_intact,
    latest_committed_epoch,
)
from .maintenance import EpochMaintenance
from .manifest import EpochIndex, EpochManifest, EpochRef, check_metrics, read_index, read_manifest
from .progress import Progress, check_progress, reporting
from .restore import restore_partial, restore_workspaces
from .retention import Retention
from .staging import BackgroundSaves, Encoded, SaveHandle, encode_workspaces, shards_size_bound
from .stats import StatsBook
from .storage import PATH_TYPES, ByteBudget, Storage, reader_for, storage_for
from .transfer import Reuse
from .workspaces import Workspaces, job_workspaces, normalize_nodes, partial_request

__all__ = ["MultiNodeCheckpointManager"]

log = logging.getLogger("asyncckpt")

DB_TYPES = ("msgpack",)


@dataclass
class _EpochState:
    """What this manager knows of one epoch."""

    attempts: int = 0  # save attempts started: the next one is number `attempts`
    staged: EpochManifest | None = None  # uploaded, its commit not yet written
    decided: bool = False  # the staged manifest's commit decision already stands (multi-process)
    known: EpochIndex | None = None  # committed: written, read or loaded here (this process's nodes at least)
    known_in: Storage | None = None  # the storage that holds `known`
    committed_here: bool = False  # this manager's commit stands


class MultiNodeCheckpointManager(EpochMaintenance):
    """Checkpoints the workspaces of several nodes to S3, a local directory or memory.

    ``db_prefix`` is the location: ``"s3://bucket/prefix"``, ``"file:///abs/dir"`` or a
    plain path, or ``"memory://name"``. ``db_type`` names the shard encoding
    (``"msgpack"``). ``metadata_handler`` is an optional :class:`MetadataHandler`.
    ``storage_options`` go to the backend (S3: ``endpoint_url``, ``region_name``,
    credentials, ``addressing_style``...); ``config`` sets limits, part sizes, retries
    and client settings (:class:`~asyncckpt.TransferConfig`); ``run_id`` names this job
    incarnation in the keys it writes (random by default); ``retention``
    (:class:`~asyncckpt.Retention`) deletes, after each committed save, the committed
    epochs its rules do not keep.

    Use it as ``async with MultiNodeCheckpointManager(...) as mgr:`` so its storage
    clients are opened once and closed at the end (or call :meth:`close`). Invalid
    arguments raise :class:`ValueError`/:class:`TypeError` here, before any I/O.
    """

    def __init__(
        self,
        db_prefix: str,
        db_type: str = "msgpack",
        metadata_handler: MetadataHandler | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        config: TransferConfig | None = None,
        run_id: str | None = None,
        retention: Retention | None = None,
    ):
        if db_type not in DB_TYPES:
            raise ValueError(f"unknown db_type {db_type!r}; supported: {DB_TYPES}")
        if config is not None and not isinstance(config, TransferConfig):
            raise TypeError(f"config must be a TransferConfig, got {type(config).__name__}")
        if retention is not None and not isinstance(retention, Retention):
            raise TypeError(f"retention must be a Retention, got {type(retention).__name__}")
        self._retention = retention
        self._handler = HandlerCalls(metadata_handler) if metadata_handler is not None else None
        self._db_prefix = db_prefix
        self._db_type = db_type
        self._storage_options = dict(storage_options or {})
        self._config = config or TransferConfig()
        self._run_id = layout.validate_run_id(run_id) if run_id is not None else layout.new_run_id()
        self._token_seed = layout.new_token_seed()
        self._storage = storage_for(db_prefix, options=self._storage_options, config=self._config)
        self._read_storage: Storage | None = None
        self._path_prefix: str | None = None
        self._path_type: str | None = None
        self._node_names: list[str] | None = None
        self._workspaces: Workspaces | None = None
        self._open_lock: asyncio.Lock | None = None
        self._opened: list[Storage] = []
        self._closed = False
        self._budget = ByteBudget(self._config.max_bytes_in_flight)
        self._epochs: dict[int, _EpochState] = {}
        self._base: tuple[EpochIndex, Storage] | None = None  # the last epoch committed or loaded here
        self._stats = StatsBook()
        self._background = BackgroundSaves()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> MultiNodeCheckpointManager:
        await self._ensure_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Wait for a ``save_async`` still in flight, then close the storage clients.

        The manager can not be used afterwards. A background save that failed and
        whose handle was never awaited raises here, so its error is never lost.
        """
        try:
            await self._background.drain(raise_failures=False)
        finally:
            self._closed = True
            opened, self._opened = self._opened, []
            for storage in opened:
                await storage.close()
            self._background.release()
        self._background.raise_unseen()

    async def _ensure_open(self) -> None:
        if self._closed:
            raise CheckpointStateError("this MultiNodeCheckpointManager is closed")
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            for storage in (self._storage, self._read_storage):
                if storage is not None and storage not in self._opened:
                    await storage.open()
                    self._opened.append(storage)
        if self._handler is not None and self._node_names is not None:
            await self._handler.set_params_once(
                self._db_prefix, self._db_type, self._node_names, self._path_prefix, self._path_type
            )

    @property
    def db_prefix(self) -> str:
        return self._db_prefix

    @property
    def run_id(self) -> str:
        """The id of this job incarnation, part of every shard key it writes."""
        return self._run_id

    @property
    def config(self) -> TransferConfig:
        return self._config

    @property
    def nodes(self) -> list[str]:
        """The node names given to :meth:`init` (or :meth:`set_params`), in order."""
        return list(self._node_names or [])

    @property
    def local_nodes(self) -> list[str]:
        """The nodes this process holds (all of them unless ``init(local_nodes=...)``)."""
        return list(self._workspaces or [])

    def workspace(self, node: str) -> MutableMapping[str, Any]:
        """The mapping holding ``node``'s blobs; :meth:`load` writes into this same object."""
        workspaces = self._require_init("workspace()")
        try:
            return workspaces[node]
        except KeyError:
            raise KeyError(f"unknown node {node!r}; nodes are {self.nodes}") from None

    def _require_init(self, what: str) -> Workspaces:
        if self._workspaces is None:
            raise CheckpointStateError(f"init(nodes) must be called before {what}")
        return self._workspaces

    def _epoch(self, epoch: int) -> _EpochState:
        return self._epochs.setdefault(epoch, _EpochState())

    def _remember(self, index: EpochIndex, storage: Storage) -> None:
        state = self._epoch(index.epoch)
        state.known, state.known_in = index, storage
        self._base = (index, storage)

    def _forget(self, epoch: int) -> None:
        state = self._epochs.get(epoch)
        if state is not None:
            state.known = state.known_in = None
            state.committed_here = False
        if self._base is not None and self._base[0].epoch == epoch:
            self._base = None

    async def _reuse(self) -> Reuse | None:
        """How the next save reuses stored bytes: not at all unless ``config.incremental``;
        compared with the last epoch committed or loaded here if it is in the save
        location and still committed by the same writer (one GET), else with nothing."""
        if not self._config.incremental:
            return None
        if self._base is None or self._base[1] is not self._storage:
            return Reuse(self._config)
        index = self._base[0]
        if not await is_committed(self._storage, EpochRef(index.epoch, index.writer_id)):
            self._base = None
            return Reuse(self._config)
        return Reuse(self._config, index)

    @property
    def _reader(self) -> Storage:
        return self._read_storage or self._storage

    # ------------------------------------------------------------------ parameters

    def set_params(self, nodes: Any, path_prefix: str | None = None, path_type: str | None = None) -> None:
        """Store the node names, and ``path_prefix``/``path_type`` when they are truthy.

        ``path_prefix`` re-roots reads (``init(retrieve_from_epoch)``, ``load``, resume
        and ``cp_accessible(epoch)``) to another location; saves keep going to
        ``db_prefix``. Invalid values raise before anything changes.
        """
        names = list(normalize_nodes(nodes))
        if self._node_names is not None and names != self._node_names:
            raise CheckpointStateError(f"this manager already manages nodes {self._node_names}; got {names}")
        new_type = path_type or self._path_type
        new_prefix = path_prefix or self._path_prefix
        if path_type and path_type not in PATH_TYPES:
            raise ValueError(f"unknown path_type {path_type!r}; expected one of {PATH_TYPES}")
        read_storage = self._read_storage
        if new_prefix and (new_prefix != self._path_prefix or new_type != self._path_type):
            read_storage = reader_for(self._storage, new_prefix, new_type, self._storage_options, self._config)
        self._node_names = names
        self._path_prefix, self._path_type = new_prefix, new_type
        self._read_storage = read_storage
        if self._handler is not None:
            self._handler.params_changed()

    # ------------------------------------------------------------------ init

    async def init(
        self,
        nodes: Any,
        retrieve_from_epoch: int | None = None,
        path_prefix: str | None = None,
        path_type: str | None = None,
        *,
        local_nodes: Any = None,
    ) -> None:
        """Declare the job's nodes (names, or a mapping name -> workspace).

        ``local_nodes`` (names, or a mapping name -> workspace) says which of them this
        process holds when the job runs as several processes, each with its own
        manager and the same ``run_id``; by default every node is local. Workspaces
        not given are new dicts (see :meth:`workspace`).

        With ``retrieve_from_epoch``, that epoch's manifest is read (from ``path_prefix``
        when given) and must hold every local node, else
        :class:`CheckpointNotFoundError`. A second ``init`` with the same nodes is a
        no-op; with other nodes an error.
        """
        normalized, local = job_workspaces(nodes, local_nodes)
        if retrieve_from_epoch is not None:
            layout.validate_epoch(retrieve_from_epoch)
        if self._workspaces is not None and (
            list(normalized) != self._node_names or list(local) != list(self._workspaces)
        ):
            raise CheckpointStateError(
                f"this manager already manages nodes {self._node_names} (local {list(self._workspaces)}); "
                f"got {list(normalized)} (local {list(local)})"
            )
        self.set_params(list(normalized), path_prefix, path_type)
        if self._workspaces is None:
            self._workspaces = local
        await self._ensure_open()
        if retrieve_from_epoch is not None:
            index = await read_index(self._reader, await read_manifest(self._reader, retrieve_from_epoch))
            _check_nodes_present(index, list(local))
            self._remember(index, self._reader)

    # ------------------------------------------------------------------ save

    async def save(
        self, epoch: int, metrics: Mapping[str, float] | None = None, *, progress: Progress | None = None
    ) -> None:
        """Save every blob of every local node's workspace as of this call, then commit.

        ``metrics`` (names to finite numbers, e.g. ``{"loss": 0.31}``) are kept in the
        epoch's manifest (``EpochManifest.metrics``), for :class:`~asyncckpt.Retention`'s
        best-k and for ``asyncckpt ls``; in a multi-process job, the committing process's.
        ``progress(bytes_done, bytes_total)`` is called from the event loop as the local
        shards are written (throttled), with ``(total, total)`` last.

        Raises :class:`TypeError` (nothing written) for an unsupported blob,
        :class:`CheckpointConflictError` if the epoch is already committed (or another
        job commits it first), and one error naming every failed node otherwise (a
        :class:`StorageError` when all causes are storage failures). After any failure
        the epoch is not committed by this call and earlier epochs are untouched.
        The workspaces are read while they upload: do not mutate them until it returns.

        When the job runs as several processes (``init(local_nodes=...)``), each
        process uploads its nodes' shards and receipts, then waits until every node's
        receipt exists; whichever process gets there first commits, the others see
        their own job's manifest and succeed. If a receipt is still missing after
        ``config.commit_timeout`` seconds, :class:`CheckpointTimeoutError` names the
        missing nodes and the epoch stays uncommitted.
        """
        layout.validate_epoch(epoch)
        checked, progress = check_metrics(metrics), check_progress(progress)
        workspaces = self._require_init("save()")
        await self._background.drain()
        current = {node: dict(ws) for node, ws in workspaces.items()}
        encoded = await asyncio.to_thread(encode_workspaces, current)
        await self._save_encoded(epoch, encoded, checked, progress)

    async def save_async(
        self, epoch: int, metrics: Mapping[str, float] | None = None, *, progress: Progress | None = None
    ) -> SaveHandle:
        """Snapshot every local workspace now; upload and commit in the background.

        Returns as soon as the state is copied (the caller may change its workspaces
        right away) with a :class:`SaveHandle`; ``await handle`` waits for the commit
        and raises the save's error, if any. At most one save is in flight: a second
        ``save_async`` (or ``save``) first waits for the previous one. A failure
        nobody awaited is logged and raised by the next ``save``/``save_async``/``close``.

        Arrays are copied into staging buffers that are kept for the next snapshot
        (one extra copy of the state stays allocated until :meth:`close`); everything
        else is encoded on the spot. Unsupported blobs raise :class:`TypeError` here;
        an already committed epoch raises :class:`CheckpointConflictError` from the
        handle (the probe is not worth holding the caller for). ``metrics`` and
        ``progress`` as for :meth:`save` (the upload's progress, reported in the
        background); the retention rules, if any, run in the background too.
        """
        started = time.perf_counter()
        layout.validate_epoch(epoch)
        checked, progress = check_metrics(metrics), check_progress(progress)
        workspaces = self._require_init("save_async()")
        await self._background.drain()
        await self._ensure_open()
        encoded, staging = await self._background.snapshot(workspaces)
        upload = self._save_encoded(epoch, encoded, checked, progress)
        return self._background.start(epoch, upload, staging, time.perf_counter() - started)

    async def _save_encoded(
        self, epoch: int, encoded: Encoded, metrics: Mapping[str, float], progress: Progress | None = None
    ) -> None:
        """Upload the local nodes' shards as a new attempt at ``epoch``, commit it, then
        apply the retention rules."""
        await self._ensure_open()
        if await self._storage.exists(layout.manifest_key(epoch)):
            raise CheckpointConflictError(f"epoch {epoch} is already committed in {self._storage.url}")
        state = self._epoch(epoch)
        token = layout.attempt_token(self._token_seed, epoch, state.attempts)
        state.attempts += 1  # every attempt gets fresh keys
        started = time.perf_counter()
        attempt = SaveAttempt(
            self._storage,
            self._budget,
            self._config,
            self._db_type,
            self._run_id,
            self.nodes,
            epoch,
            token,
            metrics,
            await self._reuse(),
        )
        with reporting(progress, shards_size_bound(encoded, fingerprinted=self._config.incremental)):
            staged = await attempt.upload(encoded)
        state.staged, state.decided = staged.manifest, staged.decided
        try:
            await self.write_checkpoint_metadata(epoch)
        except CheckpointConflictError:  # another writer won, or gc claimed the attempt
            await attempt.forget(replace(staged, decided=state.decided))
            raise
        finally:
            state.staged = None
        self._remember(staged.index, self._storage)
        self._stats.record("checkpoint_save", staged.index, time.perf_counter() - started, self._storage)
        if self._retention is not None and self.nodes[0] in self.local_nodes:  # a job's committer prunes
            try:
                await self.prune()
            except CheckpointError as exc:  # the save stands; the next one prunes again
                log.warning("retention after epoch %d failed: %s", epoch, exc)

    async def write_checkpoint_metadata(self, epoch: int) -> None:
        """Commit ``epoch``: decide and publish its manifest (both create-only), then tell
        the metadata handler.

        :meth:`save` calls this itself; calling it again for an epoch this manager
        committed is a no-op. A manifest of another writer first raises
        :class:`CheckpointConflictError`, and so does an attempt that gc claimed as
        abandoned; our own retried write is recognised by its writer id and is success.
        """
        layout.validate_epoch(epoch)
        state = self._epochs.get(epoch) or _EpochState()
        if state.committed_here and state.staged is None:
            return
        manifest = state.staged
        if manifest is None:
            raise CheckpointStateError(f"no saved shards of epoch {epoch} to commit; call save({epoch})")
        await self._ensure_open()
        if not state.decided:
            await decide_commit(self._storage, manifest)
            state.decided = True
        await publish_manifest(self._storage, manifest)
        state.committed_here = True
        if self._handler is not None and self.nodes[0] in self.local_nodes:  # a job's committer tells it
            await self._handler.committed(epoch)

    # ------------------------------------------------------------------ load

    async def load(
        self,
        epoch: int,
        path_prefix: str | None = None,
        path_type: str | None = None,
        *,
        progress: Progress | None = None,
    ) -> None:
        """Restore every node's blobs of ``epoch`` into its workspace, all or nothing.

        Loaded blobs replace same-named entries; other entries are left alone. An entry
        that holds an array or tensor of the blob's dtype and shape is written in place
        (same object, same device; read straight into C-contiguous host memory); a
        ``Stateful`` entry (``state_dict()``/``load_state_dict()``: a module, optimizer,
        scheduler) gets ``load_state_dict`` with the restored state dict, whose large
        tensors were written into its current ones, and stays the same object.

        All or nothing: every byte is read and verified before ``load_state_dict`` is
        called and before any entry is replaced; a target is copied to an undo journal
        (a temporary file) before it is overwritten, and on any error (I/O, damage,
        another node, a ``load_state_dict``, cancellation) every target gets its bytes
        back and every ``load_state_dict`` that ran is given the previous state dict
        before the error propagates (non-tensor settings it took may stay). An epoch
        deleted while it loads is :class:`CheckpointNotFoundError`.
        ``progress(bytes_done, bytes_total)`` is called from the event loop as shard
        bytes arrive (throttled).
        """
        layout.validate_epoch(epoch)
        progress = check_progress(progress)
        workspaces = self._require_init("load()")
        if path_prefix or path_type:
            self.set_params(self.nodes, path_prefix, path_type)
        await self._ensure_open()
        started = time.perf_counter()
        storage = self._reader
        try:
            index = await read_index(storage, await read_manifest(storage, epoch))
            _check_nodes_present(index, list(workspaces))
            with reporting(progress, sum(index.nodes[node].load_bytes for node in workspaces)):
                node_stats = await restore_workspaces(storage, self._config, index, workspaces)
        except (CheckpointNotFoundError, CheckpointCorruptedError) as exc:
            if await storage.exists(layout.manifest_key(epoch)):
                raise
            raise CheckpointNotFoundError(f"epoch {epoch} is not committed in {storage.url} (deleted?)") from exc
        self._remember(index, storage)
        self._stats.record("checkpoint_load", index, time.perf_counter() - started, storage, node_stats)

    async def load_blobs_locally(
        self, nodes: Any, blob_names: Sequence[str], epoch: int, session: MutableMapping[str, Any]
    ) -> bool:
        """Load the named blobs of ``epoch`` from the listed nodes' shards into ``session``.

        A name is a blob name of one of ``nodes`` (``"total"``), or ``"node/blob"`` to pick
        the node. Names found in no listed shard are skipped; a plain name held by
        several listed nodes is a :class:`ValueError`. Only the requested blobs' bytes
        are fetched, into ``session``'s arrays and tensors of the same dtype and shape
        where it holds some (in place, all or nothing as in :meth:`load`); a
        ``Stateful`` blob comes as its plain state dict. Returns ``False``,
        leaving ``session`` untouched, when the epoch or a listed node's shard does not
        exist.
        """
        node_names, names = partial_request(nodes, blob_names, session)
        layout.validate_epoch(epoch)
        await self._ensure_open()
        started = time.perf_counter()
        storage = self._storage
        self._stats.started("checkpoint_partial_load", epoch)
        try:
            index = await read_index(storage, await read_manifest(storage, epoch))
            if any(node not in index.nodes for node in node_names):
                return False
            node_stats = await restore_partial(storage, self._config, index, node_names, names, session)
        except (CheckpointNotFoundError, CheckpointCorruptedError):
            if await storage.exists(layout.manifest_key(epoch)):
                raise
            return False  # not committed (any more: a delete ran beside us)
        if node_stats is None:
            return False  # a listed node's shard is gone: nothing is loaded
        self._stats.record("checkpoint_partial_load", index, time.perf_counter() - started, storage, node_stats)
        return True

    # ------------------------------------------------------------------ queries

    def get_ckpt_db_name(self, node_name: str, epoch: int) -> str | None:
        """The full URL of ``node_name``'s shard of ``epoch`` as this manager reads or writes it.

        The committed shard once this manager saved, loaded or retrieved the epoch;
        otherwise the key the next ``save(epoch)`` will write. ``None`` for an unknown node.
        """
        layout.validate_epoch(epoch)
        state = self._epochs.get(epoch) or _EpochState()
        if state.known is not None and state.known_in is not None and node_name in state.known.nodes:
            return state.known_in.url_of(state.known.nodes[node_name].shard)
        if node_name not in (self._workspaces or {}):
            return None  # unknown, or another process's node (known once the epoch is committed)
        token = layout.attempt_token(self._token_seed, epoch, state.attempts)
        if len(self.local_nodes) < len(self.nodes):  # a process of a multi-process job
            return self._storage.url_of(layout.shard_key(epoch, self._run_id, node_name, token))
        return self._storage.url_of(layout.shard_key(epoch, layout.solo_writer_id(self._run_id, token), node_name))

    async def get_resume_from_epoch_id(self, user_epoch: int | None = None) -> int | None:
        """The epoch to resume from.

        With ``user_epoch``: that epoch if it is committed, else
        :class:`CheckpointNotFoundError`. Without: the latest committed epoch (an epoch
        whose manifest is damaged is skipped with a warning), or ``None`` if there is
        none. A metadata handler's ``last_epoch`` answer, if any, is checked the same way.
        """
        if user_epoch is not None:
            layout.validate_epoch(user_epoch)
        await self._ensure_open()
        storage = self._reader
        if self._handler is not None:
            answer = await self._handler.last_epoch(user_epoch)
            if answer is None:
                return None
            user_epoch = layout.validate_epoch(answer)
        if user_epoch is not None:
            await read_manifest(storage, user_epoch)
            return user_epoch
        return await latest_committed_epoch(storage)

    async def cp_accessible(self, epoch: int | None = None) -> bool:
        """Whether checkpoints can be reached: a cheap HEAD/list probe that never raises
        for missing, denied or unreachable locations.

        ``epoch=None``: the save location is reachable (bucket exists, credentials work).
        An epoch: it is committed (in the read location) and every shard it names is
        present with the recorded size.
        """
        if epoch is not None:
            layout.validate_epoch(epoch)
        try:
            await self._ensure_open()
            if epoch is None:
                await self._storage.check_root()
            else:
                if not await epoch_is_intact(self._reader, epoch, self._config.max_concurrency):
                    return False
            if self._handler is not None:
                return await self._handler.cp_accessible(epoch)
            return True
        except CheckpointStateError:
            raise
        except CheckpointError as exc:
            log.info("checkpoint location not accessible: %s", exc)
            return False

    # ------------------------------------------------------------------ stats

    async def report_checkpoint_stats(self, action_name: str) -> dict[str, Any]:
        """Stats of the last ``action_name`` (``checkpoint_save``, ``checkpoint_load`` or
        ``checkpoint_partial_load``): per node seconds, bytes, objects, requests,
        retries and shard URL, plus the slowest node. Also handed to the metadata
        handler's ``report``.
        """
        report = self._stats.report(action_name)
        log.debug("checkpoint stats: %s", report)
        if self._handler is not None:
            await self._ensure_open()
            await self._handler.report(action_name, self._stats.report(action_name))
        return report

    def __repr__(self) -> str:
        return f"MultiNodeCheckpointManager({self._db_prefix!r}, nodes={self._node_names}, run_id={self._run_id!r})"


def _check_nodes_present(index: EpochIndex, nodes: Sequence[str]) -> None:
    missing = [n for n in nodes if n not in index.nodes]
    if missing:
        raise CheckpointNotFoundError(
            f"epoch {index.epoch} has no shard for node(s) {missing} (it holds {sorted(index.nodes)})"
        )
