"""Property tests of the shard format and the manifests.

Generated blobs round-trip through the codec; damaged shards, manifests, receipts and
payloads fail with :class:`CheckpointCorruptedError` and never with anything else.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import hypothesis.extra.numpy as hnp
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asyncckpt import codec
from asyncckpt.codec import BlobEntry, EncodedBlob
from asyncckpt.config import TransferConfig
from asyncckpt.errors import CheckpointCorruptedError
from asyncckpt.layout import index_key, receipt_key, shard_key
from asyncckpt.manifest import Decision, EpochIndex, EpochManifest, NodeRecord
from asyncckpt.node import ShardReader

FUZZ = settings(
    max_examples=150,
    deadline=None,
    report_multiple_bugs=False,  # stop at the first bug: shrinking several would blow the time budget
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NODE = "fuzz-node"
EPOCH = 7
WRITER_ID = "run0.attempt1"


# --------------------------------------------------------------------------- helpers


def same(decoded: Any, original: Any) -> bool:
    """Deep, type-strict, NaN-aware equality (bytearray/memoryview originals come back as bytes)."""
    if isinstance(original, (bytearray, memoryview)):
        original = bytes(original)
    if type(decoded) is not type(original):
        return False
    if isinstance(original, np.ndarray):
        return (
            decoded.dtype.str == original.dtype.str
            and decoded.shape == original.shape
            and bool(np.array_equal(decoded, original, equal_nan=original.dtype.kind in "fcmM"))
        )
    if isinstance(original, np.generic):
        return same(np.asarray(decoded), np.asarray(original))
    if isinstance(original, float):
        return (math.isnan(decoded) and math.isnan(original)) or (
            decoded == original and math.copysign(1, decoded) == math.copysign(1, original)
        )
    if isinstance(original, (list, tuple)):
        return len(decoded) == len(original) and all(same(d, o) for d, o in zip(decoded, original))
    if isinstance(original, dict):
        return list(decoded) == list(original) and all(same(decoded[k], original[k]) for k in original)
    return bool(decoded == original)


def arrays_in(value: Any) -> list[np.ndarray]:
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for item in value for a in arrays_in(item)]
    if isinstance(value, dict):
        return [a for item in value.values() for a in arrays_in(item)]
    return []


def payload_of(blob: EncodedBlob) -> bytes:
    return b"".join(bytes(view) for view in blob.buffers)


def build_shard(node: str, blobs: dict[str, Any]) -> tuple[bytes, NodeRecord, dict[str, BlobEntry]]:
    """A shard laid out exactly as ShardWriter.write does, the record an index holds,
    and the shard's blob index."""
    header = codec.shard_header(node)
    parts = [header]
    index: dict[str, BlobEntry] = {}
    offset = len(header)
    for blob in codec.encode_blobs(node, blobs):
        payload = payload_of(blob)
        parts.append(payload)
        index[blob.name] = blob.entry(offset, codec.checksum(payload))
        offset += blob.length
    parts.append(codec.shard_trailer(index, offset))
    data = b"".join(parts)
    record = NodeRecord(node, shard_key(EPOCH, WRITER_ID, node), len(data), codec.checksum(data))
    return data, record, index


class _NoStorage:
    """ShardReader only needs ``url_of`` to name the object in its messages."""

    url = "memory://fuzz"

    def url_of(self, key: str) -> str:
        return f"{self.url}/{key}"


def _stage(message: str) -> str:
    """Which check refused a damaged shard (for --hypothesis-show-statistics)."""
    for stage in ("header", "trailer", "truncated", "index", "belongs to", "CRC32C"):
        if stage in message:
            return stage
    return message


def reader_for(record: NodeRecord) -> ShardReader:
    return ShardReader(_NoStorage(), record.node, record, TransferConfig())  # type: ignore[arg-type]


def parses_or_is_corrupted(parse: Any, *args: Any) -> Any:
    """Call ``parse``; a CheckpointCorruptedError is fine, any other exception fails the test."""
    try:
        return parse(*args)
    except CheckpointCorruptedError:
        return None


# --------------------------------------------------------------------------- strategies

NUMERIC_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?"),
    hnp.complex_number_dtypes(endianness="?"),
    hnp.datetime64_dtypes(endianness="?"),
    hnp.timedelta64_dtypes(endianness="?"),
    hnp.byte_string_dtypes(min_len=1, max_len=6),
    hnp.unicode_string_dtypes(min_len=1, max_len=6, endianness="?"),
)


