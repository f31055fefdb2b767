"""Epoch manifests and node receipts: versioned, human-readable JSON.

An epoch exists if and only if its manifest exists and parses. The manifest names,
for every node, the exact shard object, its size and CRC32C, the blob index (offset,
length, encoding, dtype/shape, CRC32C of every blob) and the node's save stats.
A receipt is one node's part of that, written next to its shard before the commit.
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

from .codec import BlobEntry
from .errors import CheckpointCorruptedError, CheckpointNotFoundError
from .layout import epoch_dir, manifest_key, split_writer_id, validate_epoch, validate_node_name
from .storage import Storage
from .storage._base import validate_key

__all__ = ["MANIFEST_VERSION", "EpochManifest", "NodeRecord", "NodeStats", "manifest_or_none", "read_manifest"]

log = logging.getLogger("asyncckpt")

MANIFEST_FORMAT = "asyncckpt/manifest"
RECEIPT_FORMAT = "asyncckpt/receipt"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class NodeStats:
    """What saving (or loading) one node cost."""

    seconds: float = 0.0
    bytes: int = 0
    objects: int = 0
    requests: int = 0
    retries: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 6),
            "bytes": self.bytes,
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
            )
        except (TypeError, ValueError, OverflowError):
            return cls()


@dataclass(frozen=True)
class NodeRecord:
    """One node's shard in a committed (or about to be committed) epoch."""

    node: str
    shard: str
    receipt: str
    size: int
    crc32c: int
    blobs: Mapping[str, BlobEntry]
    stats: NodeStats = field(default_factory=NodeStats)

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "receipt": self.receipt,
            "size": self.size,
            "crc32c": self.crc32c,
            "blobs": {name: entry.to_json() for name, entry in self.blobs.items()},
            "stats": self.stats.to_json(),
        }

    @classmethod
    def from_json(cls, node: str, raw: Any, where: str) -> NodeRecord:
        try:
            validate_node_name(node)
            if not isinstance(raw, Mapping):
                raise ValueError("node record is not an object")
            shard, receipt, size, crc = raw["shard"], raw["receipt"], raw["size"], raw["crc32c"]
            if not isinstance(shard, str) or not isinstance(receipt, str):
                raise ValueError("shard and receipt must be keys")
            for value in (size, crc):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError("size and crc32c must be non-negative ints")
            blobs_raw = raw["blobs"]
            if not isinstance(blobs_raw, Mapping):
                raise ValueError("blobs must be an object")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointCorruptedError(f"{where}: invalid record of node {node!r}: {exc}") from None
        blobs = {
            str(name): BlobEntry.from_json(entry, f"{where} node {node!r} blob {name!r}")
            for name, entry in blobs_raw.items()
        }
        for name, entry in blobs.items():
            if entry.offset + entry.length > size:
                raise CheckpointCorruptedError(f"{where}: node {node!r} blob {name!r} lies outside its shard")
        return cls(node, shard, receipt, size, crc, blobs, NodeStats.from_json(raw.get("stats")))

    def receipt_json(self, epoch: int, writer_id: str) -> bytes:
        body = {
            "format": RECEIPT_FORMAT,
            "version": MANIFEST_VERSION,
            "epoch": epoch,
            "writer_id": writer_id,
            "node": self.node,
        }
        body.update(self.to_json())
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_receipt(cls, data: bytes, where: str) -> tuple[int, str, NodeRecord]:
        """Parse a receipt; returns (epoch, writer id, record)."""
        raw = _load_json(data, where)
        if raw.get("format") != RECEIPT_FORMAT or raw.get("version") != MANIFEST_VERSION:
            raise CheckpointCorruptedError(f"{where}: not an asyncckpt receipt of version {MANIFEST_VERSION}")
        node = raw.get("node")
        if not isinstance(node, str):
            raise CheckpointCorruptedError(f"{where}: receipt names no node")
        return _epoch_of(raw, where), str(raw.get("writer_id")), cls.from_json(node, raw, where)


@dataclass(frozen=True)
class EpochManifest:
    """The commit record of one epoch."""

    epoch: int
    writer_id: str
    nodes: Mapping[str, NodeRecord]
    db_type: str = "msgpack"
    created_unix: float = field(default_factory=time.time)

    @property
    def run_id(self) -> str:
        return split_writer_id(self.writer_id)[0]

    def to_json(self) -> bytes:
        created = datetime.fromtimestamp(self.created_unix, tz=UTC).isoformat(timespec="milliseconds")
        body = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "epoch": self.epoch,
            "writer_id": self.writer_id,
            "db_type": self.db_type,
            "created": created,
            "created_unix": self.created_unix,
            "nodes": {name: record.to_json() for name, record in sorted(self.nodes.items())},
        }
        return json.dumps(body, indent=1, sort_keys=False).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str, *, epoch: int | None = None) -> EpochManifest:
        """Parse and validate a manifest; anything malformed is :class:`CheckpointCorruptedError`.

        Every key it names must be a valid key inside its own epoch's directory; with
        ``epoch``, the manifest must be that epoch's.
        """
        raw = _load_json(data, where)
        if raw.get("format") != MANIFEST_FORMAT:
            raise CheckpointCorruptedError(f"{where}: not an asyncckpt manifest")
        if raw.get("version") != MANIFEST_VERSION:
            raise CheckpointCorruptedError(f"{where}: unsupported manifest version {raw.get('version')!r}")
        found_epoch = _epoch_of(raw, where)
        if epoch is not None and found_epoch != epoch:
            raise CheckpointCorruptedError(f"{where}: manifest says epoch {found_epoch}")
        writer_id, db_type, created = raw.get("writer_id"), raw.get("db_type"), raw.get("created_unix")
        nodes_raw = raw.get("nodes")
        if (
            not isinstance(writer_id, str)
            or not isinstance(db_type, str)
            or not isinstance(nodes_raw, Mapping)
            or not nodes_raw
        ):
            raise CheckpointCorruptedError(f"{where}: manifest lacks writer_id, db_type or nodes")
        if not isinstance(created, (int, float)) or isinstance(created, bool) or not _finite(created):
            raise CheckpointCorruptedError(f"{where}: manifest lacks a valid created_unix")
        nodes = {str(node): NodeRecord.from_json(str(node), record, where) for node, record in nodes_raw.items()}
        inside = epoch_dir(found_epoch)
        for node, record in nodes.items():
            for key in (record.shard, record.receipt):
                try:
                    validate_key(key)
                except ValueError:
                    raise CheckpointCorruptedError(f"{where}: node {node!r} names an invalid key {key!r}") from None
                if not key.startswith(inside):
                    raise CheckpointCorruptedError(f"{where}: node {node!r} names {key!r}, outside epoch {found_epoch}")
        return cls(found_epoch, writer_id, nodes, db_type, float(created))


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
