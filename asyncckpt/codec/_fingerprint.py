"""The fields of an incremental save: XXH3-128 fingerprints and pointers to other objects.

:func:`fingerprint` hashes a blob's buffers in one pass (CRC32C and XXH3-128 together);
:func:`reuse_fields` and :func:`reuse_fields_of` write and read an entry's or a leaf's
``xxh3`` and ``ref`` fields; :data:`REUSE_FIELDS_BOUND` is the most they add to a packed
entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import xxhash

from ._checksum import checksum

DIGEST_SIZE = 16  # XXH3-128
#: The most bytes ``xxh3`` and ``ref`` add to one packed index entry or leaf, with a
#: leaf's absolute offset in another object (for size bounds).
REUSE_FIELDS_BOUND = 40
_FINGERPRINT_CHUNK = 256 << 10  # hashed in cache-sized chunks: each byte is read from memory once


def reuse_fields(xxh3: bytes | None, ref: int | None) -> dict[str, Any]:
    """The ``xxh3`` and ``ref`` fields of an entry or a leaf, those that are set."""
    out: dict[str, Any] = {}
    if xxh3 is not None:
        out["xxh3"] = xxh3
    if ref is not None:
        out["ref"] = ref
    return out


def reuse_fields_of(raw: Mapping[str, Any]) -> tuple[bytes | None, int | None]:
    """The ``xxh3`` and ``ref`` fields of an entry or a leaf, checked."""
    digest, ref = raw.get("xxh3"), raw.get("ref")
    if digest is not None and (not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE):
        raise ValueError("xxh3 must be 16 bytes")
    if ref is not None and (not isinstance(ref, int) or isinstance(ref, bool) or ref < 0):
        raise ValueError("ref must be a non-negative int")
    return digest, ref


def fingerprint(
    buffers: Iterable[memoryview], each_min: int | None = None
) -> tuple[list[int], bytes, list[bytes | None]]:
    """The CRC32C of each of ``buffers``, the XXH3-128 digest of all of them written one
    after another and, with ``each_min``, the XXH3-128 of each buffer of at least that
    many bytes on its own (``None`` for the others), in one pass (chunk by chunk, so
    each byte comes from memory once). CPU work, GIL released."""
    crcs, digest, each = [], xxhash.xxh3_128(), []
    for buffer in buffers:
        crc = 0
        own = xxhash.xxh3_128() if each_min is not None and buffer.nbytes >= each_min else None
        for start in range(0, buffer.nbytes, _FINGERPRINT_CHUNK):
            chunk = buffer[start : start + _FINGERPRINT_CHUNK]
            crc = checksum(chunk, crc)
            digest.update(chunk)
            if own is not None:
                own.update(chunk)
        crcs.append(crc)
        each.append(None if own is None else own.digest())
    return crcs, digest.digest(), each