@st.composite
def numpy_arrays(draw: st.DrawFn) -> np.ndarray:
    """Small arrays incl. 0-d and empty ones, C, Fortran, transposed or strided."""
    dtype = draw(NUMERIC_DTYPES)
    array = draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
    layout = draw(st.sampled_from(["C", "F", "T", "step", "reverse"]))
    if layout == "F":
        array = np.asfortranarray(array)
    elif layout == "T":
        array = array.T
    elif layout == "step" and array.ndim:
        array = array[tuple(slice(None, None, draw(st.integers(1, 3))) for _ in range(array.ndim))]
    elif layout == "reverse" and array.ndim:
        array = array[..., ::-1]
    return array


numpy_scalars = NUMERIC_DTYPES.flatmap(lambda dtype: hnp.arrays(dtype, ())).map(lambda a: a[()])

INT_EDGES = [0, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30, -(10**30)]
ints = st.integers() | st.integers(-(2**200), 2**200) | st.sampled_from(INT_EDGES)
leaves = (
    st.none()
    | st.booleans()
    | ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=16)
    | st.binary(max_size=32)
    | st.binary(max_size=8).map(bytearray)
    | numpy_arrays()
    | numpy_scalars
)
blob_values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)
blob_sets = st.dictionaries(st.text(min_size=1, max_size=12), blob_values, min_size=1, max_size=4)


def shard_regions(shard: bytes) -> list[tuple[int, int]]:
    """The payload, index, header and trailer spans of an intact shard (non-empty ones)."""
    header_end = codec.HEADER_PREFIX_SIZE + int.from_bytes(shard[8:12], "little")
    index_offset, _, _ = codec.parse_trailer(shard[-codec.TRAILER_SIZE :], len(shard), "shard")
    spans = [(header_end, index_offset), (index_offset, len(shard) - codec.TRAILER_SIZE), (0, header_end)]
    return [span for span in spans if span[0] < span[1]] + [(len(shard) - codec.TRAILER_SIZE, len(shard))]


def _position(data: st.DataObject, size: int, regions: list[tuple[int, int]]) -> int:
    """A position inside one of ``regions`` (of the original), clamped to the current size."""
    if size == 0:
        return 0
    lo, hi = data.draw(st.sampled_from([*regions, (0, size)]), label="region")
    uniform = data.draw(st.randoms(use_true_random=False), label="random")  # hypothesis-driven, reproducible
    return min(lo + uniform.randrange(max(1, hi - lo)), size - 1)


MUTATIONS = ["flip"] * 5 + ["same", "truncate", "append", "splice", "delete", "duplicate"]


def mutate(data: st.DataObject, original: bytes, regions: list[tuple[int, int]] | None = None) -> bytes:
    """Flip, rewrite, truncate, append, splice, delete or duplicate bytes (1-3 times)."""
    regions = regions or [(0, len(original))]
    buf = bytearray(original)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        op = data.draw(st.sampled_from(MUTATIONS), label="op")
        pos = _position(data, len(buf), regions)
        if op == "flip" and buf:
            buf[pos] ^= data.draw(st.integers(1, 255), label="xor")
        elif op == "same" and buf:
            buf[pos] = buf[pos]  # a mutation that changes nothing
        elif op == "truncate":
            del buf[data.draw(st.integers(0, len(buf)), label="new length") :]
        elif op == "append":
            buf += data.draw(st.binary(min_size=1, max_size=32), label="appended")
        elif op == "splice":
            end = pos + data.draw(st.integers(0, 16), label="span")
            buf[pos:end] = data.draw(st.binary(max_size=16), label="spliced")
        elif op == "delete":
            del buf[pos : pos + data.draw(st.integers(1, 16), label="span")]
        elif op == "duplicate" and buf:
            src = _position(data, len(buf), regions)
            chunk = buf[src : src + data.draw(st.integers(1, 24), label="span")]
            buf[pos : pos + len(chunk)] = chunk
    return bytes(buf)


MANIFEST_KEYS = [
    "format", "version", "epoch", "writer_id", "db_type", "created_unix", "nodes", "node", "shard", "receipt",
    "index", "key", "metrics", "verdict", "manifest", "reason", "missing",
    "size", "crc32c", "blobs", "stats", "seconds", "bytes", "objects", "requests", "retries", "offset", "length",
    "encoding", "dtype", "shape", "order",
]  # fmt: skip
json_keys = st.sampled_from(MANIFEST_KEYS) | st.text(max_size=8)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**32, 2**63, 2**64, 10**12, -1, 10**400, -(10**400)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["ndarray", "bytes", "msgpack", "C", "F", "<f8", ">i4", "|b1", "<U3", "a4", "O", "V8", "<M8[zz]"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(json_keys, children, max_size=3),
    max_leaves=6,
)
# values that break a careless int()/float()/comparison, drawn often when a field is replaced
hostile_json = st.sampled_from(
    [math.inf, -math.inf, math.nan, 10**400, -(10**400), 2**64, -1, 1.5, True, None, "", [], {}]
)


