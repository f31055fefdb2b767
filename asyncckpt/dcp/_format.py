"""What the DCP plugin stores: key names, per-item records, the metadata object, tensor bytes.

A checkpoint directory holds one committed metadata object and the data objects it names::

    <location>/dcp.metadata                   DCP's Metadata: create-only, written last
    <location>/data/<token>/<rank>-<n>.bin    item payloads of one rank's write_data

``<token>`` is new for every ``write_data`` call (one rank's attempt at a save), so an
attempt never overwrites the objects of another. A data object is the items' payloads one after another, each starting at a
multiple of :data:`ALIGN` bytes (zero padding between): a tensor's raw contiguous bytes
(C order, its own dtype), or a ``BYTE_IO`` item's bytes. Each item's record
(:class:`StoredItem`) says where it lies and carries its CRC32C.

The metadata object is ``b"ACKPTDCP"`` + the CRC32C of the rest (uint32, little endian) +
DCP's :class:`~torch.distributed.checkpoint.metadata.Metadata` pickled. It is read back
with an unpickler that resolves only the classes a DCP metadata holds (DCP's metadata
dataclasses, ``torch.Size``, torch dtypes and layouts, :class:`StoredItem`, a few plain
builtins): a metadata object can not name any other callable.
"""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

from .. import codec
from ..errors import CheckpointCorruptedError
from ..storage import validate_key

__all__ = [
    "ALIGN",
    "DATA_PREFIX",
    "METADATA_KEY",
    "StoredItem",
    "data_key",
    "decode_metadata",
    "encode_metadata",
    "narrow",
    "tensor_from",
    "tensor_payload",
]

METADATA_KEY = "dcp.metadata"
DATA_PREFIX = "data/"
#: Every item of a data object starts at a multiple of this many bytes.
ALIGN = 64

_MAGIC = b"ACKPTDCP"
_HEADER = struct.Struct("<8sI")


def data_key(token: str, rank: int, part: int) -> str:
    """The key of the ``part``-th data object of ``rank``'s attempt ``token``."""
    return f"{DATA_PREFIX}{token}/{rank}-{part}.bin"


@dataclass(frozen=True)
class StoredItem:
    """Where one item's payload lies (an item's ``storage_data`` in DCP's metadata).

    ``key`` is the data object's key below the checkpoint location; ``offset`` and
    ``length`` are the payload's bytes in it, ``crc32c`` their checksum. ``dtype`` (a torch
    dtype name such as ``"bfloat16"``) and ``shape`` are set for tensors, ``None`` for
    ``BYTE_IO`` items.
    """

    key: str
    offset: int
    length: int
    crc32c: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    def check(self, where: str) -> None:
        """Raise :class:`CheckpointCorruptedError` unless every field is well formed."""

        def bad(why: str) -> CheckpointCorruptedError:
            return CheckpointCorruptedError(f"{where}: malformed item record ({why}): {self!r}")

        try:
            validate_key(self.key)
        except ValueError:
            raise bad("key") from None
        for name in ("offset", "length", "crc32c"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise bad(name)
        if (self.dtype is None) != (self.shape is None):
            raise bad("dtype and shape go together")
        if self.dtype is not None and self.shape is not None:
            if not isinstance(self.shape, tuple) or any(type(n) is not int or n < 0 for n in self.shape):
                raise bad("shape")
            dtype = _dtype(self.dtype)
            if dtype is None:
                raise bad("dtype")
            if _numel(self.shape) * dtype.itemsize != self.length:
                raise bad("length differs from dtype and shape")


def _dtype(name: str) -> torch.dtype | None:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


# ---------------------------------------------------------------------------- tensors


def tensor_payload(tensor: torch.Tensor, where: str) -> tuple[memoryview, str, tuple[int, ...]]:
    """A tensor's elements as raw contiguous bytes on the host: (bytes, dtype name, shape).

    Copies only when the tensor is not on the CPU, not contiguous, or a conjugate or
    negative view. Anything but a dense (strided, non-quantized) tensor is a
    :class:`TypeError` naming ``where``. CPU work: call it off the event loop.
    """
    t = tensor.detach()
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"{where}: asyncckpt.dcp stores dense tensors only, not {t.layout} / {t.dtype}")
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy()
    return raw.data, str(t.dtype).removeprefix("torch."), tuple(t.shape)


def tensor_from(buffer: bytearray | memoryview, offset: int, item: StoredItem) -> torch.Tensor:
    """The tensor ``item`` describes, viewing ``buffer`` from ``offset`` (no copy; an empty
    tensor is a new one). ``buffer`` must be writable; ``item`` checked (:meth:`StoredItem.check`)."""
    assert item.dtype is not None and item.shape is not None
    dtype = _dtype(item.dtype)
    assert dtype is not None
    count = _numel(item.shape)
    if count == 0:
        return torch.empty(item.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(item.shape)


def narrow(tensor: torch.Tensor, offsets: torch.Size, lengths: torch.Size) -> torch.Tensor:
    """The box of ``tensor`` starting at ``offsets`` with sizes ``lengths`` (a view)."""
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        if start != 0 or length != tensor.size(dim):
            tensor = tensor.narrow(dim, start, length)
    return tensor


# ---------------------------------------------------------------------------- metadata


def encode_metadata(metadata: Metadata) -> bytes:
    """The bytes of the metadata object. CPU work for large checkpoints."""
    body = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(_MAGIC, codec.checksum(body)) + body


#: (module, name) pairs a metadata object may name: nothing that runs code
_ALLOWED_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a torch.layout by name
    (StoredItem.__module__, StoredItem.__qualname__),
    ("collections", "OrderedDict"),
    *(("builtins", name) for name in ("set", "frozenset", "complex", "bytearray", "slice", "range")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and _dtype(name) is not None:
            return _dtype(name)
        raise pickle.UnpicklingError(f"a DCP metadata object does not name {module}.{name}")


def decode_metadata(data: bytes, where: str) -> Metadata:
    """The metadata in ``data`` (read from ``where``), its checksum and every item record
    checked. Damage is :class:`CheckpointCorruptedError`."""
    if len(data) < _HEADER.size:
        raise CheckpointCorruptedError(f"{where}: metadata object is truncated ({len(data)} bytes)")
    magic, crc = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CheckpointCorruptedError(f"{where}: not an asyncckpt DCP metadata object (magic {magic!r})")
    body = memoryview(data)[_HEADER.size :]
    if codec.checksum(body) != crc:
        raise CheckpointCorruptedError(f"{where}: metadata CRC32C mismatch (stored bytes are corrupted)")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(body)).load()
    except Exception as exc:
        raise CheckpointCorruptedError(f"{where}: metadata does not parse: {exc}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointCorruptedError(f"{where}: metadata object holds no DCP metadata with item records")
    for index, item in metadata.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(item, StoredItem):
            raise CheckpointCorruptedError(f"{where}: item record {index!r} is not an asyncckpt record: {item!r}")
        item.check(f"{where}, item {index.fqn!r}")
    return metadata
