"""``MultiNodeCheckpointManager``: caffe2's multi-node checkpoint manager, on asyncio.

The manager is the only module that knows a job has several nodes. It saves every
node's shard concurrently, commits the epoch with a create-only manifest, and loads
all or nothing. See DESIGN.md section 2 for the contract of each method.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import codec, layout
from ._tasks import run_all, settle_all, shielded
from .codec import EncodedBlob
from .config import TransferConfig
from .errors import (
    CheckpointConflictError,
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointStateError,
    CheckpointTimeoutError,
    combine_node_failures,
)
from .manifest import EpochManifest, NodeRecord, NodeStats
from .node import ShardReader, ShardWriter
from .storage import PATH_TYPES, Storage, parse_location, storage_for
from .storage._base import ByteBudget, ObjectInfo, collect_request_stats, validate_key

__all__ = ["ACTIONS", "GcReport", "MetadataHandler", "MultiNodeCheckpointManager", "SaveHandle"]

log = logging.getLogger("asyncckpt")

#: Action names of :meth:`MultiNodeCheckpointManager.report_checkpoint_stats` (as in caffe2).
ACTIONS = ("checkpoint_save", "checkpoint_load", "checkpoint_partial_load")
DB_TYPES = ("msgpack",)


@runtime_checkable
class MetadataHandler(Protocol):
    """caffe2's duck-typed metadata handler, made async (plain methods work too).

    The manager always keeps its JSON manifests in the bucket; a handler mirrors
    checkpoint metadata elsewhere and may steer which epoch to resume from.
    """

    def set_params(
        self, db_prefix: str, db_type: str, node_names: list[str], path_prefix: str | None, path_type: str | None
    ) -> Any: ...

    def write(self, epoch: int) -> Any: ...

    def last_epoch(self, user_epoch: int | None = None) -> Any: ...

    def cp_accessible(self, epoch: int | None = None) -> Any: ...

    def report(self, action_name: str, stats: dict[str, Any]) -> Any: ...


_HANDLER_METHODS = ("set_params", "write", "last_epoch", "cp_accessible", "report")


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@dataclass(frozen=True)
class _Known:
    """A manifest this manager wrote or read, and the storage it lives in."""

    manifest: EpochManifest
    storage: Storage


@dataclass(frozen=True)
class GcReport:
    """What :meth:`MultiNodeCheckpointManager.gc` deleted (or, in a dry run, would delete)."""

    deleted: list[str]
    aborted_uploads: list[str]
    kept_recent: int
    skipped_epochs: list[int]
    dry_run: bool


_COMMIT = b"commit"
_ABORT = b"abort"


@dataclass
class _EpochListing:
    has_manifest: bool = False
    has_decision: bool = False
    receipts: dict[str, str] = field(default_factory=dict)


def _empty_report(action: str) -> dict[str, Any]:
    return {"action": action, "epoch": None, "nodes": {}, "slowest_node": None, "seconds": 0.0, "bytes": 0}


class SaveHandle:
    """The pending commit of :meth:`MultiNodeCheckpointManager.save_async`.

    ``await handle`` (or ``await handle.wait()``) returns once the epoch is committed
    and raises the save's error otherwise. Cancelling a waiter does not cancel the
    save; :meth:`cancel` does.
    """

    def __init__(self, epoch: int, task: asyncio.Task[None], blocking_seconds: float):
        self.epoch = epoch
        #: how long ``save_async`` held the caller (the snapshot), in seconds
        self.blocking_seconds = blocking_seconds
        self._task = task
        self._seen = False
        self._waiters = 0

    def done(self) -> bool:
        return self._task.done()

    def cancel(self) -> bool:
        """Cancel the background save (the epoch is then not committed)."""
        return self._task.cancel()

    async def wait(self) -> None:
        self._waiters += 1
        try:
            await asyncio.shield(self._task)
        finally:
            self._waiters -= 1
            if self._task.done():
                self._seen = True

    def __await__(self) -> Any:
        return self.wait().__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "in flight"
        return f"<SaveHandle epoch={self.epoch} {state}>"


def _snapshot_encode_all(
    workspaces: Mapping[str, Mapping[str, Any]], staging: dict[str, dict[str, np.ndarray[Any, Any]]]
) -> dict[str, list[EncodedBlob]]:
    """Copy arrays into (reused) staging buffers and encode every node: after this
    returns, nothing refers to the caller's mutable objects. Runs in a worker thread."""
    encoded = {}
    for node, blobs in workspaces.items():
        stage = staging.setdefault(node, {})
        frozen: dict[str, Any] = {}
        for name, value in blobs.items():
            if isinstance(value, np.ndarray):
                order = "F" if value.flags.f_contiguous and not value.flags.c_contiguous else "C"
                buf = stage.get(name)
                if (
                    buf is None
                    or buf.shape != value.shape
                    or buf.dtype != value.dtype
                    or (order == "F" and not buf.flags.f_contiguous)
                ):
                    buf = np.empty(value.shape, value.dtype, order=order)
                    stage[name] = buf
                np.copyto(buf, value)
                frozen[name] = buf
            elif isinstance(value, (bytearray, memoryview)):
                frozen[name] = bytes(value)
            else:
                frozen[name] = value  # immutable, or packed into new bytes by the encoder
        for stale in set(stage) - set(frozen):
            del stage[stale]
        encoded[node] = codec.encode_blobs(node, frozen)
    for stale in set(staging) - set(workspaces):
        del staging[stale]
    return encoded