def _slots(tree: Any) -> list[tuple[Any, Any]]:
    """Every (container, key-or-index) of a JSON tree."""
    found: list[tuple[Any, Any]] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.append((tree, key))
            found.extend(_slots(value))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found.append((tree, i))
            found.extend(_slots(value))
    return found


def mutate_json(data: st.DataObject, text: bytes) -> bytes:
    """Replace, delete or rename fields of a JSON document (1-3 times), or damage its bytes."""
    if data.draw(st.booleans(), label="byte-level"):
        return mutate(data, text)
    tree = json.loads(text)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        slots = _slots(tree)
        if not slots:
            break
        container, key = data.draw(st.sampled_from(slots), label="slot")
        edit = data.draw(st.sampled_from(["replace", "delete", "rename"]), label="edit")
        if edit == "replace":
            container[key] = data.draw(hostile_json | json_values, label="new value")
        elif edit == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[data.draw(json_keys, label="new key")] = container.pop(key)
    return json.dumps(tree).encode()


# --------------------------------------------------------------------------- (1) round trips


@FUZZ
@given(blobs=blob_sets, readonly=st.booleans())
def test_generated_blobs_round_trip_through_the_codec(blobs: dict[str, Any], readonly: bool) -> None:
    encoded = codec.encode_blobs(NODE, blobs)
    assert [blob.name for blob in encoded] == sorted(blobs)
    for blob in encoded:
        payload = payload_of(blob)
        assert len(payload) == blob.length
        raw = json.loads(json.dumps(blob.entry(0, codec.checksum(payload)).to_json()))
        entry = BlobEntry.from_json(raw, blob.name)
        view = memoryview(payload) if readonly else memoryview(bytearray(payload))
        decoded = codec.decode_blob(entry, view, blob.name)
        assert same(decoded, blobs[blob.name])
        assert all(array.flags.writeable for array in arrays_in(decoded))


@settings(FUZZ, max_examples=50)  # the round trip above covers the values; this covers the layout
@given(blobs=blob_sets)
def test_generated_shard_reads_back_whole_and_blob_by_blob(blobs: dict[str, Any]) -> None:
    data, record, index = build_shard(NODE, blobs)
    assert same(reader_for(record).decode(memoryview(bytearray(data))), dict(sorted(blobs.items())))
    for name, entry in index.items():
        payload = memoryview(data)[entry.offset : entry.offset + entry.length]
        assert same(codec.decode_blob(entry, payload, name), blobs[name])


# --------------------------------------------------------------------------- (2) damaged shards


@pytest.mark.timeout(120)
@FUZZ
@given(blobs=blob_sets, data=st.data())
def test_damaged_shard_is_corrupted_error_or_unchanged(blobs: dict[str, Any], data: st.DataObject) -> None:
    original, record, index = build_shard(NODE, blobs)
    damaged = mutate(data, original, shard_regions(original))
    expected = dict(sorted(blobs.items()))

    # the whole shard, as ShardReader.read_all verifies and decodes it
    try:
        result = reader_for(record).decode(memoryview(bytearray(damaged)))
    except CheckpointCorruptedError as exc:
        assert damaged != original, "an intact shard was refused"
        event(f"shard refused: {_stage(str(exc))}")
    else:
        assert damaged == original, "a damaged shard passed verification"
        event("shard unchanged")
        assert same(result, expected)

    # each blob from its own byte range, as ShardReader.read_some decodes it
    for name, entry in index.items():
        payload = damaged[entry.offset : entry.offset + entry.length]
        try:
            value = codec.decode_blob(entry, memoryview(bytearray(payload)), name)
        except CheckpointCorruptedError:
            assert payload != original[entry.offset : entry.offset + entry.length]
        else:
            assert same(value, blobs[name])


# --------------------------------------------------------------------------- (3) damaged manifests and receipts

small_blob_sets = st.dictionaries(
    st.text(min_size=1, max_size=6),
    numpy_arrays() | st.binary(max_size=8) | ints | st.text(max_size=4),
    min_size=1,
    max_size=3,
)


