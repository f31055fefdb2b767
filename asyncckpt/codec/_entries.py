"""What a shard's index says of a blob: :class:`BlobEntry` (and a tree's :class:`LeafEntry`),
their msgpack map form both ways, every field checked while parsed; the payload
encodings (:data:`ENCODINGS`) and the msgpack extension codes inside payloads
(:class:`ExtCode`), which the encoder and the decoder share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

from .. import arrays
from ..errors import CheckpointCorruptedError, CheckpointError
from ._fingerprint import reuse_fields, reuse_fields_of

ENCODINGS = ("ndarray", "bytes", "msgpack", "tree")


class ExtCode(IntEnum):
    """msgpack extension type codes used inside ``"msgpack"`` payloads and skeletons."""

    NDARRAY = 1  # msgpack [dtype spec, shape list, order "C"|"F", raw bytes] (+ kind, when not numpy)
    NUMPY_SCALAR = 2  # msgpack [dtype spec, raw bytes]
    TUPLE = 3  # msgpack list of items
    BIGINT = 4  # decimal string of an int outside the 64-bit range
    LEAF = 5  # msgpack int: the number of one of a "tree" blob's leaves


@dataclass(frozen=True, slots=True)
class LeafEntry:
    """One array of a ``"tree"`` blob: where its bytes lie relative to the blob's start,
    their CRC32C, and how to decode them."""

    offset: int
    length: int
    crc32c: int
    dtype: str
    shape: tuple[int, ...]
    order: str
    kind: str = "numpy"
    xxh3: bytes | None = None  # XXH3-128 digest of the leaf's bytes (incremental saves)
    ref: int | None = None  # the bytes live at ``offset`` of the node record's refs[ref]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"offset": self.offset, "length": self.length, "crc32c": self.crc32c}
        out.update(array_json(self.dtype, self.shape, self.order, self.kind))
        out.update(reuse_fields(self.xxh3, self.ref))
        return out

    @classmethod
    def from_json(cls, raw: Any) -> LeafEntry:
        if not isinstance(raw, Mapping):
            raise TypeError("leaf entry is not a map")
        offset, length, crc = _span_fields(raw)
        dtype, shape, order, kind = _array_fields(raw, length)
        digest, ref = reuse_fields_of(raw)
        return cls(offset, length, crc, dtype, shape, order, kind, digest, ref)


@dataclass(frozen=True)
class BlobEntry:
    """Where one blob lives in its shard and how to decode it.

    ``"ndarray"`` entries have dtype (:func:`arrays.dtype_spec`), shape, order and kind;
    ``"tree"`` entries the skeleton's length and their leaves, which follow the skeleton
    contiguously up to the blob's end; ``stateful`` marks the state dict of a
    ``Stateful`` object.
    """

    offset: int
    length: int
    encoding: str
    crc32c: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    order: str | None = None
    kind: str | None = None
    stateful: bool = False
    skeleton: int | None = None
    leaves: tuple[LeafEntry, ...] = ()
    xxh3: bytes | None = None  # XXH3-128 digest of the payload (incremental saves)
    ref: int | None = None  # the payload lives in the node record's refs[ref], not in this shard

    @property
    def payload_length(self) -> int:
        """The whole payload's length: ``length`` and the leaves stored in other objects."""
        return self.length + sum(leaf.length for leaf in self.leaves if leaf.ref is not None)

    @property
    def leaf_refs(self) -> bool:
        """Whether some of the tree's leaves live in other objects (format 4)."""
        return any(leaf.ref is not None for leaf in self.leaves)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "offset": self.offset,
            "length": self.length,
            "encoding": self.encoding,
            "crc32c": self.crc32c,
        }
        if self.encoding == "ndarray":
            assert self.dtype is not None and self.shape is not None and self.order is not None
            out.update(array_json(self.dtype, self.shape, self.order, self.kind or "numpy"))
        if self.encoding == "tree":
            out.update(skeleton=self.skeleton, leaves=[leaf.to_json() for leaf in self.leaves])
        if self.stateful:
            out["stateful"] = True
        out.update(reuse_fields(self.xxh3, self.ref))
        return out

    @classmethod
    def from_json(cls, raw: Any, where: str) -> BlobEntry:
        """Validate and build an entry; anything malformed is :class:`CheckpointCorruptedError`."""
        try:
            if not isinstance(raw, Mapping):
                raise TypeError("entry is not a map")
            offset, length, crc = _span_fields(raw)
            encoding = raw["encoding"]
            if encoding not in ENCODINGS:
                raise ValueError(f"unknown encoding {encoding!r}")
            stateful = raw.get("stateful", False)
            if not isinstance(stateful, bool):
                raise ValueError("bad stateful flag")
            if encoding == "ndarray":
                dtype, shape, order, kind = _array_fields(raw, length)
                entry = cls(offset, length, encoding, crc, dtype, shape, order, kind, stateful)
            elif encoding == "tree":
                skeleton, leaves = _tree_fields(raw, length)
                entry = cls(offset, length, encoding, crc, stateful=stateful, skeleton=skeleton, leaves=leaves)
            else:
                entry = cls(offset, length, encoding, crc, stateful=stateful)
            digest, ref = reuse_fields_of(raw)
            if ref is not None and entry.leaf_refs:
                raise ValueError("a blob stored in another object has leaves stored in others")
            return replace(entry, xxh3=digest, ref=ref) if digest is not None or ref is not None else entry
        except CheckpointError as exc:
            raise CheckpointCorruptedError(f"invalid blob index entry for {where}: {exc}") from None
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CheckpointCorruptedError(f"invalid blob index entry for {where}: {exc}") from None