class MultiNodeCheckpointManager:
    """Checkpoints the workspaces of several nodes to S3, a local directory or memory.

    ``db_prefix`` is the location: ``"s3://bucket/prefix"``, ``"file:///abs/dir"`` or a
    plain path, or ``"memory://name"``. ``db_type`` names the shard encoding
    (``"msgpack"``). ``metadata_handler`` is an optional :class:`MetadataHandler`.
    ``storage_options`` go to the backend (S3: ``endpoint_url``, ``region_name``,
    credentials, ``addressing_style``...); ``config`` sets limits, part sizes, retries
    and client settings (:class:`~asyncckpt.TransferConfig`); ``run_id`` names this job
    incarnation in the keys it writes (random by default).

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
    ):
        if db_type not in DB_TYPES:
            raise ValueError(f"unknown db_type {db_type!r}; supported: {DB_TYPES}")
        if metadata_handler is not None:
            missing = [m for m in _HANDLER_METHODS if not callable(getattr(metadata_handler, m, None))]
            if missing:
                raise TypeError(f"metadata_handler lacks method(s) {missing} of the MetadataHandler protocol")
        if config is not None and not isinstance(config, TransferConfig):
            raise TypeError(f"config must be a TransferConfig, got {type(config).__name__}")
        self._db_prefix = db_prefix
        self._db_type = db_type
        self._handler = metadata_handler
        self._storage_options = dict(storage_options or {})
        self._config = config or TransferConfig()
        self._run_id = layout.validate_run_id(run_id) if run_id is not None else layout.new_run_id()
        self._storage = storage_for(db_prefix, options=self._storage_options, config=self._config)
        self._read_storage: Storage | None = None
        self._path_prefix: str | None = None
        self._path_type: str | None = None
        self._node_names: list[str] | None = None
        self._workspaces: dict[str, MutableMapping[str, Any]] | None = None
        self._handler_params_sent = False
        self._open_lock: asyncio.Lock | None = None
        self._opened: list[Storage] = []
        self._closed = False
        self._budget: ByteBudget | None = None
        self._known: dict[int, _Known] = {}
        self._pending_writer: dict[int, str] = {}
        self._staged: dict[int, EpochManifest] = {}
        self._committed_here: set[int] = set()
        self._reports: dict[str, dict[str, Any]] = {}
        self._inflight: SaveHandle | None = None
        self._failed_unseen: list[SaveHandle] = []
        self._staging_free: list[dict[str, dict[str, np.ndarray[Any, Any]]]] = []

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
            await self._wait_inflight(raise_failures=False)
        finally:
            self._closed = True
            opened, self._opened = self._opened, []
            for storage in opened:
                await storage.close()
            self._staging_free.clear()
        self._raise_unseen_failure()

    async def _ensure_open(self) -> None:
        if self._closed:
            raise CheckpointStateError("this MultiNodeCheckpointManager is closed")
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._budget is None:
                self._budget = ByteBudget(self._config.max_bytes_in_flight)
            for storage in (self._storage, self._read_storage):
                if storage is not None and storage not in self._opened:
                    await storage.open()
                    self._opened.append(storage)
        if self._handler is not None and not self._handler_params_sent and self._node_names is not None:
            self._handler_params_sent = True
            await _maybe_await(
                self._handler.set_params(
                    db_prefix=self._db_prefix,
                    db_type=self._db_type,
                    node_names=list(self._node_names),
                    path_prefix=self._path_prefix,
                    path_type=self._path_type,
                )
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

    def workspace(self, node: str) -> MutableMapping[str, Any]:
        """The mapping holding ``node``'s blobs; :meth:`load` writes into this same object."""
        if self._workspaces is None:
            raise CheckpointStateError("init(nodes) must be called before workspace()")
        try:
            return self._workspaces[node]
        except KeyError:
            raise KeyError(f"unknown node {node!r}; nodes are {self.nodes}") from None

    # ------------------------------------------------------------------ parameters

    @staticmethod
    def _normalize_nodes(nodes: Any) -> dict[str, MutableMapping[str, Any]]:
        if isinstance(nodes, (str, bytes)):
            raise TypeError(f"nodes must be a sequence of node names or a mapping, not a single {type(nodes).__name__}")
        if isinstance(nodes, Mapping):
            pairs = list(nodes.items())
        elif isinstance(nodes, Iterable):
            pairs = [(name, None) for name in nodes]
        else:
            raise TypeError(f"nodes must be a sequence of node names or a mapping, got {type(nodes).__name__}")
        if not pairs:
            raise ValueError("nodes must name at least one node")
        out: dict[str, MutableMapping[str, Any]] = {}
        for name, workspace in pairs:
            layout.validate_node_name(name)
            if name in out:
                raise ValueError(f"duplicate node name {name!r}")
            if workspace is None:
                workspace = {}
            elif not isinstance(workspace, MutableMapping):
                raise TypeError(f"workspace of node {name!r} must be a MutableMapping, got {type(workspace).__name__}")
            out[name] = workspace
        return out

    def set_params(self, nodes: Any, path_prefix: str | None = None, path_type: str | None = None) -> None:
        """Store the node names, and ``path_prefix``/``path_type`` when they are truthy.

        ``path_prefix`` re-roots reads (``init(retrieve_from_epoch)``, ``load``, resume
        and ``cp_accessible(epoch)``) to another location; saves keep going to
        ``db_prefix``. Invalid values raise before anything changes.
        """
        names = list(self._normalize_nodes(nodes))
        if self._node_names is not None and names != self._node_names:
            raise CheckpointStateError(f"this manager already manages nodes {self._node_names}; got {names}")
        new_type = path_type or self._path_type
        new_prefix = path_prefix or self._path_prefix
        if path_type and path_type not in PATH_TYPES:
            raise ValueError(f"unknown path_type {path_type!r}; expected one of {PATH_TYPES}")
        read_storage = self._read_storage
        if new_prefix and (new_prefix != self._path_prefix or new_type != self._path_type):
            kind = parse_location(new_prefix, new_type)[0]
            same_kind = kind == self._storage.kind
            options = self._storage_options if same_kind else {}
            read_storage = storage_for(new_prefix, new_type, options=options, config=self._config)
            if read_storage.url == self._storage.url and same_kind:
                read_storage = None
        self._node_names = names
        self._path_prefix, self._path_type = new_prefix, new_type
        self._read_storage = read_storage
        self._handler_params_sent = False

    @property
    def _reader(self) -> Storage:
        return self._read_storage or self._storage

    def _require_init(self, what: str) -> dict[str, MutableMapping[str, Any]]:
        if self._workspaces is None:
            raise CheckpointStateError(f"init(nodes) must be called before {what}")
        return self._workspaces

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
        normalized = self._normalize_nodes(nodes)
        if local_nodes is None:
            local = normalized
        else:
            local = self._normalize_nodes(local_nodes)
            strangers = [n for n in local if n not in normalized]
            if strangers:
                raise ValueError(f"local_nodes {strangers} are not among the job's nodes {list(normalized)}")
            if isinstance(nodes, Mapping):
                local = {n: (ws if isinstance(local_nodes, Mapping) else normalized[n]) for n, ws in local.items()}
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
            manifest = await self._read_manifest(retrieve_from_epoch, self._reader)
            self._check_nodes_present(manifest, list(local))
            self._known[retrieve_from_epoch] = _Known(manifest, self._reader)

    @property
    def local_nodes(self) -> list[str]:
        """The nodes this process holds (all of them unless ``init(local_nodes=...)``)."""
        return list(self._workspaces or [])

    @staticmethod
    def _check_nodes_present(manifest: EpochManifest, nodes: Sequence[str]) -> None:
        missing = [n for n in nodes if n not in manifest.nodes]
        if missing:
            raise CheckpointNotFoundError(
                f"epoch {manifest.epoch} has no shard for node(s) {missing} (it holds {sorted(manifest.nodes)})"
            )

    # ------------------------------------------------------------------ manifests

    async def _read_manifest(self, epoch: int, storage: Storage) -> EpochManifest:
        key = layout.manifest_key(epoch)
        try:
            data = await storage.get(key)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(f"epoch {epoch} is not committed in {storage.url}") from None
        where = storage.url_of(key)
        manifest = EpochManifest.from_json(data, where)
        if manifest.epoch != epoch:
            raise CheckpointCorruptedError(f"{where}: manifest says epoch {manifest.epoch}")
        prefix = layout.epoch_dir(epoch)
        for node, record in manifest.nodes.items():
            for key_ in (record.shard, record.receipt):
                try:
                    validate_key(key_)
                except ValueError:
                    raise CheckpointCorruptedError(f"{where}: node {node!r} names an invalid key {key_!r}") from None
                if not key_.startswith(prefix):
                    raise CheckpointCorruptedError(f"{where}: node {node!r} names {key_!r}, outside epoch {epoch}")
        return manifest

    async def _epoch_dirs(self, storage: Storage) -> list[int]:
        """The epochs that have a directory (committed or not), ascending."""
        names = await storage.list_dirs(layout.EPOCHS_DIR + "/")
        return sorted(e for e in (layout.parse_epoch_dir(n) for n in names) if e is not None)

    async def _manifest_or_none(self, epoch: int, storage: Storage) -> EpochManifest | None:
        """The epoch's manifest; ``None`` if it has none (an interrupted save) or if it does
        not parse (logged)."""
        try:
            return await self._read_manifest(epoch, storage)
        except CheckpointNotFoundError:
            return None
        except CheckpointCorruptedError as exc:
            log.warning("skipping epoch %d: %s", epoch, exc)
            return None

    def _writer_id_for(self, epoch: int) -> str:
        if epoch not in self._pending_writer:
            self._pending_writer[epoch] = f"{self._run_id}.{layout.new_attempt_token()}"
        return self._pending_writer[epoch]

    # ------------------------------------------------------------------ save

    async def save(self, epoch: int) -> None:
        """Save every blob of every local node's workspace as of this call, then commit.

        Raises :class:`TypeError` (nothing written) for an unsupported blob,
        :class:`CheckpointConflictError` if the epoch is already committed (or another
        job commits it first), and one error naming every failed node otherwise (a
        :class:`StorageError` when all causes are storage failures). After any failure
        the epoch is not committed by this call and earlier epochs are untouched.

        When the job runs as several processes (``init(local_nodes=...)``), each
        process uploads its nodes' shards and receipts, then waits until every node's
        receipt exists; whichever process gets there first commits, the others see
        their own job's manifest and succeed. If a receipt is still missing after
        ``config.commit_timeout`` seconds, :class:`CheckpointTimeoutError` names the
        missing nodes and the epoch stays uncommitted.
        """
        layout.validate_epoch(epoch)
        workspaces = self._require_init("save()")
        await self._wait_inflight()
        encoded: dict[str, list[EncodedBlob]] = {}
        for node, ws in workspaces.items():
            encoded[node] = await ShardWriter.encode(node, dict(ws))
        await self._save_encoded(epoch, encoded)

    async def save_async(self, epoch: int) -> SaveHandle:
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
        handle (the probe is not worth holding the caller for).
        """
        started = time.perf_counter()
        layout.validate_epoch(epoch)
        workspaces = self._require_init("save_async()")
        await self._wait_inflight()
        await self._ensure_open()
        staging = self._staging_free.pop() if self._staging_free else {}
        current = {node: dict(ws) for node, ws in workspaces.items()}
        try:
            encoded = await asyncio.to_thread(_snapshot_encode_all, current, staging)
        except BaseException:
            self._staging_free.append(staging)
            raise
        task = asyncio.create_task(self._save_encoded(epoch, encoded))
        handle = SaveHandle(epoch, task, time.perf_counter() - started)
        self._inflight = handle

        def finished(_: asyncio.Task[None]) -> None:
            self._staging_free.append(staging)
            if not task.cancelled() and task.exception() is not None:
                self._failed_unseen.append(handle)
                if not handle._waiters:  # nobody is awaiting it: make sure it is seen
                    log.error("background save of epoch %d failed: %s", epoch, task.exception())

        task.add_done_callback(finished)
        return handle

    async def _wait_inflight(self, *, raise_failures: bool = True) -> None:
        handle = self._inflight
        if handle is not None and not handle.done():
            await asyncio.wait([handle._task])
        self._inflight = None
        if raise_failures:
            self._raise_unseen_failure()

    def _raise_unseen_failure(self) -> None:
        unseen = [h for h in self._failed_unseen if not h._seen]
        self._failed_unseen.clear()
        if unseen:
            unseen[0]._seen = True
            exc = unseen[0]._task.exception()
            assert exc is not None
            raise exc

    async def _save_encoded(self, epoch: int, encoded: dict[str, list[EncodedBlob]]) -> None:
        await self._ensure_open()
        if await self._storage.exists(layout.manifest_key(epoch)):
            raise CheckpointConflictError(f"epoch {epoch} is already committed in {self._storage.url}")
        writer_id = self._writer_id_for(epoch)
        self._pending_writer.pop(epoch, None)  # every attempt gets fresh keys
        started = time.perf_counter()
        records = await self._upload_local_nodes(epoch, writer_id, encoded)
        # From here on our receipts may be part of a commit: never delete them.
        manifest = EpochManifest(epoch, writer_id, records, self._db_type)
        if set(records) != set(self._node_names or ()):
            committed, to_commit = await self._agree_on_commit(epoch, writer_id, records, started)
            if committed is not None:  # another process of this job committed it
                self._known[epoch] = _Known(committed, self._storage)
                self._record_report("checkpoint_save", epoch, committed, time.perf_counter() - started)
                return
            assert to_commit is not None
            manifest = to_commit
        self._staged[epoch] = manifest
        try:
            await self.write_checkpoint_metadata(epoch)
        except CheckpointConflictError:
            # another job won: our objects are named by no manifest and never will be
            self._staged.pop(epoch, None)
            if len(records) == len(self._node_names or ()):
                await shielded(self._discard([k for r in records.values() for k in (r.shard, r.receipt)]))
            raise
        except BaseException:
            self._staged.pop(epoch, None)
            raise
        committed = self._known[epoch].manifest
        self._record_report("checkpoint_save", epoch, committed, time.perf_counter() - started)

    async def _upload_local_nodes(
        self, epoch: int, writer_id: str, encoded: dict[str, list[EncodedBlob]]
    ) -> dict[str, NodeRecord]:
        """Upload every local node's shard and receipt; on any failure remove what this
        attempt wrote (best effort) and raise one error naming every failed node."""
        assert self._budget is not None
        budget = self._budget
        written: list[str] = []

        async def save_node(node: str) -> NodeRecord:
            shard = layout.shard_key(epoch, writer_id, node)
            receipt = layout.receipt_key(epoch, writer_id, node)
            written.extend((shard, receipt))
            writer = ShardWriter(self._storage, node, budget)
            return await writer.write(shard, receipt, encoded[node], epoch=epoch, writer_id=writer_id)

        try:
            records, failures = await settle_all(
                {node: save_node(node) for node in encoded}, self._config.max_nodes_in_flight
            )
            if failures:
                raise combine_node_failures(f"save of epoch {epoch}", failures)
        except BaseException:
            await shielded(self._discard(written))
            raise
        return {node: records[node] for node in encoded}

    async def _agree_on_commit(
        self, epoch: int, writer_id: str, local: Mapping[str, NodeRecord], started: float
    ) -> tuple[EpochManifest | None, EpochManifest | None]:
        """Multi-process save: wait until every node of the job has a receipt, then agree,
        through one create-only *decision* object per job and epoch, to commit or abort.

        Returns ``(committed manifest, None)`` when this job's manifest already exists,
        or ``(None, manifest to write)`` once the job decided to commit (any process
        may then write the manifest: create-only, so one write wins and the others see
        their own job's manifest). At the deadline a process decides "abort", so a
        straggler can never commit an epoch the others gave up on; it raises
        :class:`CheckpointTimeoutError`. A manifest of another job raises
        :class:`CheckpointConflictError`.
        """
        deadline = started + self._config.commit_timeout
        decision_key = layout.decision_key(epoch, self._run_id)
        nodes = list(self._node_names or ())
        delay = 0.02
        while True:
            listing = await self._epoch_listing(epoch)
            if listing.has_manifest:
                existing = await self._read_manifest(epoch, self._storage)
                if existing.run_id != self._run_id:
                    raise CheckpointConflictError(f"epoch {epoch} was committed first by writer {existing.writer_id}")
                return existing, None
            missing = [n for n in nodes if n not in local and n not in listing.receipts]
            decision = await self._read_decision(decision_key) if listing.has_decision else None
            if decision is None and not missing:
                decision = await self._decide(decision_key, _COMMIT)
            elif decision is None and time.perf_counter() >= deadline:
                decision = await self._decide(decision_key, _ABORT)
                if decision == _ABORT:
                    raise CheckpointTimeoutError(
                        f"epoch {epoch} not committed: no receipt from node(s) {missing} within "
                        f"{self._config.commit_timeout:g} s (their process may have crashed)",
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
            await self._storage.put(key, decision, create_only=True)
            return decision
        except CheckpointConflictError:
            standing = await self._read_decision(key)
            assert standing is not None
            return standing

    async def _read_decision(self, key: str) -> bytes | None:
        try:
            data = await self._storage.get(key)
        except CheckpointNotFoundError:
            return None
        if data not in (_COMMIT, _ABORT):
            raise CheckpointCorruptedError(f"{self._storage.url_of(key)}: not a commit decision")
        return data

    async def _epoch_listing(self, epoch: int) -> _EpochListing:
        """One listing of the epoch's directory: manifest, this job's decision, and this
        job's receipt key per node (the newest attempt of each node)."""
        listing = _EpochListing()
        newest: dict[str, tuple[float, str]] = {}
        manifest_key = layout.manifest_key(epoch)
        decision_key = layout.decision_key(epoch, self._run_id)
        async for info in self._storage.list(layout.epoch_dir(epoch)):
            if info.key == manifest_key:
                listing.has_manifest = True
            elif info.key == decision_key:
                listing.has_decision = True
            elif (parsed := layout.parse_receipt_key(info.key)) is not None:
                writer_id, node = parsed
                if layout.split_writer_id(writer_id)[0] == self._run_id:
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
        remote = [n for n in self._node_names or () if n not in local]

        async def read(node: str) -> NodeRecord:
            where = self._storage.url_of(receipts[node])
            got_epoch, _, record = NodeRecord.from_receipt(await self._storage.get(receipts[node]), where)
            if got_epoch != epoch or record.node != node or record.receipt != receipts[node]:
                raise CheckpointCorruptedError(f"{where}: receipt does not describe node {node!r} of epoch {epoch}")
            return record

        for node, record in zip(remote, await run_all(read(n) for n in remote)):
            records[node] = record
        return EpochManifest(epoch, writer_id, {n: records[n] for n in self._node_names or ()}, self._db_type)

    async def _discard(self, keys: list[str]) -> None:
        """Best-effort removal of an uncommitted attempt's objects (gc catches the rest)."""
        if not keys:
            return
        try:
            await self._storage.delete(keys)
        except CheckpointError as exc:
            log.warning("could not remove %d object(s) of a failed save: %s", len(keys), exc)

    async def write_checkpoint_metadata(self, epoch: int) -> None:
        """Commit ``epoch``: write its manifest create-only, then tell the metadata handler.

        :meth:`save` calls this itself; calling it again for an epoch this manager
        committed is a no-op. A manifest written by another writer first raises
        :class:`CheckpointConflictError`; our own retried write is recognised by its
        writer id and is success.
        """
        layout.validate_epoch(epoch)
        if epoch in self._committed_here and epoch not in self._staged:
            return
        manifest = self._staged.get(epoch)
        if manifest is None:
            raise CheckpointStateError(f"no saved shards of epoch {epoch} to commit; call save({epoch})")
        await self._ensure_open()
        key = layout.manifest_key(epoch)
        try:
            await self._storage.put(key, manifest.to_json(), create_only=True)
        except CheckpointConflictError:
            try:
                existing = await self._read_manifest(epoch, self._storage)
            except CheckpointError:
                existing = None
            if existing is None or existing.run_id != manifest.run_id:
                other = existing.writer_id if existing is not None else "an unknown writer"
                raise CheckpointConflictError(f"epoch {epoch} was committed first by writer {other}") from None
            # Our own job's manifest: either our PUT succeeded and its response was lost
            # (the retry saw our manifest), or another process of this job committed.
            self._staged.pop(epoch, None)
            self._committed_here.add(epoch)
            self._known[epoch] = _Known(existing, self._storage)
            if existing.writer_id != manifest.writer_id:
                return  # the committing process tells the metadata handler
        self._staged.pop(epoch, None)
        self._committed_here.add(epoch)
        self._known[epoch] = _Known(manifest, self._storage)
        if self._handler is not None:
            try:
                await _maybe_await(self._handler.write(epoch=epoch))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise CheckpointError(
                    f"epoch {epoch} is committed, but the metadata handler's write failed: {type(exc).__name__}: {exc}"
                ) from exc

    # ------------------------------------------------------------------ load

    async def load(self, epoch: int, path_prefix: str | None = None, path_type: str | None = None) -> None:
        """Restore every node's blobs of ``epoch`` into its workspace, all or nothing.

        Everything is fetched and verified before any workspace changes; on any error
        every workspace is as it was. Loaded blobs replace same-named entries; other
        entries are left alone.
        """
        layout.validate_epoch(epoch)
        workspaces = self._require_init("load()")
        if path_prefix or path_type:
            self.set_params(self.nodes, path_prefix, path_type)
        await self._ensure_open()
        started = time.perf_counter()
        storage = self._reader
        manifest = await self._read_manifest(epoch, storage)
        self._check_nodes_present(manifest, list(workspaces))

        async def load_node(node: str) -> tuple[dict[str, Any], NodeStats]:
            t0 = time.perf_counter()
            record = manifest.nodes[node]
            with collect_request_stats() as stats:
                values = await ShardReader(storage, node, record, self._config).read_all()
            return values, NodeStats(time.perf_counter() - t0, record.size, 1, stats.requests, stats.retries)

        results, failures = await settle_all(
            {node: load_node(node) for node in workspaces}, self._config.max_nodes_in_flight
        )
        if failures:
            raise combine_node_failures(f"load of epoch {epoch}", failures)
        for node, (values, _) in results.items():
            workspaces[node].update(values)
        self._known[epoch] = _Known(manifest, storage)
        node_stats = {node: stats for node, (_, stats) in results.items()}
        self._record_report("checkpoint_load", epoch, manifest, time.perf_counter() - started, node_stats, storage)

    async def load_blobs_locally(
        self, nodes: Any, blob_names: Sequence[str], epoch: int, session: MutableMapping[str, Any]
    ) -> bool:
        """Load the named blobs of ``epoch`` from the listed nodes' shards into ``session``.

        A name is a blob name of one of ``nodes`` (``"total"``), or ``"node/blob"`` to pick
        the node. Names found in no listed shard are skipped; a plain name held by
        several listed nodes is a :class:`ValueError`. Only the requested blobs' bytes
        are fetched. Returns ``False``, leaving ``session`` untouched, when the epoch or
        a listed node's shard does not exist.
        """
        node_names = list(self._normalize_nodes(nodes))
        if isinstance(blob_names, (str, bytes)) or not isinstance(blob_names, Iterable):
            raise TypeError("blob_names must be a sequence of blob names")
        names = list(blob_names)
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(f"blob names must be non-empty str, got {name!r}")
        layout.validate_epoch(epoch)
        if not isinstance(session, MutableMapping):
            raise TypeError(f"session must be a MutableMapping, got {type(session).__name__}")
        await self._ensure_open()
        started = time.perf_counter()
        self._reports["checkpoint_partial_load"] = {**_empty_report("checkpoint_partial_load"), "epoch": epoch}
        try:
            manifest = await self._read_manifest(epoch, self._storage)
        except CheckpointNotFoundError:
            return False
        if any(node not in manifest.nodes for node in node_names):
            return False
        readers = {node: ShardReader(self._storage, node, manifest.nodes[node], self._config) for node in node_names}
        shards = await run_all(self._storage.head(manifest.nodes[node].shard) for node in node_names)
        if any(info is None for info in shards):
            return False  # a listed node's shard is gone: nothing is loaded
        for node, info in zip(node_names, shards):
            assert info is not None
            readers[node].check_size(info.size)
        plan: dict[str, dict[str, str]] = {}  # node -> {blob name: session key}
        for name in names:
            hits = [(node, name) for node in node_names if name in manifest.nodes[node].blobs]
            if not hits and "/" in name:
                node, _, blob = name.partition("/")
                if node in node_names and blob in manifest.nodes[node].blobs:
                    hits = [(node, blob)]
            if len(hits) > 1:
                raise ValueError(
                    f"blob {name!r} exists on nodes {[n for n, _ in hits]}; name it as 'node/{name}' to pick one"
                )
            for node, blob in hits:
                plan.setdefault(node, {})[blob] = name

        async def load_node(node: str) -> tuple[dict[str, Any], NodeStats]:
            t0 = time.perf_counter()
            record = manifest.nodes[node]
            with collect_request_stats() as stats:
                values = await readers[node].read_some(plan[node])
            nbytes = sum(record.blobs[b].length for b in plan[node])
            return values, NodeStats(time.perf_counter() - t0, nbytes, 1, stats.requests, stats.retries)

        results, failures = await settle_all({node: load_node(node) for node in plan}, self._config.max_nodes_in_flight)
        if failures:
            raise combine_node_failures(f"partial load of epoch {epoch}", failures)
        for node, (values, _) in results.items():
            for blob, value in values.items():
                session[plan[node][blob]] = value
        node_stats = {node: stats for node, (_, stats) in results.items()}
        self._record_report(
            "checkpoint_partial_load", epoch, manifest, time.perf_counter() - started, node_stats, self._storage
        )
        return True

    # ------------------------------------------------------------------ queries

    def get_ckpt_db_name(self, node_name: str, epoch: int) -> str | None:
        """The full URL of ``node_name``'s shard of ``epoch`` as this manager reads or writes it.

        The committed shard once this manager saved, loaded or retrieved the epoch;
        otherwise the key the next ``save(epoch)`` will write. ``None`` for an unknown node.
        """
        layout.validate_epoch(epoch)
        known = self._known.get(epoch)
        if known is not None and node_name in known.manifest.nodes:
            return known.storage.url_of(known.manifest.nodes[node_name].shard)
        if node_name not in (self._workspaces or {}):
            return None  # unknown, or another process's node (known once the epoch is committed)
        return self._storage.url_of(layout.shard_key(epoch, self._writer_id_for(epoch), node_name))

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
            answer = await _maybe_await(self._handler.last_epoch(user_epoch=user_epoch))
            if answer is None:
                return None
            user_epoch = layout.validate_epoch(answer)
        if user_epoch is not None:
            await self._read_manifest(user_epoch, storage)
            return user_epoch
        for epoch in reversed(await self._epoch_dirs(storage)):
            if await self._manifest_or_none(epoch, storage) is not None:
                return epoch
        return None

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
                storage = self._reader
                manifest = await self._read_manifest(epoch, storage)
                infos = await run_all(storage.head(r.shard) for r in manifest.nodes.values())
                if any(info is None or info.size != r.size for info, r in zip(infos, manifest.nodes.values())):
                    return False
            if self._handler is not None:
                return bool(await _maybe_await(self._handler.cp_accessible(epoch)))
            return True
        except CheckpointStateError:
            raise
        except CheckpointError as exc:
            log.info("checkpoint location not accessible: %s", exc)
            return False

    # ------------------------------------------------------------------ housekeeping

    async def committed_manifests(self) -> list[EpochManifest]:
        """The manifest of every committed epoch in the save location, by epoch.

        An epoch directory without a manifest (an interrupted save) is left out, and so,
        with a warning, is one whose manifest does not parse.
        """
        await self._ensure_open()
        epochs = await self._epoch_dirs(self._storage)
        found, failures = await settle_all(
            {str(e): self._manifest_or_none(e, self._storage) for e in epochs}, self._config.max_concurrency
        )
        if failures:
            raise combine_node_failures("reading the manifests", failures)
        return [manifest for e in epochs if (manifest := found[str(e)]) is not None]

    async def committed_epochs(self) -> list[int]:
        """Every committed epoch in the save location (manifest present and valid), ascending."""
        return [manifest.epoch for manifest in await self.committed_manifests()]

    async def gc(self, *, grace_period: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Remove the leftovers of interrupted or losing saves in the save location.

        Deleted: objects of uncommitted epochs, and objects of committed epochs that
        their manifest does not name (a failed attempt, a concurrent loser), when older
        than ``grace_period`` seconds (a save may still be running); unfinished
        multipart uploads older than that are aborted. Never touched: a committed
        epoch's manifest and the shards and receipts it names, and any epoch whose
        manifest exists but does not parse (reported in ``skipped_epochs``).
        With ``dry_run`` nothing is deleted; the report lists what would be.
        """
        if not isinstance(grace_period, (int, float)) or isinstance(grace_period, bool) or grace_period < 0:
            raise ValueError(f"grace_period must be a non-negative number of seconds, got {grace_period!r}")
        await self._ensure_open()
        storage = self._storage
        cutoff = time.time() - grace_period
        by_epoch: dict[int, list[ObjectInfo]] = {}
        async for info in storage.list(layout.EPOCHS_DIR + "/"):
            epoch = layout.parse_epoch_dir(info.key.split("/")[1]) if info.key.count("/") >= 2 else None
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
                    manifest = await self._read_manifest(epoch, storage)
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

    # ------------------------------------------------------------------ stats

    def _record_report(
        self,
        action: str,
        epoch: int,
        manifest: EpochManifest,
        seconds: float,
        node_stats: Mapping[str, NodeStats] | None = None,
        storage: Storage | None = None,
    ) -> None:
        storage = storage or self._storage
        if node_stats is None:
            node_stats = {node: record.stats for node, record in manifest.nodes.items()}
        nodes = {
            node: {**stats.to_json(), "db_name": storage.url_of(manifest.nodes[node].shard)}
            for node, stats in node_stats.items()
        }
        slowest = max(nodes, key=lambda n: nodes[n]["seconds"]) if nodes else None
        self._reports[action] = {
            "action": action,
            "epoch": epoch,
            "nodes": nodes,
            "slowest_node": slowest,
            "seconds": round(seconds, 6),
            "bytes": sum(n["bytes"] for n in nodes.values()),
        }

    async def report_checkpoint_stats(self, action_name: str) -> dict[str, Any]:
        """Stats of the last ``action_name`` (``checkpoint_save``, ``checkpoint_load`` or
        ``checkpoint_partial_load``): per node seconds, bytes, objects, requests,
        retries and shard URL, plus the slowest node. Also handed to the metadata
        handler's ``report``.
        """
        if action_name not in ACTIONS:
            raise ValueError(f"unknown action {action_name!r}; expected one of {ACTIONS}")
        report = copy.deepcopy(self._reports.get(action_name) or _empty_report(action_name))
        log.debug("checkpoint stats: %s", report)
        if self._handler is not None:
            await self._ensure_open()
            await _maybe_await(self._handler.report(action_name, copy.deepcopy(report)))
        return report

    def __repr__(self) -> str:
        return f"MultiNodeCheckpointManager({self._db_prefix!r}, nodes={self._node_names}, run_id={self._run_id!r})"