def _index(blobs: dict[str, Any]) -> EpochIndex:
    _, first, _ = build_shard("node-a", blobs)
    _, second, _ = build_shard("node-b", {"only": 1})
    return EpochIndex(EPOCH, WRITER_ID, {"node-a": first, "node-b": second})


def _manifest(blobs: dict[str, Any], created: float) -> EpochManifest:
    index = _index(blobs)
    manifest = EpochManifest.for_index(index, index_key(EPOCH, WRITER_ID), index.to_json(), "msgpack", {"loss": 0.5})
    return dataclasses.replace(manifest, created_unix=created)


def parse_index(text: bytes) -> EpochIndex:
    return EpochIndex.from_json(text, "index", epoch=EPOCH, writer_id=WRITER_ID)


def parse_decision(text: bytes) -> Decision:
    return Decision.from_json(text, "decision", epoch=EPOCH, writer_id=WRITER_ID)


@FUZZ
@given(blobs=small_blob_sets, created=st.floats(0, 4e9), data=st.data())
def test_damaged_manifest_is_corrupted_error_or_parses(
    blobs: dict[str, Any], created: float, data: st.DataObject
) -> None:
    manifest = _manifest(blobs, created)
    text = manifest.to_json()
    assert EpochManifest.from_json(text, "manifest") == manifest
    parses_or_is_corrupted(EpochManifest.from_json, mutate_json(data, text), "manifest")


@FUZZ
@given(blobs=small_blob_sets, data=st.data())
def test_damaged_index_is_corrupted_error_or_parses(blobs: dict[str, Any], data: st.DataObject) -> None:
    index = _index(blobs)
    text = index.to_json()
    assert parse_index(text) == index
    parses_or_is_corrupted(parse_index, mutate_json(data, text))


@FUZZ
@given(blobs=small_blob_sets, created=st.floats(0, 4e9), data=st.data())
def test_damaged_decision_is_corrupted_error_or_parses(
    blobs: dict[str, Any], created: float, data: st.DataObject
) -> None:
    decision = Decision(EPOCH, WRITER_ID, "commit", _manifest(blobs, created))
    text = decision.to_json()
    assert parse_decision(text) == decision
    parses_or_is_corrupted(parse_decision, mutate_json(data, text))


@FUZZ
@given(blobs=small_blob_sets, data=st.data())
def test_damaged_receipt_is_corrupted_error_or_parses(blobs: dict[str, Any], data: st.DataObject) -> None:
    _, record, _ = build_shard(NODE, blobs)
    record = dataclasses.replace(record, receipt=receipt_key(EPOCH, WRITER_ID, "tok", NODE))
    text = record.receipt_json(EPOCH, WRITER_ID)
    assert NodeRecord.from_receipt(text, "receipt") == (EPOCH, WRITER_ID, record)
    parses_or_is_corrupted(NodeRecord.from_receipt, mutate_json(data, text), "receipt")


