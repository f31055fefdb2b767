"""The records of the bucket format: versioned, human-readable JSON.

Four records, from the smallest up (format version 2; see DESIGN.md):

* :class:`EpochManifest` (``epochs/<epoch>/manifest.json``): the commit record. An epoch
  exists if and only if it exists and parses. Its size does not grow with the number of
  nodes or blobs: it names the epoch's index and keeps totals (and the user's metrics).
* :class:`EpochIndex` (``epochs/<epoch>/<writer>/index.json``): one :class:`NodeRecord`
  per node (shard key, size, CRC32C, stats). It is read only by loads and checks. The
  blob index of a node lives in its shard's own trailer (:mod:`.codec`).
* :class:`NodeRecord` receipts (``<writer>/<node>.receipt.json``): one node's record,
  written by a process of a multi-process job for the one that commits.
* :class:`Decision` (``epochs/<epoch>/<writer>.decision``): a writer's create-only verdict
  on its attempt: ``commit`` (carrying the manifest to publish), ``abort`` (the job gave
  up at its deadline) or ``abandoned`` (gc claimed the attempt to delete it).

Format 3 (incremental saves): a node's record may name, in ``refs``, objects of other
epochs that hold some of its blobs (each with its size), and ``base``, the committed
epoch those pointers were taken from. Records are written as version 3 exactly when
they (or, for an index, a manifest or a decision, any of their nodes) carry ``refs``,
and as version 2 otherwise, so that a location saved without reuse stays readable by
format 2 readers; a format 2 reader refuses a version 3 record by its version.

Format 4 (reuse per leaf): a node's record says ``leaf_refs`` when leaves of its tree
blobs point at objects of other epochs (:mod:`.codec`); such records, and the indexes,
manifests and decisions holding one, are written as version 4, which a format 3 reader
refuses by its version (it would take a leaf's absolute offset in another object for
one in the blob's span). Format 1 manifests (the whole index inline) are still read.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import codec
from .errors import CheckpointCorruptedError, CheckpointNotFoundError
from .layout import (
    SHARD_SUFFIX,
    epoch_dir,
    epoch_of_key,
    manifest_key,
    split_writer_id,
    validate_epoch,
    validate_node_name,
)
from .storage import Storage, validate_key

__all__ = [
    "MANIFEST_VERSION",
    "Decision",
    "EpochIndex",
    "EpochManifest",
    "EpochRef",
    "NodeRecord",
    "NodeStats",
    "ObjectRef",
    "check_metrics",
    "manifest_or_none",
    "read_index",
    "read_manifest",
]

log = logging.getLogger("asyncckpt")

MANIFEST_FORMAT = "asyncckpt/manifest"
INDEX_FORMAT = "asyncckpt/index"
RECEIPT_FORMAT = "asyncckpt/receipt"
DECISION_FORMAT = "asyncckpt/decision"
MANIFEST_VERSION = 4  # the newest format: tree leaves may point at objects of other epochs
_SHARED_VERSION = 3  # records whose blobs (whole) point at objects of other epochs
_PLAIN_VERSION = 2  # records without such pointers are still written as version 2
_RECORD_VERSIONS = (_PLAIN_VERSION, _SHARED_VERSION, MANIFEST_VERSION)  # of indexes, receipts, decisions
VERDICTS = ("commit", "abort", "abandoned")


def _version(shared: bool, leaf_refs: bool = False) -> int:
    """The version a record is written as: 4 if leaves of its trees point at objects of
    other epochs, 3 if only whole blobs do, else 2."""
    return MANIFEST_VERSION if leaf_refs else _SHARED_VERSION if shared else _PLAIN_VERSION


@dataclass(frozen=True)
class NodeStats:
    """What saving (or loading) one node cost."""

    seconds: float = 0.0
    bytes: int = 0
    objects: int = 0
    requests: int = 0
    retries: int = 0
    reused_bytes: int = 0  # a save: payload bytes it pointed at in earlier epochs instead of uploading

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 6),
            "bytes": self.bytes,
            "reused_bytes": self.reused_bytes,
            "objects": self.objects,
            "requests": self.requests,
            "retries": self.retries,
        }

    @classmethod
    def from_json(cls, raw: Any) -> NodeStats:
        if not isinstance(raw, Mapping):
            return cls()
        try:
            return cls(
                float(raw.get("seconds", 0.0)),
                int(raw.get("bytes", 0)),
                int(raw.get("objects", 0)),
                int(raw.get("requests", 0)),
                int(raw.get("retries", 0)),
                int(raw.get("reused_bytes", 0)),
            )
        except (TypeError, ValueError, OverflowError):
            return cls()


@dataclass(frozen=True)
class ObjectRef:
    """An object of another epoch that holds some of a node's blobs, and its size."""

    key: str
    size: int


