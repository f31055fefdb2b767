"""Values -> blobs ready to be written: :func:`encode_blob`, :func:`encode_blobs`, and the
:class:`EncodedBlob` (and a tree's :class:`EncodedLeaf`) that refers to the bytes to
write without copying them and gives its index entry.

A container holding arrays of at least :data:`INLINE_MAX` bytes becomes a ``"tree"``:
a msgpack skeleton, its arrays left out as leaves; ``stage`` copies those arrays
(``save_async``) instead of referring to the caller's memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .. import arrays
from ._checksum import checksum
from ._entries import BlobEntry, ExtCode, LeafEntry, array_json
from ._fingerprint import reuse_fields

_MAX_DEPTH = 128
#: arrays inside a container smaller than this many bytes stay inline in the skeleton
INLINE_MAX = 4096

#: ``stage(blob, leaf number, array-like, kind)``: a private host copy of an array that
#: the encoder would otherwise reference in the caller's memory (``save_async``)
Stage = Callable[[str, int, Any, str], np.ndarray[Any, Any]]


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
                out.update(array_json(self.dtype, self.shape, self.order, self.kind or "numpy"))
            if self.stateful:
                out["stateful"] = True
            out.update(reuse_fields(xxh3, ref))
            return out
        return self.entry(offset, crc, leaf_crcs, xxh3, ref, leaf_digests, leaf_refs).to_json()


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
