"""Payload bytes -> values: :func:`decode_blob` (checked against its entry's length and
CRC32C), and the pieces the readers of blobs spread over several objects use:
:func:`leaf_array`, :func:`decode_tree`, :func:`tree_value`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from .. import arrays
from ..errors import CheckpointCorruptedError, CheckpointError
from ._checksum import checksum
from ._entries import BlobEntry, ExtCode, LeafEntry


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