@dataclass(frozen=True)
class EpochRef:
    """One writer's commit of an epoch: the epoch an incremental save builds on."""

    epoch: int
    writer_id: str


@dataclass(frozen=True)
class NodeRecord:
    """One node's shard in a committed (or about to be committed) epoch.

    ``refs`` (format 3): the objects of other epochs holding the blobs whose shard index
    entry says ``ref`` (an index into ``refs``); ``base``: the committed epoch they were
    taken from, which the save checks is still committed before it decides to commit.
    """

    node: str
    shard: str
    size: int
    crc32c: int
    stats: NodeStats = field(default_factory=NodeStats)
    receipt: str | None = None  # the node's receipt object, when its save wrote one
    index_crc32c: int | None = None  # CRC32C of the shard's blob index (format 1: not recorded)
    refs: tuple[ObjectRef, ...] = ()
    base: EpochRef | None = None
    leaf_refs: bool = False  # format 4: leaves of its trees point into ``refs`` too

    @property
    def version(self) -> int:
        """The record format this record needs (2, 3 or 4)."""
        return _version(bool(self.refs), self.leaf_refs)

    @property
    def keys(self) -> tuple[str, ...]:
        """The objects of this node that a committed epoch keeps."""
        return (self.shard,) if self.receipt is None else (self.shard, self.receipt)

    @property
    def load_bytes(self) -> int:
        """The bytes a whole load of this node reads: its shard and the bytes of other
        epochs' objects its blobs point at."""
        return self.size + self.stats.reused_bytes

    @property
    def referenced(self) -> tuple[str, ...]:
        """The objects of other epochs this node's blobs live in too."""
        return tuple(ref.key for ref in self.refs)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shard": self.shard, "size": self.size, "crc32c": self.crc32c}
        if self.index_crc32c is not None:
            out["index_crc32c"] = self.index_crc32c
        if self.receipt is not None:
            out["receipt"] = self.receipt
        if self.refs:
            out["refs"] = [{"key": ref.key, "size": ref.size} for ref in self.refs]
            if self.base is not None:
                out["base"] = {"epoch": self.base.epoch, "writer_id": self.base.writer_id}
            if self.leaf_refs:
                out["leaf_refs"] = True
        out["stats"] = self.stats.to_json()
        return out

    @classmethod
    def from_json(cls, node: str, raw: Any, where: str) -> NodeRecord:
        try:
            validate_node_name(node)
            if not isinstance(raw, Mapping):
                raise ValueError("node record is not an object")
            shard, size, crc, receipt = raw["shard"], raw["size"], raw["crc32c"], raw.get("receipt")
            index_crc = raw.get("index_crc32c")
            if not isinstance(shard, str) or not (receipt is None or isinstance(receipt, str)):
                raise ValueError("shard and receipt must be keys")
            _check_unsigned(size, crc, *([] if index_crc is None else [index_crc]))
            if crc >= 1 << 32 or (index_crc or 0) >= 1 << 32:
                raise ValueError("crc32c out of range")
            refs, base = _refs(raw.get("refs", [])), _base(raw.get("base"))
            leaf_refs = raw.get("leaf_refs", False)
            if not isinstance(leaf_refs, bool) or (leaf_refs and not refs):
                raise ValueError("bad leaf_refs flag")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointCorruptedError(f"{where}: invalid record of node {node!r}: {exc}") from None
        stats = NodeStats.from_json(raw.get("stats"))
        return cls(node, shard, size, crc, stats, receipt, index_crc, refs, base, leaf_refs)

    def receipt_json(self, epoch: int, writer_id: str) -> bytes:
        body = {"format": RECEIPT_FORMAT, "version": self.version, "epoch": epoch, "writer_id": writer_id}
        body.update(node=self.node, **self.to_json())
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_receipt(cls, data: bytes, where: str) -> tuple[int, str, NodeRecord]:
        """Parse a receipt; returns (epoch, writer id, record)."""
        raw = _load_json(data, where)
        if raw.get("format") != RECEIPT_FORMAT or raw.get("version") not in _RECORD_VERSIONS:
            raise CheckpointCorruptedError(f"{where}: not an asyncckpt receipt of version {_RECORD_VERSIONS}")
        node = raw.get("node")
        if not isinstance(node, str):
            raise CheckpointCorruptedError(f"{where}: receipt names no node")
        return _epoch_of(raw, where), str(raw.get("writer_id")), cls.from_json(node, raw, where)


