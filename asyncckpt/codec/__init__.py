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

The modules, each one job, importing one way (``_checksum`` -> ``_fingerprint`` ->
``_entries`` -> ``_encode`` -> ``_frame``; ``_entries`` -> ``_decode``): ``_checksum``
(CRC32C and its combination), ``_fingerprint`` (XXH3-128 and the ``xxh3``/``ref``
fields), ``_entries`` (index entries, encodings, :class:`ExtCode`), ``_encode`` (values
-> :class:`EncodedBlob`), ``_frame`` (header, index, trailer: written and parsed),
``_decode`` (payloads -> values). This package only re-exports them.
"""

from __future__ import annotations

# ``NAME as NAME``: public names outside ``__all__`` that the rest of the package reaches as
# ``codec.NAME`` (combine_checksums) or that state the format; they stay reachable here
from ._checksum import checksum, checksum_combine
from ._checksum import combine_checksums as combine_checksums
from ._decode import decode_blob, decode_tree, leaf_array, tree_value
from ._encode import INLINE_MAX, EncodedBlob, EncodedLeaf, Stage, encode_blob, encode_blobs
from ._entries import ENCODINGS as ENCODINGS
from ._entries import BlobEntry, ExtCode, LeafEntry
from ._fingerprint import DIGEST_SIZE as DIGEST_SIZE
from ._fingerprint import REUSE_FIELDS_BOUND as REUSE_FIELDS_BOUND
from ._fingerprint import fingerprint
from ._frame import (
    FORMAT_VERSION,
    HEADER_PREFIX_SIZE,
    TRAILER_SIZE,
    ShardIndex,
    parse_header,
    parse_index,
    parse_trailer,
    shard_header,
    shard_size_bound,
    shard_trailer,
)
from ._frame import READABLE_VERSIONS as READABLE_VERSIONS
from ._frame import SHARD_MAGIC as SHARD_MAGIC
from ._frame import TRAILER_MAGIC as TRAILER_MAGIC

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