@FUZZ
@given(text=st.binary(max_size=256) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_are_no_manifest_no_index_no_decision_and_no_receipt(text: bytes) -> None:
    parses_or_is_corrupted(EpochManifest.from_json, text, "manifest")
    parses_or_is_corrupted(parse_index, text)
    parses_or_is_corrupted(parse_decision, text)
    parses_or_is_corrupted(NodeRecord.from_receipt, text, "receipt")


def _set(tree: dict[str, Any], path: tuple[Any, ...], value: Any) -> bytes:
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(tree).encode()


def _manifest_with(path: tuple[Any, ...], value: Any) -> bytes:
    return _set(json.loads(_manifest({"w": np.arange(3.0), "b": b"x"}, 1.7e9).to_json()), path, value)


def _index_with(path: tuple[Any, ...], value: Any) -> bytes:
    return _set(json.loads(_index({"w": np.arange(3.0), "b": b"x"}).to_json()), path, value)


MALFORMED_MANIFESTS = {
    "created_unix 10**400": _manifest_with(("created_unix",), 10**400),
    "index size -1": _manifest_with(("index", "size"), -1),
    "index key outside the epoch": _manifest_with(("index", "key"), "epochs/000000000099/w/index.json"),
    "metric Infinity": _manifest_with(("metrics", "loss"), math.inf),
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
}
MALFORMED_INDEXES = {
    "stats.bytes Infinity": _index_with(("nodes", "node-a", "stats", "bytes"), math.inf),
    "stats.seconds 10**400": _index_with(("nodes", "node-a", "stats", "seconds"), 10**400),
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
}
REFUSED_INDEXES = {
    "crc32c 2**32": _index_with(("nodes", "node-a", "crc32c"), 2**32),
    "shard ../escape": _index_with(("nodes", "node-a", "shard"), "../escape"),
    "shard in another epoch": _index_with(("nodes", "node-a", "shard"), "epochs/000000000001/x/a.shard"),
    "size -1": _index_with(("nodes", "node-a", "size"), -1),
    "no nodes": _index_with(("nodes",), {}),
}


@pytest.mark.parametrize("text", MALFORMED_MANIFESTS.values(), ids=MALFORMED_MANIFESTS.keys())
def test_malformed_manifest_is_corrupted_error_or_parses(text: bytes) -> None:
    parses_or_is_corrupted(EpochManifest.from_json, text, "manifest")


@pytest.mark.parametrize("text", MALFORMED_INDEXES.values(), ids=MALFORMED_INDEXES.keys())
def test_malformed_index_is_corrupted_error_or_parses(text: bytes) -> None:
    parses_or_is_corrupted(parse_index, text)


@pytest.mark.parametrize("text", REFUSED_INDEXES.values(), ids=REFUSED_INDEXES.keys())
def test_index_naming_bad_keys_or_values_is_corrupted_error(text: bytes) -> None:
    with pytest.raises(CheckpointCorruptedError):
        parse_index(text)


def test_deeply_nested_receipt_is_corrupted_error() -> None:
    with pytest.raises(CheckpointCorruptedError):
        NodeRecord.from_receipt(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "receipt")


# --------------------------------------------------------------------------- (4) arbitrary payloads

DTYPE_STRS = st.sampled_from(["<f8", ">i4", "|b1", "<U3", "|S2", "<c8", "<M8[ns]", "<m8", "<f2", "|u1"]) | st.text(
    max_size=6
)
SHAPES = st.lists(st.integers(-2, 6), max_size=4)
ORDERS = st.sampled_from(["C", "F", "X", ""])


def _ext_bodies(children: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    ndarray_body = st.tuples(
        DTYPE_STRS, SHAPES | st.lists(st.text(max_size=2), max_size=2), ORDERS, st.binary(max_size=24)
    )
    scalar_body = st.tuples(DTYPE_STRS, st.binary(max_size=16))
    return (
        st.binary(max_size=16)
        | children.map(msgpack.packb)
        | ndarray_body.map(lambda t: msgpack.packb(list(t)))
        | scalar_body.map(lambda t: msgpack.packb(list(t)))
        | st.text("0123456789-x", max_size=30).map(str.encode)
    )


msgpack_trees = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=4), children, max_size=3)
        | st.builds(msgpack.ExtType, st.sampled_from([1, 2, 3, 4]) | st.integers(0, 127), _ext_bodies(children))
    ),
    max_leaves=8,
)
payloads = st.binary(max_size=64) | msgpack_trees.map(msgpack.packb)


@pytest.mark.timeout(120)
@FUZZ
@given(
    payload=payloads,
    encoding=st.sampled_from([*codec.ENCODINGS, "bogus"]),
    dtype=DTYPE_STRS | st.none(),
    shape=SHAPES.map(tuple) | st.none(),
    order=ORDERS | st.none(),
    right_length=st.booleans(),
    right_crc=st.booleans(),
    offset=st.integers(0, 2**40),
)
def test_arbitrary_payload_decodes_or_is_corrupted_error(
    payload: bytes,
    encoding: str,
    dtype: str | None,
    shape: tuple[int, ...] | None,
    order: str | None,
    right_length: bool,
    right_crc: bool,
    offset: int,
) -> None:
    length = len(payload) if right_length else len(payload) + 1
    crc = codec.checksum(payload) if right_crc else codec.checksum(payload) ^ 0x5A5A5A5A
    entry = BlobEntry(offset, length, encoding, crc, dtype, shape, order)
    for view in (memoryview(payload), memoryview(bytearray(payload))):
        parses_or_is_corrupted(codec.decode_blob, entry, view, "blob")
    # the same fields as the manifest would hold them: validated first, then decoded
    raw = {"offset": offset, "length": length, "encoding": encoding, "crc32c": crc}
    raw.update(dtype=dtype, shape=list(shape) if shape is not None else None, order=order)
    checked = parses_or_is_corrupted(BlobEntry.from_json, raw, "blob")
    if checked is not None:
        parses_or_is_corrupted(codec.decode_blob, checked, memoryview(bytearray(payload)), "blob")