@dataclass(frozen=True)
class EpochIndex:
    """Every node's record of one epoch's commit."""

    epoch: int
    writer_id: str
    nodes: Mapping[str, NodeRecord]

    @property
    def keys(self) -> set[str]:
        """Every object the nodes' records name."""
        return {key for record in self.nodes.values() for key in record.keys}

    @property
    def referenced(self) -> set[str]:
        """The objects of other epochs the nodes' blobs live in too (format 3)."""
        return {key for record in self.nodes.values() for key in record.referenced}

    @property
    def total_bytes(self) -> int:
        """The size of every node's shard, added up."""
        return sum(record.size for record in self.nodes.values())

    @property
    def reused_bytes(self) -> int:
        """The payload bytes the nodes point at in other epochs' objects, added up."""
        return sum(record.stats.reused_bytes for record in self.nodes.values())

    @property
    def version(self) -> int:
        return max((record.version for record in self.nodes.values()), default=_PLAIN_VERSION)

    def to_json(self) -> bytes:
        body = {
            "format": INDEX_FORMAT,
            "version": self.version,
            "epoch": self.epoch,
            "writer_id": self.writer_id,
            "nodes": {name: record.to_json() for name, record in sorted(self.nodes.items())},
        }
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str, *, epoch: int, writer_id: str) -> EpochIndex:
        """Parse an index that must belong to ``writer_id``'s commit of ``epoch``."""
        raw = _load_json(data, where)
        if raw.get("format") != INDEX_FORMAT or raw.get("version") not in _RECORD_VERSIONS:
            raise CheckpointCorruptedError(f"{where}: not an asyncckpt index of version {_RECORD_VERSIONS}")
        if _epoch_of(raw, where) != epoch or raw.get("writer_id") != writer_id:
            raise CheckpointCorruptedError(f"{where}: index of another commit (not {writer_id!r} of epoch {epoch})")
        return cls(epoch, writer_id, _node_records(raw.get("nodes"), epoch, where))


@dataclass(frozen=True)
class EpochManifest:
    """The commit record of one epoch, small whatever the number of nodes and blobs.

    ``index`` is the key of the epoch's :class:`EpochIndex` (``index_size`` bytes with
    CRC32C ``index_crc32c``); ``node_count``, ``total_bytes`` (the shards' sizes: the
    bytes the save uploaded) and ``reused_bytes`` (the payload bytes its blobs point at in
    other epochs' objects, format 3) are totals over its nodes;
    ``metrics`` are the user's numbers for the epoch.
    """

    epoch: int
    writer_id: str
    index: str
    index_size: int
    index_crc32c: int
    node_count: int
    total_bytes: int
    db_type: str = "msgpack"
    created_unix: float = field(default_factory=time.time)
    metrics: Mapping[str, float] = field(default_factory=dict)
    version: int = MANIFEST_VERSION
    inline_index: EpochIndex | None = field(default=None, repr=False, compare=False)  # format 1
    reused_bytes: int = 0

    @property
    def run_id(self) -> str:
        return split_writer_id(self.writer_id)[0]

    @classmethod
    def for_index(
        cls, index: EpochIndex, key: str, data: bytes, db_type: str, metrics: Mapping[str, float] | None = None
    ) -> EpochManifest:
        """The manifest that commits ``index``, stored under ``key`` as ``data``."""
        return cls(
            index.epoch,
            index.writer_id,
            key,
            len(data),
            codec.checksum(data),
            len(index.nodes),
            index.total_bytes,
            db_type,
            metrics=dict(metrics or {}),
            version=index.version,
            reused_bytes=index.reused_bytes,
        )

    def to_dict(self) -> dict[str, Any]:
        created = datetime.fromtimestamp(self.created_unix, tz=UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "epoch": self.epoch,
            "writer_id": self.writer_id,
            "db_type": self.db_type,
            "created": created,
            "created_unix": self.created_unix,
            "nodes": self.node_count,
            "bytes": self.total_bytes,
            "index": {"key": self.index, "size": self.index_size, "crc32c": self.index_crc32c},
            "metrics": dict(self.metrics),
        }
        if self.version >= _SHARED_VERSION:
            out["reused_bytes"] = self.reused_bytes
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str, *, epoch: int | None = None) -> EpochManifest:
        """Parse and validate a manifest; anything malformed is :class:`CheckpointCorruptedError`.

        Every key it names must be a valid key inside its own epoch's directory; with
        ``epoch``, the manifest must be that epoch's.
        """
        return cls.from_dict(_load_json(data, where), where, epoch=epoch)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str, *, epoch: int | None = None) -> EpochManifest:
        if raw.get("format") != MANIFEST_FORMAT:
            raise CheckpointCorruptedError(f"{where}: not an asyncckpt manifest")
        version = raw.get("version")
        if version not in (1, *_RECORD_VERSIONS):
            raise CheckpointCorruptedError(f"{where}: unsupported manifest version {version!r}")
        found = _epoch_of(raw, where)
        if epoch is not None and found != epoch:
            raise CheckpointCorruptedError(f"{where}: manifest says epoch {found}")
        writer_id, db_type, created = raw.get("writer_id"), raw.get("db_type"), raw.get("created_unix")
        if not isinstance(writer_id, str) or not isinstance(db_type, str):
            raise CheckpointCorruptedError(f"{where}: manifest lacks writer_id or db_type")
        if not isinstance(created, (int, float)) or isinstance(created, bool) or not _finite(created):
            raise CheckpointCorruptedError(f"{where}: manifest lacks a valid created_unix")
        metrics = _metrics(raw.get("metrics", {}), where)
        if version == 1:  # the index inline, with a blob index per node (the shards repeat it)
            index = EpochIndex(found, writer_id, _node_records(raw.get("nodes"), found, where))
            return cls(
                found,
                writer_id,
                "",
                0,
                0,
                len(index.nodes),
                index.total_bytes,
                db_type,
                float(created),
                metrics,
                1,
                index,
            )
        try:
            pointer = raw["index"]
            key, size, crc, count, total = (
                pointer["key"],
                pointer["size"],
                pointer["crc32c"],
                raw["nodes"],
                raw["bytes"],
            )
            reused = raw.get("reused_bytes", 0) if version >= _SHARED_VERSION else 0
            _check_unsigned(size, crc, count, total, reused)
            _check_key(key, found, where)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointCorruptedError(f"{where}: manifest lacks a valid index: {exc}") from None
        return cls(
            found, writer_id, key, size, crc, count, total, db_type, float(created), metrics, version, None, reused
        )


