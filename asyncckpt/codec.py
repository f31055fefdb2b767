"""Blobs <-> bytes: the msgpack shard format (pure functions, no I/O).

A *blob* is one named value of a node's workspace. Supported values:

* numpy arrays of every numeric dtype (bool, ints, floats incl. float16, complex,
  datetime/timedelta, fixed-width bytes/unicode), any byte order, 0-d, empty,
  C- or Fortran-ordered, contiguous or not (non-contiguous ones are copied); a
  ``np.memmap`` is saved as its data and loads as a plain array. Other ndarray
  subclasses (masked arrays, ``np.matrix``...) are refused: their extra state would
  not survive;
* numpy scalars; ``bytes`` (``bytearray``/``memoryview`` come back as ``bytes``);
* ``str``, ``int`` (any size), ``float``, ``bool``, ``None``;
* ``list``, ``tuple`` and ``dict`` with ``str`` keys, nested, holding any of the above.

Anything else is a :class:`TypeError` naming the node, the blob and the type.

Shard layout (format version 1)::

    b"ACKPTSH1" | uint32 header length | msgpack header map
    blob payloads, one after another (the index says where each one is)
    msgpack index map {blob name: entry}
    trailer: uint64 index offset | uint32 index length | uint32 index CRC32C | b"ACKPTEND"

A payload is the raw bytes of an array (``encoding="ndarray"``) or of a bytes value
(``"bytes"``), or a msgpack object (``"msgpack"``) whose extension types are numbered
in :class:`ExtCode`. Every entry carries a CRC32C of its payload, so one blob can be
fetched with one ranged GET and verified on its own.

Entries of an incremental save (format 3 records, see :mod:`.manifest`) may carry two
more fields: ``xxh3``, the 16-byte XXH3-128 digest of the payload (with the CRC32C, what
the next save compares), and ``ref``, the number of the object in the node's record
(``NodeRecord.refs``) that holds the payload at ``offset`` instead of this shard.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import crc32c as _crc32c
import msgpack
import numpy as np
import xxhash

from .errors import CheckpointCorruptedError

__all__ = [
    "FORMAT_VERSION",
    "BlobEntry",
    "EncodedBlob",
    "ExtCode",
    "ShardIndex",
    "checksum",
    "fingerprint",
    "checksum_combine",
    "decode_blob",
    "encode_blob",
    "encode_blobs",
    "is_plain_array",
    "shard_header",
    "shard_size_bound",
    "shard_trailer",
    "parse_trailer",
    "parse_index",
    "parse_header",
    "HEADER_PREFIX_SIZE",
    "TRAILER_SIZE",
]

FORMAT_VERSION = 1
SHARD_MAGIC = b"ACKPTSH1"
TRAILER_MAGIC = b"ACKPTEND"
_HEADER_PREFIX = struct.Struct("<8sI")
_TRAILER = struct.Struct("<QII8s")
HEADER_PREFIX_SIZE = _HEADER_PREFIX.size
TRAILER_SIZE = _TRAILER.size
_MAX_DEPTH = 128
_ARRAY_KINDS = frozenset("biufcmMSU")
ENCODINGS = ("ndarray", "bytes", "msgpack")


class ExtCode(IntEnum):
    """msgpack extension type codes used inside ``"msgpack"`` payloads."""

    NDARRAY = 1  # msgpack [dtype str, shape list, order "C"|"F", raw bytes]
    NUMPY_SCALAR = 2  # msgpack [dtype str, raw bytes]
    TUPLE = 3  # msgpack list of items
    BIGINT = 4  # decimal string of an int outside the 64-bit range


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


@dataclass(frozen=True)
class BlobEntry:
    """Where one blob lives in its shard and how to decode it."""

    offset: int
    length: int
    encoding: str
    crc32c: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    order: str | None = None
    xxh3: bytes | None = None  # XXH3-128 digest of the payload (incremental saves)
    ref: int | None = None  # the payload lives in the node record's refs[ref], not in this shard

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "offset": self.offset,
            "length": self.length,
            "encoding": self.encoding,
            "crc32c": self.crc32c,
        }
        if self.encoding == "ndarray":
            out.update(dtype=self.dtype, shape=list(self.shape or ()), order=self.order)
        out.update(_reuse_fields(self.xxh3, self.ref))
        return out

    @classmethod
    def from_json(cls, raw: Any, where: str) -> BlobEntry:
        """Validate and build an entry; anything malformed is :class:`CheckpointCorruptedError`."""
        try:
            if not isinstance(raw, Mapping):
                raise TypeError("entry is not a map")
            offset, length, crc = raw["offset"], raw["length"], raw["crc32c"]
            encoding = raw["encoding"]
            for value in (offset, length, crc):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError("offset, length and crc32c must be non-negative ints")
            if crc >= 1 << 32:
                raise ValueError("crc32c out of range")
            if encoding not in ENCODINGS:
                raise ValueError(f"unknown encoding {encoding!r}")
            dtype = shape = order = None
            if encoding == "ndarray":
                dtype, order = raw["dtype"], raw["order"]
                shape_raw = raw["shape"]
                if not isinstance(dtype, str) or order not in ("C", "F"):
                    raise ValueError("bad dtype or order")
                if not isinstance(shape_raw, (list, tuple)) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape_raw
                ):
                    raise ValueError("bad shape")
                shape = tuple(shape_raw)
                _array_dtype(dtype)
                if math.prod(shape) * np.dtype(dtype).itemsize != length:
                    raise ValueError("array length does not match dtype and shape")
            digest, ref = raw.get("xxh3"), raw.get("ref")
            if digest is not None and (not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE):
                raise ValueError("xxh3 must be 16 bytes")
            if ref is not None and (not isinstance(ref, int) or isinstance(ref, bool) or ref < 0):
                raise ValueError("ref must be a non-negative int")
            return cls(offset, length, encoding, crc, dtype, shape, order, digest, ref)
        except CheckpointCorruptedError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CheckpointCorruptedError(f"invalid blob index entry for {where}: {exc}") from None


@dataclass(frozen=True, slots=True)
class EncodedBlob:
    """One blob ready to be written: its name, its encoding and the ``source`` its
    payload bytes are read from: for ``"ndarray"`` a C-contiguous array (an F-ordered
    array's transpose, ``order="F"``), for ``"bytes"`` a bytes, bytearray or contiguous
    byte memoryview, for ``"msgpack"`` the packed bytes.

    Small on purpose (a shard may hold hundreds of thousands of blobs): the payload view,
    the length, dtype and shape are derived when asked for, not stored.
    """

    name: str
    encoding: str
    source: Any
    order: str | None = None

    @property
    def payload(self) -> memoryview:
        """The payload bytes (a view of :attr:`source`, no copy)."""
        if self.encoding == "ndarray":
            return _raw_view(self.source)
        return memoryview(self.source).cast("B")

    @property
    def buffers(self) -> tuple[memoryview, ...]:
        return (self.payload,)

    @property
    def length(self) -> int:
        if self.encoding == "ndarray":
            return int(self.source.nbytes)
        return memoryview(self.source).nbytes if isinstance(self.source, memoryview) else len(self.source)

    @property
    def dtype(self) -> str | None:
        return self.source.dtype.str if self.encoding == "ndarray" else None

    @property
    def shape(self) -> tuple[int, ...] | None:
        if self.encoding != "ndarray":
            return None
        shape = tuple(self.source.shape)
        return shape[::-1] if self.order == "F" else shape  # an F-ordered array is stored transposed

    def entry(self, offset: int, crc: int, xxh3: bytes | None = None, ref: int | None = None) -> BlobEntry:
        return BlobEntry(offset, self.length, self.encoding, crc, self.dtype, self.shape, self.order, xxh3, ref)

    def entry_json(self, offset: int, crc: int, xxh3: bytes | None = None, ref: int | None = None) -> dict[str, Any]:
        """:meth:`BlobEntry.to_json` of :meth:`entry`, without the entry."""
        out: dict[str, Any] = {"offset": offset, "length": self.length, "encoding": self.encoding, "crc32c": crc}
        if self.encoding == "ndarray":
            out.update(dtype=self.dtype, shape=list(self.shape or ()), order=self.order)
        out.update(_reuse_fields(xxh3, ref))
        return out


# --------------------------------------------------------------------------- encode


class _Unsupported(TypeError):
    def __init__(self, path: str, value: Any, why: str = ""):
        super().__init__(path, f"unsupported type {type(value).__module__}.{type(value).__qualname__}{why}")


_DTYPE_RE = re.compile(r"^[<>|][biufcmMSU][0-9]{1,6}(\[[0-9]*[A-Za-z]{1,2}\])?$")


def _array_dtype(dtype_str: str) -> np.dtype[Any]:
    # a strict syntax check first: numpy warns (or worse) on legacy spellings
    if not isinstance(dtype_str, str) or not _DTYPE_RE.match(dtype_str):
        raise ValueError(f"bad dtype {dtype_str!r}")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError as exc:
        raise ValueError(f"bad dtype {dtype_str!r}") from exc
    if dtype.kind not in _ARRAY_KINDS or dtype.itemsize == 0 or dtype.str != dtype_str:
        raise ValueError(f"unsupported dtype {dtype_str!r}")
    return dtype


def is_plain_array(value: Any) -> bool:
    """Whether ``value`` is an array whose data is all there is to it: a plain
    ``np.ndarray`` or a ``np.memmap`` (whose file backing is no part of its value)."""
    return type(value) is np.ndarray or type(value) is np.memmap


def _check_array(arr: np.ndarray[Any, Any], path: str) -> None:
    if not is_plain_array(arr):
        # a subclass carries state beyond the data (a mask, matrix semantics...) that a
        # load would silently drop: refuse it rather than return something else
        if isinstance(arr, np.ma.MaskedArray):
            raise _Unsupported(path, arr, ": masked arrays are not supported (save .data and .mask as two blobs)")
        raise _Unsupported(path, arr, ": ndarray subclasses are not supported (save np.asarray(value))")
    if arr.dtype.kind not in _ARRAY_KINDS or arr.dtype.itemsize == 0 or arr.dtype.fields is not None:
        raise _Unsupported(path, arr, f" with dtype {arr.dtype}")


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


def _to_tree(value: Any, path: str, depth: int) -> Any:
    """Convert ``value`` into objects msgpack packs natively (with ExtTypes)."""
    if depth > _MAX_DEPTH:
        raise _Unsupported(path, value, " (nested too deeply or cyclic)")
    if value is None:
        return None
    if isinstance(value, np.generic):  # before the builtins: np.float64 is a float subclass
        arr = np.asarray(value)
        _check_array(arr, path)
        return msgpack.ExtType(ExtCode.NUMPY_SCALAR, msgpack.packb([arr.dtype.str, arr.tobytes()]))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return _utf8_checked(str(value), path, value)
    if isinstance(value, int):
        value = int(value)
        if -(1 << 63) <= value < (1 << 64):
            return value
        return msgpack.ExtType(ExtCode.BIGINT, str(value).encode())
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray):
        _check_array(value, path)
        order, stored = _array_layout(value)
        body = msgpack.packb([value.dtype.str, list(value.shape), order, _raw_view(stored)])
        return msgpack.ExtType(ExtCode.NDARRAY, body)
    if isinstance(value, tuple):
        items = [_to_tree(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        return msgpack.ExtType(ExtCode.TUPLE, msgpack.packb(items))
    if isinstance(value, list):
        return [_to_tree(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Unsupported(f"{path}[{key!r}]", key, " as a dict key (keys must be str)")
            key = _utf8_checked(str(key), f"{path}[{key!r}]", key)
            out[key] = _to_tree(item, f"{path}[{key!r}]", depth + 1)
        return out
    raise _Unsupported(path, value)


def encode_blob(name: str, value: Any) -> EncodedBlob:
    """Encode one blob; a :class:`TypeError` names the blob and the unsupported type."""
    try:
        if isinstance(value, np.ndarray):
            _check_array(value, name)
            order, stored = _array_layout(value)
            return EncodedBlob(name, "ndarray", stored, order)
        if isinstance(value, (bytes, bytearray)) and not isinstance(value, np.generic):
            return EncodedBlob(name, "bytes", value)
        if isinstance(value, memoryview):
            return EncodedBlob(name, "bytes", value.cast("B") if value.c_contiguous else value.tobytes())
        payload = msgpack.packb(_to_tree(value, name, 0), use_bin_type=True)
        return EncodedBlob(name, "msgpack", payload)
    except _Unsupported as exc:
        path, why = exc.args
        if len(path) > 120:
            path = path[:117] + "..."
        raise TypeError(f"blob {path!r}: {why}") from None


def encode_blobs(node: str, blobs: Mapping[str, Any]) -> list[EncodedBlob]:
    """Encode every blob of one node, in name order.

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
            encoded.append(encode_blob(name, blobs[name]))
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

    def add(self, blob: EncodedBlob, offset: int, crc: int, xxh3: bytes | None = None, ref: int | None = None) -> None:
        """The entry of ``blob``, whose payload starts at ``offset`` and has CRC32C ``crc``
        (and XXH3-128 digest ``xxh3``); with ``ref``, at ``offset`` of the record's
        ``refs[ref]`` instead of this shard."""
        self._body += self._packer.pack(blob.name)
        self._body += self._packer.pack(blob.entry_json(offset, crc, xxh3, ref))
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
        entries += len(packer.pack(blob.name)) + len(packer.pack(blob.entry_json(offset, 0xFFFFFFFF)))
        entries += REUSE_FIELDS_BOUND if fingerprinted else 0
        offset += blob.length
        count += 1
    return offset + len(packer.pack_map_header(count)) + entries + TRAILER_SIZE


# --------------------------------------------------------------------------- fingerprints

DIGEST_SIZE = 16  # XXH3-128
#: The most bytes ``xxh3`` and ``ref`` add to one packed index entry (for size bounds).
REUSE_FIELDS_BOUND = 32
_FINGERPRINT_CHUNK = 256 << 10  # hashed in cache-sized chunks: each byte is read from memory once


def _reuse_fields(xxh3: bytes | None, ref: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if xxh3 is not None:
        out["xxh3"] = xxh3
    if ref is not None:
        out["ref"] = ref
    return out


def fingerprint(buffers: Iterable[memoryview]) -> tuple[int, bytes]:
    """CRC32C and XXH3-128 digest of ``buffers`` written one after another, in one pass
    (chunk by chunk, so each byte comes from memory once). CPU work, GIL released."""
    crc, digest = 0, xxhash.xxh3_128()
    for buffer in buffers:
        for start in range(0, buffer.nbytes, _FINGERPRINT_CHUNK):
            chunk = buffer[start : start + _FINGERPRINT_CHUNK]
            crc = checksum(chunk, crc)
            digest.update(chunk)
    return crc, digest.digest()


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
        if header.get("version") != FORMAT_VERSION:
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


def _ext_hook(code: int, data: bytes) -> Any:
    if code == ExtCode.NDARRAY:
        dtype_str, shape, order, raw = msgpack.unpackb(data, raw=False)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError("bad array shape")
        return _array_from(memoryview(raw), _array_dtype(dtype_str), tuple(shape), order, copy=True)
    if code == ExtCode.NUMPY_SCALAR:
        dtype_str, raw = msgpack.unpackb(data, raw=False)
        dtype = _array_dtype(dtype_str)
        if len(raw) != dtype.itemsize:
            raise ValueError("numpy scalar size mismatch")
        return np.frombuffer(raw, dtype=dtype, count=1)[0]
    if code == ExtCode.TUPLE:
        items = msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=True)
        if not isinstance(items, list):
            raise ValueError("tuple payload is not a list")
        return tuple(items)
    if code == ExtCode.BIGINT:
        return int(data.decode("ascii"))
    raise ValueError(f"unknown msgpack extension code {code}")


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


def decode_blob(entry: BlobEntry, payload: memoryview, where: str, *, verify: bool = True) -> Any:
    """Decode one blob from its payload bytes.

    Arrays are views into ``payload`` when it is writable (zero copy), copies otherwise,
    so the result is always writable. Raises :class:`CheckpointCorruptedError` on a
    checksum, size or decoding mismatch.
    """
    if payload.nbytes != entry.length:
        raise CheckpointCorruptedError(f"{where}: expected {entry.length} bytes, got {payload.nbytes}")
    if verify and checksum(payload) != entry.crc32c:
        raise CheckpointCorruptedError(f"{where}: CRC32C mismatch (stored bytes are corrupted)")
    try:
        if entry.encoding == "ndarray":
            assert entry.dtype is not None and entry.shape is not None and entry.order is not None
            return _array_from(payload, _array_dtype(entry.dtype), entry.shape, entry.order, copy=False)
        if entry.encoding == "bytes":
            return bytes(payload)
        return msgpack.unpackb(payload, raw=False, ext_hook=_ext_hook, strict_map_key=True)
    except CheckpointCorruptedError:
        raise
    except Exception as exc:  # any decoding failure of verified-but-malformed bytes
        raise CheckpointCorruptedError(f"{where}: blob does not decode ({type(exc).__name__}: {exc})") from None
