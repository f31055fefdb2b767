"""Blobs <-> bytes: the msgpack shard format (pure functions, no I/O).

A *blob* is one named value of a node's workspace. Supported values:

* arrays (:mod:`.arrays` says which): numpy arrays of every numeric dtype (bool, ints,
  floats incl. float16, complex, datetime/timedelta, fixed-width bytes/unicode) and of the
  ``ml_dtypes`` dtypes (bfloat16, the float8 types...), any byte order, 0-d, empty, C- or
  Fortran-ordered, contiguous or not (non-contiguous ones are copied); a ``np.memmap`` is
  saved as its data and loads as a plain array; ``torch.Tensor`` (on any device, loads as a
  CPU tensor) and ``jax.Array`` (loads as a ``jax.Array``). Other ndarray subclasses
  (masked arrays, ``np.matrix``...) are refused: their extra state would not survive;
* numpy scalars; ``bytes`` (``bytearray``/``memoryview`` come back as ``bytes``);
* ``str``, ``int`` (any size), ``float``, ``bool``, ``None``;
* ``list``, ``tuple`` and ``dict`` with ``str`` or ``int`` keys (a ``dict`` subclass such
  as ``OrderedDict`` comes back as a ``dict`` in the same order), nested, holding any of
  the above;
* a ``Stateful`` object (``state_dict()``/``load_state_dict()``) is saved as its state dict
  and its entry says so (``stateful``).

Anything else is a :class:`TypeError` naming the node, the blob (and the path inside it)
and the type.

Shard layout (format version 2; version 1 shards, without ``"tree"`` blobs, ``kind``
and int keys, still read)::

    b"ACKPTSH1" | uint32 header length | msgpack header map
    blob payloads, one after another (the index says where each one is)
    msgpack index map {blob name: entry}
    trailer: uint64 index offset | uint32 index length | uint32 index CRC32C | b"ACKPTEND"

A payload is the raw bytes of an array (``encoding="ndarray"``, with ``kind`` saying
whether it was a numpy array, a tensor or a jax array) or of a bytes value (``"bytes"``),
or a msgpack object (``"msgpack"``) whose extension types are numbered in
:class:`ExtCode`. A container holding arrays of at least :data:`INLINE_MAX` bytes is a
``"tree"``: a msgpack *skeleton* with :attr:`ExtCode.LEAF` placeholders, followed
contiguously by those arrays' raw bytes (written from the caller's memory, no copy); its
entry lists each leaf's offset (relative to the blob), length, CRC32C, dtype, shape,
order and kind. Every entry carries a CRC32C of its whole payload, so one blob can be
fetched with one ranged GET and verified on its own.

Entries of an incremental save (format 3 records, see :mod:`.manifest`) may carry two
more fields: ``xxh3``, the 16-byte XXH3-128 digest of the payload (with the CRC32C, what
the next save compares), and ``ref``, the number of the object in the node's record
(``NodeRecord.refs``) that holds the payload at ``offset`` instead of this shard.

A tree's leaves may carry them too (format 4 records): a leaf's ``xxh3`` is its own
bytes' digest, and a leaf with ``ref`` is not in the blob's span at all: its bytes are
at ``offset`` (absolute, not relative to the blob) of ``refs[ref]``. The blob's span
(``offset``, ``length``, ``crc32c``) then holds the skeleton and, contiguously after it
in leaf order, only the leaves without ``ref``; :attr:`BlobEntry.payload_length` is the
whole payload's.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

import crc32c as _crc32c
import msgpack
import numpy as np
import xxhash

from . import arrays
from .errors import CheckpointCorruptedError, CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "INLINE_MAX",
    "BlobEntry",
    "EncodedBlob",
    "EncodedLeaf",
    "ExtCode",
    "LeafEntry",
    "ShardIndex",
    "Stage",
    "checksum",
    "fingerprint",
    "checksum_combine",
    "decode_blob",
    "decode_tree",
    "tree_value",
    "leaf_array",
    "encode_blob",
    "encode_blobs",
    "shard_header",
    "shard_size_bound",
    "shard_trailer",
    "parse_trailer",
    "parse_index",
    "parse_header",
    "HEADER_PREFIX_SIZE",
    "TRAILER_SIZE",
]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SHARD_MAGIC = b"ACKPTSH1"
TRAILER_MAGIC = b"ACKPTEND"
_HEADER_PREFIX = struct.Struct("<8sI")
_TRAILER = struct.Struct("<QII8s")
HEADER_PREFIX_SIZE = _HEADER_PREFIX.size
TRAILER_SIZE = _TRAILER.size
_MAX_DEPTH = 128
ENCODINGS = ("ndarray", "bytes", "msgpack", "tree")
#: arrays inside a container smaller than this many bytes stay inline in the skeleton
INLINE_MAX = 4096

#: ``stage(blob, leaf number, array-like, kind)``: a private host copy of an array that
#: the encoder would otherwise reference in the caller's memory (``save_async``)
Stage = Callable[[str, int, Any, str], np.ndarray[Any, Any]]


class ExtCode(IntEnum):
    """msgpack extension type codes used inside ``"msgpack"`` payloads and skeletons."""

    NDARRAY = 1  # msgpack [dtype spec, shape list, order "C"|"F", raw bytes] (+ kind, when not numpy)
    NUMPY_SCALAR = 2  # msgpack [dtype spec, raw bytes]
    TUPLE = 3  # msgpack list of items
    BIGINT = 4  # decimal string of an int outside the 64-bit range
    LEAF = 5  # msgpack int: the number of one of a "tree" blob's leaves


def checksum(data: Any, value: int = 0) -> int:
    """CRC32C of a bytes-like object, continuing from ``value``."""
    return _crc32c.crc32c(data, value)


_CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _gf2_times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


@functools.cache
def _zero_byte_operators() -> tuple[list[int], ...]:
    """Operator ``k`` appends ``2**k`` zero bytes to a CRC (zlib's crc32_combine method)."""
    one_zero_bit = [_CRC32C_POLY] + [1 << n for n in range(31)]
    operator = _gf2_square(_gf2_square(_gf2_square(one_zero_bit)))  # one zero byte
    operators = []
    for _ in range(64):
        operators.append(operator)
        operator = _gf2_square(operator)
    return tuple(operators)


def checksum_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC32C of ``a + b`` from the CRC32Cs of ``a`` and ``b`` and ``len(b)``, without the
    bytes (a few microseconds), so one pass yields both per-blob and whole-shard CRCs."""
    operators = _zero_byte_operators()
    k = 0
    while length_b:
        if length_b & 1:
            crc_a = _gf2_times(operators[k], crc_a)
        length_b >>= 1
        k += 1
    return crc_a ^ crc_b


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
        out.update(_array_json(self.dtype, self.shape, self.order, self.kind))
        out.update(_reuse_fields(self.xxh3, self.ref))
        return out

    @classmethod
    def from_json(cls, raw: Any) -> LeafEntry:
        if not isinstance(raw, Mapping):
            raise TypeError("leaf entry is not a map")
        offset, length, crc = _span_fields(raw)
        dtype, shape, order, kind = _array_fields(raw, length)
        digest, ref = _reuse_fields_of(raw)
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
            out.update(_array_json(self.dtype, self.shape, self.order, self.kind or "numpy"))
        if self.encoding == "tree":
            out.update(skeleton=self.skeleton, leaves=[leaf.to_json() for leaf in self.leaves])
        if self.stateful:
            out["stateful"] = True
        out.update(_reuse_fields(self.xxh3, self.ref))
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
            digest, ref = _reuse_fields_of(raw)
            if ref is not None and entry.leaf_refs:
                raise ValueError("a blob stored in another object has leaves stored in others")
            return replace(entry, xxh3=digest, ref=ref) if digest is not None or ref is not None else entry
        except CheckpointError as exc:
            raise CheckpointCorruptedError(f"invalid blob index entry for {where}: {exc}") from None
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CheckpointCorruptedError(f"invalid blob index entry for {where}: {exc}") from None


def _reuse_fields_of(raw: Mapping[str, Any]) -> tuple[bytes | None, int | None]:
    """The ``xxh3`` and ``ref`` fields of an entry or a leaf, checked."""
    digest, ref = raw.get("xxh3"), raw.get("ref")
    if digest is not None and (not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE):
        raise ValueError("xxh3 must be 16 bytes")
    if ref is not None and (not isinstance(ref, int) or isinstance(ref, bool) or ref < 0):
        raise ValueError("ref must be a non-negative int")
    return digest, ref


def _span_fields(raw: Mapping[str, Any]) -> tuple[int, int, int]:
    offset, length, crc = raw["offset"], raw["length"], raw["crc32c"]
    for value in (offset, length, crc):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError("offset, length and crc32c must be non-negative ints")
    if crc >= 1 << 32:
        raise ValueError("crc32c out of range")
    return offset, length, crc


def _array_json(dtype: str, shape: tuple[int, ...], order: str, kind: str) -> dict[str, Any]:
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


@dataclass(frozen=True, slots=True)
class EncodedLeaf:
    """One array of a ``"tree"`` blob: ``stored`` is a C-contiguous array (an F-ordered
    array's transpose, ``order="F"``) whose bytes are written as they are."""

    stored: np.ndarray[Any, Any]
    order: str
    kind: str

    @property
    def payload(self) -> memoryview:
        return _raw_view(self.stored)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.stored.shape)
        return shape[::-1] if self.order == "F" else shape  # an F-ordered array is stored transposed

    def entry(self, offset: int, crc: int, xxh3: bytes | None = None, ref: int | None = None) -> LeafEntry:
        spec = arrays.dtype_spec(self.stored.dtype)
        assert spec is not None
        return LeafEntry(offset, int(self.stored.nbytes), crc, spec, self.shape, self.order, self.kind, xxh3, ref)


@dataclass(frozen=True, slots=True)
class EncodedBlob:
    """One blob ready to be written: its name, its encoding and the ``source`` its
    payload bytes are read from: for ``"ndarray"`` a C-contiguous array (an F-ordered
    array's transpose, ``order="F"``; ``kind`` says what it was), for ``"bytes"`` a bytes,
    bytearray or contiguous byte memoryview, for ``"msgpack"`` the packed bytes, for
    ``"tree"`` the packed skeleton, followed by its ``leaves``.

    Small on purpose (a shard may hold hundreds of thousands of blobs): the payload views,
    the length, dtype and shape are derived when asked for, not stored.
    """

    name: str
    encoding: str
    source: Any
    order: str | None = None
    kind: str | None = None
    stateful: bool = False
    leaves: tuple[EncodedLeaf, ...] = ()

    @property
    def payload(self) -> memoryview:
        """The payload bytes of a blob that is one buffer (not a ``"tree"``), without a copy."""
        if self.encoding == "tree":
            raise ValueError("a tree blob is several buffers: write its .buffers")
        if self.encoding == "ndarray":
            return _raw_view(self.source)
        return memoryview(self.source).cast("B")

    @property
    def buffers(self) -> tuple[memoryview, ...]:
        """The payload as the buffers to write one after another (views, no copy)."""
        if self.encoding == "tree":
            return (memoryview(self.source).cast("B"), *(leaf.payload for leaf in self.leaves))
        return (self.payload,)

    @property
    def length(self) -> int:
        if self.encoding == "ndarray":
            return int(self.source.nbytes)
        head = memoryview(self.source).nbytes if isinstance(self.source, memoryview) else len(self.source)
        return head + sum(int(leaf.stored.nbytes) for leaf in self.leaves)

    @property
    def dtype(self) -> str | None:
        return arrays.dtype_spec(self.source.dtype) if self.encoding == "ndarray" else None

    @property
    def shape(self) -> tuple[int, ...] | None:
        if self.encoding != "ndarray":
            return None
        shape = tuple(self.source.shape)
        return shape[::-1] if self.order == "F" else shape  # an F-ordered array is stored transposed

    def _leaf_entries(
        self,
        leaf_crcs: Sequence[int] | None,
        leaf_digests: Sequence[bytes | None] | None,
        leaf_refs: Mapping[int, tuple[int, int]] | None,
    ) -> tuple[LeafEntry, ...]:
        if leaf_crcs is None:
            leaf_crcs = [checksum(leaf.payload) for leaf in self.leaves]
        if len(leaf_crcs) != len(self.leaves):
            raise ValueError(f"blob {self.name!r} has {len(self.leaves)} leaves, got {len(leaf_crcs)} CRCs")
        digests = leaf_digests if leaf_digests is not None else [None] * len(self.leaves)
        refs = leaf_refs or {}
        offset = len(self.source)
        out = []
        for number, (leaf, crc, digest) in enumerate(zip(self.leaves, leaf_crcs, digests, strict=True)):
            if number in refs:
                ref, at = refs[number]
                out.append(leaf.entry(at, crc, digest, ref))
            else:
                out.append(leaf.entry(offset, crc, digest))
                offset += int(leaf.stored.nbytes)
        return tuple(out)

    def entry(
        self,
        offset: int,
        crc: int,
        leaf_crcs: Sequence[int] | None = None,
        xxh3: bytes | None = None,
        ref: int | None = None,
        leaf_digests: Sequence[bytes | None] | None = None,
        leaf_refs: Mapping[int, tuple[int, int]] | None = None,
    ) -> BlobEntry:
        """The blob's index entry at ``offset`` with CRC32C ``crc``; ``leaf_crcs`` are the
        CRC32Cs of a tree's leaves (computed here when not given); ``xxh3`` and ``ref``:
        the fields of an incremental save; ``leaf_digests``: each leaf's XXH3-128 (or
        ``None``); ``leaf_refs``: leaf number -> (ref, absolute offset in that object) of
        the leaves not written in this blob's span (then ``crc`` is the span's CRC32C)."""
        if self.encoding == "ndarray":
            return BlobEntry(
                offset,
                self.length,
                self.encoding,
                crc,
                self.dtype,
                self.shape,
                self.order,
                self.kind,
                self.stateful,
                xxh3=xxh3,
                ref=ref,
            )
        if self.encoding == "tree":
            leaves = self._leaf_entries(leaf_crcs, leaf_digests, leaf_refs)
            return BlobEntry(
                offset,
                self.length - sum(leaf.length for leaf in leaves if leaf.ref is not None),
                self.encoding,
                crc,
                stateful=self.stateful,
                skeleton=len(self.source),
                leaves=leaves,
                xxh3=xxh3,
                ref=ref,
            )
        return BlobEntry(offset, self.length, self.encoding, crc, stateful=self.stateful, xxh3=xxh3, ref=ref)

    def entry_json(
        self,
        offset: int,
        crc: int,
        leaf_crcs: Sequence[int] | None = None,
        xxh3: bytes | None = None,
        ref: int | None = None,
        leaf_digests: Sequence[bytes | None] | None = None,
        leaf_refs: Mapping[int, tuple[int, int]] | None = None,
    ) -> dict[str, Any]:
        """:meth:`BlobEntry.to_json` of :meth:`entry`."""
        if self.encoding != "tree":  # the hot path of shards of many small blobs: no entry object
            out: dict[str, Any] = {"offset": offset, "length": self.length, "encoding": self.encoding, "crc32c": crc}
            if self.encoding == "ndarray":
                assert self.order is not None and self.dtype is not None and self.shape is not None
                out.update(_array_json(self.dtype, self.shape, self.order, self.kind or "numpy"))
            if self.stateful:
                out["stateful"] = True
            out.update(_reuse_fields(xxh3, ref))
            return out
        return self.entry(offset, crc, leaf_crcs, xxh3, ref, leaf_digests, leaf_refs).to_json()


def combine_checksums(crcs: Sequence[int], lengths: Sequence[int]) -> int:
    """The CRC32C of consecutive buffers from theirs and their lengths."""
    crc = 0
    for part, length in zip(crcs, lengths):
        crc = checksum_combine(crc, part, length)
    return crc


# --------------------------------------------------------------------------- encode


class _Unsupported(TypeError):
    def __init__(self, path: str, value: Any, why: str = ""):
        super().__init__(path, f"unsupported type {type(value).__module__}.{type(value).__qualname__}{why}")


def _array_layout(arr: np.ndarray[Any, Any]) -> tuple[str, np.ndarray[Any, Any]]:
    """Return (order, C-contiguous array whose bytes are stored), copying only if needed."""
    if arr.flags.c_contiguous:
        return "C", arr
    if arr.flags.f_contiguous:
        return "F", arr.T  # the transpose of an F-contiguous array is C-contiguous
    return "C", np.ascontiguousarray(arr)


def _raw_view(arr: np.ndarray[Any, Any]) -> memoryview:
    return arr.reshape(-1).view(np.uint8).data if arr.size else memoryview(b"")


def _utf8_checked(text: str, path: str, value: Any) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Unsupported(path, value, " (a str that is not valid UTF-8, e.g. a lone surrogate)") from None
    return text


def _array_nbytes(value: Any, kind: str) -> int:
    if kind == "torch":
        return int(value.numel()) * int(value.element_size())
    return int(value.nbytes)


def _host(value: Any, kind: str, path: str) -> np.ndarray[Any, Any]:
    try:
        return arrays.host_view(value, kind)
    except arrays.UnsupportedArray as exc:
        raise _Unsupported(path, value, f": {exc}") from None


def _scalar(value: np.generic, path: str) -> msgpack.ExtType:
    arr = np.asarray(value)  # a zero-length bytes_/str_ scalar becomes one of length 1
    spec = arrays.dtype_spec(arr.dtype)
    if spec is None:
        raise _Unsupported(path, value, f" with dtype {arr.dtype}")
    return msgpack.ExtType(ExtCode.NUMPY_SCALAR, msgpack.packb([spec, arr.tobytes()]))


class _TreeEncoder:
    """Converts one blob's value into objects msgpack packs natively (with ExtTypes);
    arrays of at least :data:`INLINE_MAX` bytes become leaves."""

    def __init__(self, blob: str, stage: Stage | None):
        self.blob = blob
        self.stage = stage
        self.leaves: list[EncodedLeaf] = []

    def leaf(self, value: Any, kind: str, path: str) -> EncodedLeaf:
        """``value`` as stored bytes: the caller's memory, or a staged copy."""
        if self.stage is not None:
            try:
                host = self.stage(self.blob, len(self.leaves), value, kind)
            except arrays.UnsupportedArray as exc:
                raise _Unsupported(path, value, f": {exc}") from None
        else:
            host = _host(value, kind, path)
        order, stored = _array_layout(host)
        return EncodedLeaf(stored, order, kind)

    def array(self, value: Any, kind: str, path: str) -> msgpack.ExtType:
        if _array_nbytes(value, kind) >= INLINE_MAX:
            self.leaves.append(self.leaf(value, kind, path))
            return msgpack.ExtType(ExtCode.LEAF, msgpack.packb(len(self.leaves) - 1))
        host = _host(value, kind, path)
        order, stored = _array_layout(host)
        fields = [arrays.dtype_spec(host.dtype), list(host.shape), order, _raw_view(stored)]
        if kind != "numpy":
            fields.append(kind)
        return msgpack.ExtType(ExtCode.NDARRAY, msgpack.packb(fields))

    def tree(self, value: Any, path: str, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise _Unsupported(path, value, " (nested too deeply or cyclic)")
        if value is None:
            return None
        if isinstance(value, np.generic):  # before the builtins: np.float64 is a float subclass
            return _scalar(value, path)
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, str):
            return _utf8_checked(str(value), path, value)
        if isinstance(value, int):
            return _int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        kind = arrays.array_kind(value)
        if kind is not None:
            return self.array(value, kind, path)
        if isinstance(value, tuple):
            items = [self.tree(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
            return msgpack.ExtType(ExtCode.TUPLE, msgpack.packb(items))
        if isinstance(value, list):
            return [self.tree(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            out: dict[Any, Any] = {}
            for key, item in value.items():
                where = f"{path}[{key!r}]"
                packed_key: str | int | msgpack.ExtType
                if isinstance(key, str):
                    packed_key = _utf8_checked(str(key), where, key)
                elif isinstance(key, int) and not isinstance(key, bool):
                    packed_key = _int(key)
                else:
                    raise _Unsupported(where, key, " as a dict key (keys must be str or int)")
                out[packed_key] = self.tree(item, where, depth + 1)
            return out
        raise _Unsupported(path, value)


def _int(value: int) -> int | msgpack.ExtType:
    value = int(value)
    if -(1 << 63) <= value < (1 << 64):
        return value
    return msgpack.ExtType(ExtCode.BIGINT, str(value).encode())


def encode_blob(name: str, value: Any, stage: Stage | None = None) -> EncodedBlob:
    """Encode one blob; a :class:`TypeError` names the blob (and the path inside it) and
    the unsupported type. A ``Stateful`` value is encoded as its ``state_dict()``. With
    ``stage``, the arrays that would be referenced in the caller's memory are copied
    through it (the blob then refers to nothing of the caller's)."""
    stateful = arrays.is_stateful(value)
    if stateful:
        value = value.state_dict()
    try:
        kind = arrays.array_kind(value)
        if kind is not None:
            host = stage(name, 0, value, kind) if stage is not None else _host(value, kind, name)
            order, stored = _array_layout(host)
            return EncodedBlob(name, "ndarray", stored, order, kind, stateful)
        if isinstance(value, (bytes, bytearray)) and not isinstance(value, np.generic):
            return EncodedBlob(name, "bytes", value if stage is None else bytes(value), stateful=stateful)
        if isinstance(value, memoryview):
            view = value.cast("B") if value.c_contiguous and stage is None else value.tobytes()
            return EncodedBlob(name, "bytes", view, stateful=stateful)
        encoder = _TreeEncoder(name, stage)
        payload = msgpack.packb(encoder.tree(value, name, 0), use_bin_type=True)
        if encoder.leaves:
            return EncodedBlob(name, "tree", payload, stateful=stateful, leaves=tuple(encoder.leaves))
        return EncodedBlob(name, "msgpack", payload, stateful=stateful)
    except arrays.UnsupportedArray as exc:
        raise TypeError(f"blob {name!r}: unsupported {type(value).__qualname__}: {exc}") from None
    except _Unsupported as exc:
        path, why = exc.args
        if len(path) > 120:
            path = path[:117] + "..."
        raise TypeError(f"blob {path!r}: {why}") from None


def encode_blobs(node: str, blobs: Mapping[str, Any], stage: Stage | None = None) -> list[EncodedBlob]:
    """Encode every blob of one node, in name order (``stage``: see :func:`encode_blob`).

    Raises :class:`TypeError` naming the node, the blob and the type for the first
    unsupported value, and for a non-str or empty blob name.
    """
    encoded = []
    for name in sorted(blobs, key=lambda n: (not isinstance(n, str), str(n))):
        if not isinstance(name, str) or not name:
            raise TypeError(f"node {node!r}: blob names must be non-empty str, got {name!r}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError(f"node {node!r}: blob name {name!r} is not valid UTF-8") from None
        try:
            encoded.append(encode_blob(name, blobs[name], stage))
        except TypeError as exc:
            raise TypeError(f"node {node!r}, {exc}") from None
    return encoded


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


# --------------------------------------------------------------------------- fingerprints

DIGEST_SIZE = 16  # XXH3-128
#: The most bytes ``xxh3`` and ``ref`` add to one packed index entry or leaf, with a
#: leaf's absolute offset in another object (for size bounds).
REUSE_FIELDS_BOUND = 40
_FINGERPRINT_CHUNK = 256 << 10  # hashed in cache-sized chunks: each byte is read from memory once


def _reuse_fields(xxh3: bytes | None, ref: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if xxh3 is not None:
        out["xxh3"] = xxh3
    if ref is not None:
        out["ref"] = ref
    return out


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


# --------------------------------------------------------------------------- decode


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


def _checked_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A decoded msgpack map whose keys are all ``str`` or ``int`` (not ``bool``)."""
    out = {}
    for key, value in pairs:
        if type(key) is not str and type(key) is not int:
            raise ValueError(f"dict key of type {type(key).__name__}")
        out[key] = value
    return out


def _unpack(data: Any, leaf: Callable[[int], Any] | None = None) -> Any:
    """A msgpack payload or skeleton as its value; ``leaf(n)`` is the value of leaf ``n``."""

    def ext_hook(code: int, body: bytes) -> Any:
        if code == ExtCode.NDARRAY:
            dtype_spec, shape, order, raw, *rest = msgpack.unpackb(body, raw=False)
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError("bad array shape")
            kind = rest[0] if rest else "numpy"
            if len(rest) > 1 or kind not in arrays.KINDS or not isinstance(raw, bytes):
                raise ValueError("bad inline array")
            dtype = arrays.dtype_from_spec(dtype_spec)
            return arrays.from_host(_array_from(memoryview(raw), dtype, tuple(shape), order, copy=True), kind)
        if code == ExtCode.NUMPY_SCALAR:
            dtype_spec, raw = msgpack.unpackb(body, raw=False)
            dtype = arrays.dtype_from_spec(dtype_spec)
            if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
                raise ValueError("numpy scalar size mismatch")
            return np.frombuffer(raw, dtype=dtype, count=1)[0]
        if code == ExtCode.TUPLE:
            items = unpack(body)
            if not isinstance(items, list):
                raise ValueError("tuple payload is not a list")
            return tuple(items)
        if code == ExtCode.BIGINT:
            return int(body.decode("ascii"))
        if code == ExtCode.LEAF and leaf is not None:
            number = msgpack.unpackb(body)
            if type(number) is not int:
                raise ValueError("bad leaf number")
            return leaf(number)
        raise ValueError(f"unknown msgpack extension code {code}")

    def unpack(body: Any) -> Any:
        return msgpack.unpackb(body, raw=False, ext_hook=ext_hook, strict_map_key=False, object_pairs_hook=_checked_map)

    return unpack(data)


def _array_from(
    raw: memoryview, dtype: np.dtype[Any], shape: tuple[int, ...], order: str, *, copy: bool
) -> np.ndarray[Any, Any]:
    count = math.prod(shape)
    if count * dtype.itemsize != raw.nbytes:
        raise ValueError("array byte length does not match dtype and shape")
    if order not in ("C", "F"):
        raise ValueError(f"bad array order {order!r}")
    flat = np.frombuffer(raw, dtype=dtype, count=count) if count else np.empty(0, dtype=dtype)
    if copy or (raw.readonly and count):
        flat = flat.copy()
    if order == "F":
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def leaf_array(leaf: LeafEntry | BlobEntry, payload: memoryview) -> np.ndarray[Any, Any]:
    """The host array of an ``"ndarray"`` blob or of a tree's leaf, from its bytes: a view
    when ``payload`` is writable, a copy otherwise."""
    assert leaf.dtype is not None and leaf.shape is not None and leaf.order is not None
    return _array_from(payload, arrays.dtype_from_spec(leaf.dtype), leaf.shape, leaf.order, copy=False)


def decode_tree(entry: BlobEntry, skeleton: memoryview, leaf: Callable[[int], Any]) -> Any:
    """The value of a ``"tree"`` blob from its skeleton's bytes, ``leaf(n)`` giving leaf
    ``n``'s value; a skeleton that names a leaf twice, one that does not exist or not
    every leaf is :class:`ValueError`."""
    used: set[int] = set()

    def checked_leaf(number: int) -> Any:
        if not 0 <= number < len(entry.leaves) or number in used:
            raise ValueError(f"bad or repeated leaf number {number}")
        used.add(number)
        return leaf(number)

    value = _unpack(skeleton, checked_leaf)
    if len(used) != len(entry.leaves):
        raise ValueError("the skeleton does not use every leaf")
    return value


def tree_value(entry: BlobEntry, skeleton: memoryview, leaf_bytes: Callable[[int], memoryview]) -> Any:
    """The value of a ``"tree"`` blob from its skeleton's bytes and ``leaf_bytes(n)``,
    leaf ``n``'s bytes (wherever they are stored)."""

    def leaf(number: int) -> Any:
        spec = entry.leaves[number]
        return arrays.from_host(leaf_array(spec, leaf_bytes(number)), spec.kind)

    return decode_tree(entry, skeleton, leaf)


def _tree_value(entry: BlobEntry, payload: memoryview) -> Any:
    assert entry.skeleton is not None
    if entry.leaf_refs:
        raise ValueError("some leaves are stored in other objects")

    def leaf_bytes(number: int) -> memoryview:
        spec = entry.leaves[number]
        return payload[spec.offset : spec.offset + spec.length]

    return tree_value(entry, payload[: entry.skeleton], leaf_bytes)


def decode_blob(entry: BlobEntry, payload: memoryview, where: str, *, verify: bool = True) -> Any:
    """Decode one blob from its payload bytes.

    Arrays (and CPU tensors) are views into ``payload`` when it is writable (zero copy),
    copies otherwise, so the result is always writable. Raises
    :class:`CheckpointCorruptedError` on a checksum, size or decoding mismatch.
    """
    if payload.nbytes != entry.length:
        raise CheckpointCorruptedError(f"{where}: expected {entry.length} bytes, got {payload.nbytes}")
    if verify and checksum(payload) != entry.crc32c:
        raise CheckpointCorruptedError(f"{where}: CRC32C mismatch (stored bytes are corrupted)")
    try:
        if entry.encoding == "ndarray":
            return arrays.from_host(leaf_array(entry, payload), entry.kind or "numpy")
        if entry.encoding == "bytes":
            return bytes(payload)
        if entry.encoding == "tree":
            return _tree_value(entry, payload)
        return _unpack(payload)
    except CheckpointCorruptedError:
        raise
    except CheckpointError as exc:  # a framework or dtype library this blob needs is missing
        raise type(exc)(f"{where}: {exc}") from None
    except Exception as exc:  # any decoding failure of verified-but-malformed bytes
        raise CheckpointCorruptedError(f"{where}: blob does not decode ({type(exc).__name__}: {exc})") from None