@dataclass(frozen=True)
class Decision:
    """A writer's create-only verdict on its attempt at an epoch (see :mod:`.commit`)."""

    epoch: int
    writer_id: str
    verdict: str  # one of VERDICTS
    manifest: EpochManifest | None = None  # the manifest a "commit" publishes
    reason: str = ""  # why an "abort"
    missing: tuple[str, ...] = ()  # the nodes an "abort" gave up waiting for

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "format": DECISION_FORMAT,
            "version": self.manifest.version if self.manifest is not None else _PLAIN_VERSION,
            "epoch": self.epoch,
            "writer_id": self.writer_id,
            "verdict": self.verdict,
        }
        if self.manifest is not None:
            body["manifest"] = self.manifest.to_dict()
        if self.verdict == "abort":
            body.update(reason=self.reason, missing=list(self.missing))
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str, *, epoch: int, writer_id: str) -> Decision:
        raw = _load_json(data, where)
        if raw.get("format") != DECISION_FORMAT or raw.get("version") not in _RECORD_VERSIONS:
            raise CheckpointCorruptedError(f"{where}: not an asyncckpt decision of version {_RECORD_VERSIONS}")
        verdict = raw.get("verdict")
        if _epoch_of(raw, where) != epoch or raw.get("writer_id") != writer_id or verdict not in VERDICTS:
            raise CheckpointCorruptedError(f"{where}: not a decision of {writer_id!r} on epoch {epoch}")
        manifest = None
        if verdict == "commit":
            body = raw.get("manifest")
            if not isinstance(body, Mapping):
                raise CheckpointCorruptedError(f"{where}: a commit decision without its manifest")
            manifest = EpochManifest.from_dict(body, where, epoch=epoch)
            if manifest.writer_id != writer_id:
                raise CheckpointCorruptedError(f"{where}: decides to commit another writer's manifest")
        reason, missing = raw.get("reason", ""), raw.get("missing", [])
        if not isinstance(reason, str) or not isinstance(missing, list) or not all(isinstance(n, str) for n in missing):
            raise CheckpointCorruptedError(f"{where}: malformed reason or missing nodes")
        return cls(epoch, writer_id, verdict, manifest, reason, tuple(missing))


async def read_manifest(storage: Storage, epoch: int) -> EpochManifest:
    """The committed manifest of ``epoch`` in ``storage``, validated.

    :class:`CheckpointNotFoundError` if the epoch is not committed,
    :class:`CheckpointCorruptedError` if its manifest does not parse.
    """
    key = manifest_key(epoch)
    try:
        data = await storage.get(key)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"epoch {epoch} is not committed in {storage.url}") from None
    return EpochManifest.from_json(data, storage.url_of(key), epoch=epoch)