def _span_fields(raw: Mapping[str, Any]) -> tuple[int, int, int]:
    offset, length, crc = raw["offset"], raw["length"], raw["crc32c"]
    for value in (offset, length, crc):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError("offset, length and crc32c must be non-negative ints")
    if crc >= 1 << 32:
        raise ValueError("crc32c out of range")
    return offset, length, crc


def array_json(dtype: str, shape: tuple[int, ...], order: str, kind: str) -> dict[str, Any]:
    """The array fields of an entry or a leaf (``kind`` only when not numpy)."""
    out: dict[str, Any] = {"dtype": dtype, "shape": list(shape), "order": order}
    if kind != "numpy":
        out["kind"] = kind
    return out


def _array_fields(raw: Mapping[str, Any], length: int) -> tuple[str, tuple[int, ...], str, str]:
    """dtype, shape, order and kind of an array entry, checked against its ``length``."""
    dtype, order, shape_raw = raw["dtype"], raw["order"], raw["shape"]
    kind = raw.get("kind", "numpy")
    if not isinstance(dtype, str) or order not in ("C", "F") or kind not in arrays.KINDS:
        raise ValueError("bad dtype, order or kind")
    if not isinstance(shape_raw, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape_raw
    ):
        raise ValueError("bad shape")
    shape = tuple(shape_raw)
    if math.prod(shape) * arrays.dtype_from_spec(dtype).itemsize != length:
        raise ValueError("array length does not match dtype and shape")
    return dtype, shape, order, kind


def _tree_fields(raw: Mapping[str, Any], length: int) -> tuple[int, tuple[LeafEntry, ...]]:
    """The skeleton length and the leaves of a tree entry: the leaves without ``ref``
    follow the skeleton one after the other, up to the blob's end."""
    skeleton, leaves_raw = raw["skeleton"], raw["leaves"]
    if not isinstance(skeleton, int) or isinstance(skeleton, bool) or not 0 < skeleton <= length:
        raise ValueError("bad skeleton length")
    if not isinstance(leaves_raw, (list, tuple)) or not leaves_raw:
        raise ValueError("a tree has a non-empty list of leaves")
    leaves = tuple(LeafEntry.from_json(leaf) for leaf in leaves_raw)
    end = skeleton
    for leaf in leaves:
        if leaf.ref is not None:
            continue
        if leaf.offset != end:
            raise ValueError("tree leaves are not contiguous after the skeleton")
        end += leaf.length
    if end != length:
        raise ValueError("tree leaves do not end at the blob's end")
    return skeleton, leaves
