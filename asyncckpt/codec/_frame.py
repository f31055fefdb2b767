"""The shard's frame around the payloads: the header, the blob index and the fixed-size
trailer, written (:func:`shard_header`, :class:`ShardIndex`, :func:`shard_trailer`,
:func:`shard_size_bound`) and parsed and checked (:func:`parse_header`,
:func:`parse_trailer`, :func:`parse_index`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack

from ..errors import CheckpointCorruptedError
from ._checksum import checksum
from ._encode import EncodedBlob
from ._entries import BlobEntry
from ._fingerprint import REUSE_FIELDS_BOUND

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SHARD_MAGIC = b"ACKPTSH1"
TRAILER_MAGIC = b"ACKPTEND"
_HEADER_PREFIX = struct.Struct("<8sI")
_TRAILER = struct.Struct("<QII8s")
HEADER_PREFIX_SIZE = _HEADER_PREFIX.size
TRAILER_SIZE = _TRAILER.size


def shard_header(node: str) -> bytes:
    body = msgpack.packb({"format": "asyncckpt-shard", "version": FORMAT_VERSION, "node": node})
    return _HEADER_PREFIX.pack(SHARD_MAGIC, len(body)) + body


class ShardIndex:
    """A shard's blob index, packed entry by entry as the blobs are written (no entry
    object is kept per blob): :meth:`add` each blob in order, then :meth:`trailer`."""

    def __init__(self, count: int):
        self._packer = msgpack.Packer()
        self._body = bytearray(self._packer.pack_map_header(count))
        self._missing = count

    def add(
        self,
        blob: EncodedBlob,
        offset: int,
        crc: int,
        leaf_crcs: Sequence[int] | None = None,
        xxh3: bytes | None = None,
        ref: int | None = None,
        leaf_digests: Sequence[bytes | None] | None = None,
        leaf_refs: Mapping[int, tuple[int, int]] | None = None,
    ) -> None:
        """The entry of ``blob``, whose payload starts at ``offset`` and has CRC32C ``crc``
        (``leaf_crcs``: its leaves', for a tree; computed when not given) and XXH3-128
        digest ``xxh3``; with ``ref``, at ``offset`` of the record's ``refs[ref]`` instead
        of this shard (``leaf_digests``, ``leaf_refs``: see :meth:`EncodedBlob.entry`)."""
        self._body += self._packer.pack(blob.name)
        self._body += self._packer.pack(blob.entry_json(offset, crc, leaf_crcs, xxh3, ref, leaf_digests, leaf_refs))
        self._missing -= 1

    def trailer(self, index_offset: int) -> tuple[bytearray, int]:
        """The packed index followed by the fixed-size trailer, and the index's CRC32C;
        ``index_offset`` is where the index starts in the shard. Call it once: the
        index's own buffer is returned, not a copy."""
        if self._missing:
            raise ValueError(f"shard index is missing {self._missing} blob(s)")
        body, self._body = self._body, bytearray()
        crc = checksum(body)
        body += _TRAILER.pack(index_offset, len(body), crc, TRAILER_MAGIC)
        return body, crc


def shard_trailer(index: Mapping[str, BlobEntry], index_offset: int) -> bytes:
    """The msgpack index of ``index`` followed by the fixed-size trailer."""
    body = msgpack.packb({name: entry.to_json() for name, entry in index.items()})
    return body + _TRAILER.pack(index_offset, len(body), checksum(body), TRAILER_MAGIC)


def shard_size_bound(header: bytes, blobs: Iterable[EncodedBlob], *, fingerprinted: bool = False) -> int:
    """An upper bound of the shard's size, known before any byte is written (each index
    entry is measured with the widest CRC32C encoding, one at a time; ``fingerprinted``:
    with room for the fields of an incremental save)."""
    packer = msgpack.Packer()
    offset = len(header)
    count = 0
    entries = 0
    for blob in blobs:
        widest = [0xFFFFFFFF] * len(blob.leaves)
        entries += len(packer.pack(blob.name)) + len(packer.pack(blob.entry_json(offset, 0xFFFFFFFF, widest)))
        entries += REUSE_FIELDS_BOUND * (1 + len(blob.leaves)) if fingerprinted else 0
        offset += blob.length
        count += 1
    return offset + len(packer.pack_map_header(count)) + entries + TRAILER_SIZE


def parse_header(data: bytes | memoryview, where: str) -> dict[str, Any]:
    """Parse and check a shard's header (the first bytes of the shard)."""
    try:
        magic, size = _HEADER_PREFIX.unpack_from(data, 0)
        if magic != SHARD_MAGIC:
            raise ValueError("bad magic")
        header = msgpack.unpackb(bytes(data[HEADER_PREFIX_SIZE : HEADER_PREFIX_SIZE + size]))
        if not isinstance(header, dict) or header.get("format") != "asyncckpt-shard":
            raise ValueError("not an asyncckpt shard header")
        if header.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"unsupported shard format version {header.get('version')!r}")
        return header
    except (ValueError, struct.error, msgpack.UnpackException, TypeError) as exc:
        raise CheckpointCorruptedError(f"{where}: invalid shard header ({exc})") from None


def parse_trailer(trailer: bytes | memoryview, shard_size: int, where: str) -> tuple[int, int, int]:
    """Return (index offset, index length, index CRC32C) from the last bytes of a shard."""
    try:
        offset, length, crc, magic = _TRAILER.unpack(bytes(trailer))
    except struct.error as exc:
        raise CheckpointCorruptedError(f"{where}: truncated shard ({exc})") from None
    if magic != TRAILER_MAGIC or offset + length + TRAILER_SIZE != shard_size:
        raise CheckpointCorruptedError(f"{where}: invalid shard trailer (truncated or not a shard)")
    return offset, length, crc


def parse_index(body: bytes | memoryview, crc: int, where: str) -> dict[str, BlobEntry]:
    """Decode a shard's blob index and verify its checksum."""
    if checksum(body) != crc:
        raise CheckpointCorruptedError(f"{where}: blob index checksum mismatch")
    try:
        raw = msgpack.unpackb(bytes(body), strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise CheckpointCorruptedError(f"{where}: blob index does not decode ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointCorruptedError(f"{where}: blob index is not a map")
    return {name: BlobEntry.from_json(entry, f"{where} blob {name!r}") for name, entry in raw.items()}