async def read_index(storage: Storage, manifest: EpochManifest) -> EpochIndex:
    """The node records of a committed epoch, checked against its manifest (size and
    CRC32C of the index object)."""
    if manifest.inline_index is not None:
        return manifest.inline_index
    where = storage.url_of(manifest.index)
    try:
        data = await storage.get(manifest.index)
    except CheckpointNotFoundError:
        raise CheckpointCorruptedError(f"{where}: the index of committed epoch {manifest.epoch} is missing") from None
    if len(data) != manifest.index_size or codec.checksum(data) != manifest.index_crc32c:
        raise CheckpointCorruptedError(f"{where}: index does not match its manifest (size or CRC32C)")
    index = EpochIndex.from_json(data, where, epoch=manifest.epoch, writer_id=manifest.writer_id)
    if len(index.nodes) != manifest.node_count:
        raise CheckpointCorruptedError(f"{where}: index holds {len(index.nodes)} nodes, manifest {manifest.node_count}")
    return index


async def manifest_or_none(storage: Storage, epoch: int) -> EpochManifest | None:
    """The epoch's manifest; ``None`` if it has none (an interrupted save) or if it does
    not parse (logged as a warning)."""
    try:
        return await read_manifest(storage, epoch)
    except CheckpointNotFoundError:
        return None
    except CheckpointCorruptedError as exc:
        log.warning("skipping epoch %d: %s", epoch, exc)
        return None


def _node_records(raw: Any, epoch: int, where: str) -> dict[str, NodeRecord]:
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointCorruptedError(f"{where}: no node records")
    nodes = {str(node): NodeRecord.from_json(str(node), record, where) for node, record in raw.items()}
    for node, record in nodes.items():
        for key in record.keys:
            _check_key(key, epoch, f"{where}: node {node!r}")
        for key in record.referenced:
            _check_shared_key(key, epoch, f"{where}: node {node!r}")
    return nodes


def _refs(raw: Any) -> tuple[ObjectRef, ...]:
    if not isinstance(raw, list):
        raise ValueError("refs must be a list")
    refs = []
    for item in raw:
        if not isinstance(item, Mapping) or not isinstance(item.get("key"), str):
            raise ValueError("a ref must be {key, size}")
        _check_unsigned(item.get("size"))
        refs.append(ObjectRef(item["key"], item["size"]))
    return tuple(refs)


def _base(raw: Any) -> EpochRef | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("writer_id"), str):
        raise ValueError("base must be {epoch, writer_id}")
    return EpochRef(validate_epoch(raw.get("epoch")), raw["writer_id"])


def _check_shared_key(key: str, epoch: int, where: str) -> None:
    """A key a record points at: a valid shard key inside another epoch's directory."""
    try:
        validate_key(key)
    except ValueError:
        raise CheckpointCorruptedError(f"{where} names an invalid key {key!r}") from None
    other = epoch_of_key(key)
    if other is None or other == epoch or not key.endswith(SHARD_SUFFIX):
        raise CheckpointCorruptedError(f"{where} points at {key!r}, not a shard of another epoch")


def _check_key(key: object, epoch: int, where: str) -> None:
    """A key named by a record: valid, and inside its epoch's directory."""
    try:
        if not isinstance(key, str):
            raise ValueError
        validate_key(key)
    except ValueError:
        raise CheckpointCorruptedError(f"{where} names an invalid key {key!r}") from None
    if not key.startswith(epoch_dir(epoch)):
        raise CheckpointCorruptedError(f"{where} names {key!r}, outside epoch {epoch}")


def _check_unsigned(*values: object) -> None:
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"expected a non-negative int, got {value!r}")


def check_metrics(metrics: object) -> dict[str, float]:
    """A user's metrics for an epoch: a mapping of str to finite numbers (not bools).
    :class:`TypeError`/:class:`ValueError` name the offending entry."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"metric names must be non-empty str, got {name!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
        if not _finite(value):
            raise ValueError(f"metric {name!r} must be finite, got {value!r}")
        out[name] = float(value)
    return out


def _metrics(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)
        for k, v in raw.items()
    ):
        raise CheckpointCorruptedError(f"{where}: metrics must map names to finite numbers")
    return {k: float(v) for k, v in raw.items()}


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _load_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointCorruptedError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointCorruptedError(f"{where}: not a JSON object")
    return raw


def _epoch_of(raw: Mapping[str, Any], where: str) -> int:
    try:
        return validate_epoch(raw.get("epoch"))
    except (TypeError, ValueError) as exc:
        raise CheckpointCorruptedError(f"{where}: bad epoch ({exc})") from None
