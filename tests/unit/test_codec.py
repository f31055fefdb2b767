"""The shard codec: every supported blob round-trips with its type, unsupported values are
refused naming the node and the blob path, and damaged bytes are CheckpointCorruptedError."""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from asyncckpt import codec
from asyncckpt.codec import BlobEntry, EncodedBlob
from asyncckpt.errors import CheckpointCorruptedError

NODE = "trainer-0"


# --------------------------------------------------------------------------- helpers


def payload_of(blob: EncodedBlob) -> bytes:
    return b"".join(bytes(view) for view in blob.buffers)


def entry_via_json(blob: EncodedBlob, offset: int, crc: int) -> BlobEntry:
    """The entry as a reader sees it: through the manifest's JSON and back."""
    raw = json.loads(json.dumps(blob.entry(offset, crc).to_json()))
    return BlobEntry.from_json(raw, f"blob {blob.name!r}")


def round_trip(value: Any, *, readonly: bool = False) -> Any:
    """encode -> concatenate buffers -> entry through JSON -> decode."""
    (blob,) = codec.encode_blobs(NODE, {"blob": value})
    payload = payload_of(blob)
    assert blob.length == len(payload)
    entry = entry_via_json(blob, 0, codec.checksum(payload))
    view = memoryview(payload) if readonly else memoryview(bytearray(payload))
    return codec.decode_blob(entry, view, "test blob")


def assert_same(decoded: Any, original: Any) -> None:
    """Deep equality that also checks types, dtypes (incl. byte order) and NaN positions."""
    assert type(decoded) is type(original), (type(decoded), type(original))
    if isinstance(original, np.ndarray):
        assert decoded.dtype.str == original.dtype.str
        assert decoded.shape == original.shape
        equal_nan = original.dtype.kind in "fcmM"
        assert np.array_equal(decoded, original, equal_nan=equal_nan)
    elif isinstance(original, np.generic):
        assert_same(np.asarray(decoded), np.asarray(original))
    elif isinstance(original, float):
        assert (math.isnan(decoded) and math.isnan(original)) or (
            decoded == original and math.copysign(1, decoded) == math.copysign(1, original)
        )
    elif isinstance(original, (list, tuple)):
        assert len(decoded) == len(original)
        for d, o in zip(decoded, original):
            assert_same(d, o)
    elif isinstance(original, dict):
        assert list(decoded) == list(original)
        for key in original:
            assert_same(decoded[key], original[key])
    else:
        assert decoded == original


# --------------------------------------------------------------------------- arrays


def _ints(dtype: str) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.array([0, 1, info.min, info.max, info.max // 3], dtype=dtype)


def _floats(dtype: str) -> np.ndarray:
    info = np.finfo(dtype)
    return np.array([0.0, -0.0, 1.5, np.nan, np.inf, -np.inf, info.max, info.tiny], dtype=dtype)


ARRAYS = {
    "bool": np.array([True, False, True]),
    **{name: _ints(name) for name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
    **{name: _floats(name) for name in ("float16", "float32", "float64", "longdouble")},
    "complex64": np.array([1 + 2j, np.nan + 1j, np.inf - 1j, 0j], dtype=np.complex64),
    "complex128": np.array([1 + 2j, complex(np.nan, np.nan), -np.inf + 0j], dtype=np.complex128),
    "clongdouble": np.array([1 + 2j, 3 - 4j], dtype=np.clongdouble),
    "datetime64[ns]": np.array(["2024-02-29T12:34:56.123456789", "NaT", "1970-01-01"], dtype="datetime64[ns]"),
    "datetime64[D]": np.array(["1900-01-01", "2262-04-11", "NaT"], dtype="datetime64[D]"),
    "timedelta64[s]": np.array([0, -5, 86400, "NaT"], dtype="timedelta64[s]"),
    "bytes S5": np.array([b"ab", b"", b"\x00xyz\x01", b"hello"], dtype="S5"),
    "unicode U4": np.array(["héé", "", "€🙂", "abcd"], dtype="U4"),
    ">i4": np.arange(-3, 7, dtype=">i4"),
    ">f8": np.array([1.25, np.nan, -np.inf], dtype=">f8"),
    ">c16": np.array([1 + 2j, -3j], dtype=">c16"),
    ">u2": np.array([0, 1, 65535], dtype=">u2"),
    ">M8[us]": np.array(["2001-09-09T01:46:40", "NaT"], dtype=">M8[us]"),
    ">U3": np.array(["ab", "xyz"], dtype=">U3"),
    "0-d float": np.array(3.5),
    "0-d int8": np.array(-7, dtype=np.int8),
    "0-d bool": np.array(True),
    "0-d unicode": np.array("zero-d"),
    "0-d >f8": np.array(2.5, dtype=">f8"),
    "empty (0,)": np.zeros((0,), dtype=np.float32),
    "empty (3, 0)": np.zeros((3, 0), dtype=np.int64),
    "empty (0, 2, 5) F": np.zeros((0, 2, 5), dtype=np.uint8, order="F"),
    "empty S3": np.zeros((0,), dtype="S3"),
    "2-d C": np.arange(12, dtype=np.float64).reshape(3, 4),
    "3-d C": np.arange(60, dtype=np.int16).reshape(3, 4, 5),
    "stepped slice": np.arange(100, dtype=np.int32)[3:90:7],
    "negative step": np.arange(10, dtype=np.float32)[::-1],
    "2-d stepped": np.arange(48, dtype=np.float64).reshape(6, 8)[::2, 1::3],
    "transpose (F)": np.arange(12, dtype=np.int64).reshape(3, 4).T,
    "3-d transpose axes": np.arange(24, dtype=np.uint16).reshape(2, 3, 4).transpose(1, 0, 2),
    "Fortran 2-d": np.asfortranarray(np.arange(20, dtype=np.complex64).reshape(4, 5)),
    "Fortran 3-d big-endian": np.asfortranarray(np.arange(24, dtype=">f4").reshape(2, 3, 4)),
    "non-contiguous big-endian": np.arange(30, dtype=">i8").reshape(5, 6)[:, ::2],
    "non-contiguous datetime": np.arange(0, 40, dtype="datetime64[s]")[::4],
    "non-contiguous unicode": np.array(["a", "bb", "ccc", "dddd"])[::2],
    "broadcast (zero strides)": np.broadcast_to(np.arange(3, dtype=np.float64), (4, 3)),
}


@pytest.mark.parametrize("original", ARRAYS.values(), ids=ARRAYS.keys())
@pytest.mark.parametrize("readonly", [False, True], ids=["writable-payload", "readonly-payload"])
def test_array_round_trips_with_dtype_shape_and_values(original: np.ndarray, readonly: bool) -> None:
    decoded = round_trip(original, readonly=readonly)
    assert_same(decoded, original)
    assert decoded.flags.writeable
    decoded[...] = decoded  # writing must not raise, even for a read-only payload


@pytest.mark.parametrize(
    "original",
    [ARRAYS["Fortran 2-d"], ARRAYS["transpose (F)"], ARRAYS["Fortran 3-d big-endian"]],
    ids=["fortran", "transpose", "fortran-big-endian"],
)
def test_fortran_array_is_stored_without_copy_and_decoded_fortran_ordered(original: np.ndarray) -> None:
    (blob,) = codec.encode_blobs(NODE, {"w": original})
    assert blob.order == "F"
    assert np.shares_memory(np.frombuffer(blob.buffers[0], dtype=np.uint8), original)
    decoded = round_trip(original)
    assert decoded.flags.f_contiguous
    assert_same(decoded, original)


def test_array_decoded_from_writable_payload_is_a_zero_copy_view() -> None:
    original = np.arange(16, dtype=np.float32)
    (blob,) = codec.encode_blobs(NODE, {"w": original})
    buffer = bytearray(payload_of(blob))
    decoded = codec.decode_blob(entry_via_json(blob, 0, codec.checksum(buffer)), memoryview(buffer), "w")
    assert np.shares_memory(decoded, np.frombuffer(buffer, dtype=np.uint8))
    decoded[0] = 42.0
    assert np.frombuffer(buffer, dtype=np.float32)[0] == 42.0


def test_array_decoded_from_readonly_payload_is_a_writable_copy() -> None:
    original = np.arange(16, dtype=np.float32)
    (blob,) = codec.encode_blobs(NODE, {"w": original})
    data = payload_of(blob)
    decoded = codec.decode_blob(entry_via_json(blob, 0, codec.checksum(data)), memoryview(data), "w")
    assert not np.shares_memory(decoded, np.frombuffer(data, dtype=np.uint8))
    decoded[0] = 42.0
    assert data == payload_of(blob)


# --------------------------------------------------------------------------- scalars and plain values

NUMPY_SCALARS = {
    "float16": np.float16(1.5),
    "float32 nan": np.float32(np.nan),
    "float64": np.float64(-2.25),
    "longdouble": np.longdouble(1) / 3,
    "int8": np.int8(-128),
    "int64 min": np.int64(-(2**63)),
    "uint64 max": np.uint64(2**64 - 1),
    "bool_": np.bool_(True),
    "bool_ false": np.bool_(False),
    "complex64": np.complex64(1 + 2j),
    "complex128": np.complex128(complex(np.inf, -1)),
    "datetime64": np.datetime64("2024-01-02T03:04:05", "s"),
    "datetime64 NaT": np.datetime64("NaT", "ns"),
    "timedelta64": np.timedelta64(-90, "m"),
    "str_": np.str_("numpy str"),
    "bytes_": np.bytes_(b"numpy bytes"),
}


@pytest.mark.parametrize("original", NUMPY_SCALARS.values(), ids=NUMPY_SCALARS.keys())
def test_numpy_scalar_round_trips_with_its_type(original: np.generic) -> None:
    assert_same(round_trip(original), original)


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        (b"raw \x00 bytes", b"raw \x00 bytes"),
        (b"", b""),
        (bytearray(b"\xff\x00\x01"), b"\xff\x00\x01"),
        (memoryview(b"view"), b"view"),
        (memoryview(np.arange(4, dtype=np.int32)), np.arange(4, dtype=np.int32).tobytes()),
        (memoryview(np.arange(6, dtype=np.uint8).reshape(2, 3)), bytes(range(6))),
        (memoryview(bytearray(b"abcdef"))[1:4], b"bcd"),
    ],
    ids=["bytes", "empty", "bytearray", "memoryview", "memoryview-int32", "memoryview-2d", "memoryview-slice"],
)
@pytest.mark.parametrize("readonly", [False, True], ids=["writable-payload", "readonly-payload"])
def test_bytes_like_blob_comes_back_as_bytes(original: Any, expected: bytes, readonly: bool) -> None:
    (blob,) = codec.encode_blobs(NODE, {"blob": original})
    assert blob.encoding == "bytes"
    assert_same(round_trip(original, readonly=readonly), expected)


def test_non_contiguous_memoryview_round_trips_as_its_bytes() -> None:
    # the module docstring promises memoryview support; a strided view must be copied, not refused
    original = memoryview(b"abcdefgh")[::2]
    assert_same(round_trip(original), b"aceg")


@pytest.mark.parametrize(
    "original",
    [
        "",
        "héllo wörld € 🙂",
        "nul \x00 inside",
        0,
        -1,
        2**63 - 1,
        -(2**63),
        -(2**63) - 1,
        2**64 - 1,
        2**64,
        10**100,
        -(10**100),
        0.0,
        -0.0,
        1e308,
        5e-324,
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        None,
    ],
    ids=repr,
)
def test_plain_value_round_trips_with_its_type(original: Any) -> None:
    assert_same(round_trip(original), original)


@pytest.mark.parametrize(
    "original",
    [
        [],
        (),
        {},
        [1, "two", 3.0, None, True],
        (1, (2, (3, ())), [4, (5,)]),
        {"a": 1, "b": [2, (3, {"c": None})], "": "empty key", "ünïcode": b"bin"},
        {"z": 1, "a": 2, "m": 3},  # insertion order survives
        [[[[[[[[[[[]]]]]]]]]]],
        [2**70, -(2**70), (2**65,), {"big": 10**40}],
        [math.nan, (math.inf, -0.0)],
    ],
    ids=[
        "list",
        "tuple",
        "dict",
        "flat-list",
        "nested-tuples",
        "nested-dict",
        "dict-order",
        "deep",
        "bigints",
        "floats",
    ],
)
def test_container_round_trips_with_types_preserved(original: Any) -> None:
    assert_same(round_trip(original), original)


def test_bytes_like_values_inside_containers_come_back_as_bytes() -> None:
    original = [bytearray(b"ba"), (memoryview(b"mv"),), {"k": b"b"}]
    assert_same(round_trip(original), [b"ba", (b"mv",), {"k": b"b"}])


@pytest.mark.parametrize("readonly", [False, True], ids=["writable-payload", "readonly-payload"])
def test_arrays_nested_in_containers_round_trip_and_are_writable(readonly: bool) -> None:
    original = {
        "weights": np.arange(6, dtype=np.float32).reshape(2, 3),
        "layers": [np.ones(3, dtype=np.float16), (np.int8(3), np.asfortranarray(np.eye(3, dtype=">f8")))],
        "strided": np.arange(20, dtype=np.int64)[::3],
        "empty": np.zeros((3, 0), dtype=np.complex128),
        "scalar": np.array(7, dtype=np.uint32),
        "step": 12,
    }
    decoded = round_trip(original, readonly=readonly)
    assert_same(decoded, original)
    for array in (decoded["weights"], decoded["layers"][0], decoded["layers"][1][1], decoded["strided"]):
        assert array.flags.writeable
        array[...] = 0


def test_memmap_round_trips_as_a_plain_array_of_its_data(tmp_path: Any) -> None:
    mapped = np.memmap(tmp_path / "weights.bin", dtype=np.float32, mode="w+", shape=(3, 4))
    mapped[:] = np.arange(12, dtype=np.float32).reshape(3, 4)
    decoded = round_trip(mapped)
    assert type(decoded) is np.ndarray
    assert_same(decoded, np.asarray(mapped))
    del mapped  # closes the mapping


# --------------------------------------------------------------------------- unsupported values


class _Custom:
    pass


def _matrix() -> np.matrix[Any, Any]:
    with warnings.catch_warnings():  # numpy discourages np.matrix: that is the point here
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix([[1, 2], [3, 4]])


def _cyclic_list() -> list[Any]:
    cycle: list[Any] = [1]
    cycle.append(cycle)
    return cycle


UNSUPPORTED = {
    "object": (object(), "builtins.object"),
    "custom class": (_Custom(), "_Custom"),
    "set": ({1, 2}, "builtins.set"),
    "frozenset": (frozenset(), "builtins.frozenset"),
    "complex": (1 + 2j, "builtins.complex"),
    "structured dtype": (np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]), "dtype"),
    "object dtype": (np.array([1, None], dtype=object), "dtype object"),
    "structured numpy scalar": (np.zeros(1, dtype=[("a", "i4")])[0], "dtype [('a', '<i4')]"),
    "masked array": (
        np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False]),
        "numpy.ma.MaskedArray: masked arrays are not supported (save .data and .mask as two blobs)",
    ),
    "masked array without a mask": (np.ma.masked_array(np.arange(3)), "masked arrays are not supported"),
    "matrix": (_matrix(), "numpy.matrix: ndarray subclasses are not supported"),
    "record array": (np.rec.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]), "ndarray subclasses"),
}


@pytest.mark.parametrize(("value", "type_name"), UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_top_level_value_is_type_error_naming_node_and_blob(value: Any, type_name: str) -> None:
    with pytest.raises(TypeError) as info:
        codec.encode_blobs(NODE, {"good": 1, "bad_blob": value})
    message = str(info.value)
    assert f"node {NODE!r}" in message
    assert "bad_blob" in message
    assert type_name in message


@pytest.mark.parametrize(("value", "type_name"), UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_nested_value_is_type_error_naming_its_path(value: Any, type_name: str) -> None:
    with pytest.raises(TypeError) as info:
        codec.encode_blobs(NODE, {"opt": {"state": [0, ("ok", value)]}})
    message = str(info.value)
    assert f"node {NODE!r}" in message
    assert "opt['state'][1][1]" in message
    assert type_name in message


@pytest.mark.parametrize(
    ("key", "shown"),
    [(1.5, "1.5"), (True, "True"), (None, "None"), ((1, 2), "(1, 2)"), (np.int64(7), "np.int64(7)"), (b"k", "b'k'")],
    ids=["float", "bool", "None", "tuple", "numpy-int", "bytes"],
)
def test_dict_with_key_neither_str_nor_int_is_type_error_naming_the_key_path(key: Any, shown: str) -> None:
    with pytest.raises(TypeError) as info:
        codec.encode_blobs(NODE, {"cfg": {"ok": {key: "seven"}}})
    message = str(info.value)
    assert f"node {NODE!r}" in message
    assert f"cfg['ok'][{shown}]" in message
    assert "dict key" in message


@pytest.mark.parametrize(
    "original",
    [
        {0: "zero", -1: "minus one", 2**63 - 1: "max", -(2**63): "min", 2**64 - 1: "umax"},
        {2**64: "big", -(2**64) - 5: "negative big", 10**40: {1: (2, {3: None})}},
        {"lr": 0.1, 7: "seven", "7": "str seven"},  # 7 and "7" stay apart
        {"state": {0: {"step": 3}, 1: {"step": 4}}, "param_groups": [{"params": [0, 1], "betas": (0.9, 0.99)}]},
    ],
    ids=["int-keys", "big-int-keys", "mixed-keys", "optimizer-shaped"],
)
def test_dict_with_int_keys_round_trips_keeping_key_types_and_order(original: dict[Any, Any]) -> None:
    decoded = round_trip(original)
    assert_same(decoded, original)
    assert [type(k) for k in decoded] == [type(k) for k in original]


def test_ordered_dict_comes_back_as_a_dict_in_the_same_order() -> None:
    original = OrderedDict([("z", 1), ("a", np.arange(3)), ("m", 2)])
    decoded = round_trip(original)
    assert_same(decoded, dict(original))


def test_cyclic_list_is_type_error_not_recursion_error() -> None:
    with pytest.raises(TypeError) as info:
        codec.encode_blobs(NODE, {"loop": _cyclic_list()})
    message = str(info.value)
    assert f"node {NODE!r}" in message
    assert "blob 'loop[1][1]" in message
    assert "cyclic" in message


def test_str_with_lone_surrogate_is_refused_naming_node_and_blob() -> None:
    # a str that UTF-8 cannot encode must fail like any unsupported value, naming where it is
    with pytest.raises((TypeError, ValueError)) as info:
        codec.encode_blobs(NODE, {"vocab": ["ok", "\ud800"]})
    message = str(info.value)
    assert f"node {NODE!r}" in message
    assert "vocab[1]" in message


@pytest.mark.parametrize("name", ["", 1, None, b"bytes-name"], ids=repr)
def test_blob_name_must_be_non_empty_str(name: Any) -> None:
    with pytest.raises(TypeError, match="blob names must be non-empty str") as info:
        codec.encode_blobs(NODE, {"fine": 1, name: 2})
    assert f"node {NODE!r}" in str(info.value)


def test_blob_name_that_utf8_cannot_encode_is_refused_before_any_byte_is_written() -> None:
    # otherwise encoding succeeds and shard_trailer fails mid-upload, after the payloads were sent
    with pytest.raises(TypeError) as info:
        codec.encode_blobs(NODE, {"fine": 1, "bad\ud800": 2})
    assert f"node {NODE!r}" in str(info.value)


# --------------------------------------------------------------------------- whole shards


SHARD_BLOBS: dict[str, Any] = {
    "weights": np.arange(24, dtype=np.float32).reshape(4, 6),
    "fortran": np.asfortranarray(np.arange(6, dtype=">i8").reshape(2, 3)),
    "empty": np.zeros((3, 0)),
    "raw": b"\x00\x01raw",
    "optimizer": {"step": 10, "lr": 1e-3, "moments": [np.ones(2), (np.float16(0.5), None)]},
    "big": 2**80,
}


def assemble_shard(node: str, blobs: dict[str, Any]) -> tuple[bytes, dict[str, BlobEntry]]:
    """Header, payloads and trailer, laid out exactly as ShardWriter.write does."""
    header = codec.shard_header(node)
    parts = [header]
    index: dict[str, BlobEntry] = {}
    offset = len(header)
    for blob in codec.encode_blobs(node, blobs):
        crc = 0
        for view in blob.buffers:
            crc = codec.checksum(view, crc)
            parts.append(bytes(view))
        index[blob.name] = blob.entry(offset, crc)
        offset += blob.length
    parts.append(codec.shard_trailer(index, offset))
    return b"".join(parts), index


def test_index_packed_blob_by_blob_is_the_index_of_the_whole_map_and_within_the_size_bound() -> None:
    header = codec.shard_header(NODE)
    encoded = codec.encode_blobs(NODE, SHARD_BLOBS)
    index = codec.ShardIndex(len(encoded))
    whole: dict[str, BlobEntry] = {}
    offset = len(header)
    for blob in encoded:
        crc = codec.checksum(blob.payload)
        index.add(blob, offset, crc)
        whole[blob.name] = blob.entry(offset, crc)
        offset += blob.length
    trailer, index_crc = index.trailer(offset)
    assert bytes(trailer) == codec.shard_trailer(whole, offset)
    assert index_crc == codec.checksum(memoryview(trailer)[: -codec.TRAILER_SIZE])
    size = offset + len(trailer)
    assert size <= codec.shard_size_bound(header, encoded) <= size + 4 * len(encoded)  # CRCs packed widest


def test_encoded_blob_derives_payload_length_dtype_and_shape_from_its_source() -> None:
    fortran = np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3))
    (blob,) = codec.encode_blobs(NODE, {"f": fortran})
    assert (blob.encoding, blob.length, blob.dtype, blob.shape, blob.order) == ("ndarray", 24, ">i4", (2, 3), "F")
    assert blob.payload.nbytes == 24 and np.shares_memory(np.frombuffer(blob.payload, dtype=np.uint8), fortran)
    (raw,) = codec.encode_blobs(NODE, {"r": memoryview(np.arange(4, dtype=np.int16))})
    assert (raw.encoding, raw.length, raw.dtype, raw.shape, bytes(raw.payload)) == (
        "bytes",
        8,
        None,
        None,
        np.arange(4, dtype=np.int16).tobytes(),
    )


def test_assembled_shard_parses_back_to_its_blobs() -> None:
    data, index = assemble_shard(NODE, SHARD_BLOBS)
    view = memoryview(bytearray(data))
    header = codec.parse_header(view, "shard")
    assert header["node"] == NODE
    index_offset, index_length, index_crc = codec.parse_trailer(view[-codec.TRAILER_SIZE :], len(data), "shard")
    parsed = codec.parse_index(view[index_offset : index_offset + index_length], index_crc, "shard")
    assert parsed == index
    assert list(parsed) == sorted(SHARD_BLOBS)
    decoded = {
        name: codec.decode_blob(entry, view[entry.offset : entry.offset + entry.length], f"blob {name!r}")
        for name, entry in parsed.items()
    }
    assert_same(decoded, {name: SHARD_BLOBS[name] for name in sorted(SHARD_BLOBS)})


def test_each_blob_of_a_shard_decodes_from_its_own_byte_range() -> None:
    data, index = assemble_shard(NODE, SHARD_BLOBS)
    for name, entry in index.items():
        payload = memoryview(data[entry.offset : entry.offset + entry.length])  # one ranged GET
        assert_same(codec.decode_blob(entry, payload, name), SHARD_BLOBS[name])


@pytest.mark.parametrize("name", sorted(set(SHARD_BLOBS) - {"empty"}))
def test_corrupted_payload_byte_is_checkpoint_corrupted_error(name: str) -> None:
    data, index = assemble_shard(NODE, SHARD_BLOBS)
    entry = index[name]
    payload = bytearray(data[entry.offset : entry.offset + entry.length])
    payload[len(payload) // 2] ^= 0x01
    with pytest.raises(CheckpointCorruptedError, match="CRC32C mismatch") as info:
        codec.decode_blob(entry, memoryview(payload), f"node {NODE!r}, blob {name!r}")
    assert name in str(info.value)


@pytest.mark.parametrize("delta", [-1, 1], ids=["short", "long"])
def test_payload_of_wrong_length_is_checkpoint_corrupted_error(delta: int) -> None:
    data, index = assemble_shard(NODE, SHARD_BLOBS)
    entry = index["weights"]
    payload = memoryview(data[entry.offset : entry.offset + entry.length + delta])
    with pytest.raises(CheckpointCorruptedError, match=f"expected {entry.length} bytes"):
        codec.decode_blob(entry, payload, "blob 'weights'")


def test_truncated_shard_has_no_valid_trailer() -> None:
    data, _ = assemble_shard(NODE, SHARD_BLOBS)
    short = data[:-5]
    with pytest.raises(CheckpointCorruptedError):
        codec.parse_trailer(short[-codec.TRAILER_SIZE :], len(short), "shard")
    with pytest.raises(CheckpointCorruptedError, match="truncated"):
        codec.parse_trailer(data[-5:], len(data), "shard")


def test_corrupted_index_is_checkpoint_corrupted_error() -> None:
    data, _ = assemble_shard(NODE, SHARD_BLOBS)
    index_offset, index_length, index_crc = codec.parse_trailer(data[-codec.TRAILER_SIZE :], len(data), "shard")
    body = bytearray(data[index_offset : index_offset + index_length])
    body[3] ^= 0x40
    with pytest.raises(CheckpointCorruptedError, match="index checksum mismatch"):
        codec.parse_index(body, index_crc, "shard")


@pytest.mark.parametrize(
    "damage",
    [lambda d: b"NOTASHRD" + d[8:], lambda d: d[:3], lambda d: d[:12] + b"\xc1" + d[13:]],
    ids=["bad-magic", "three-bytes", "bad-msgpack"],
)
def test_damaged_header_is_checkpoint_corrupted_error(damage: Any) -> None:
    data, _ = assemble_shard(NODE, SHARD_BLOBS)
    with pytest.raises(CheckpointCorruptedError, match="invalid shard header"):
        codec.parse_header(damage(data), "shard")


@given(st.binary(max_size=4096), st.binary(max_size=4096))
def test_crc32c_of_a_concatenation_combines_from_the_parts(a: bytes, b: bytes) -> None:
    assert codec.checksum_combine(codec.checksum(a), codec.checksum(b), len(b)) == codec.checksum(a + b)


def test_crc32c_combine_doubles_a_run_of_zeros_up_to_a_mebibyte() -> None:
    crc, length = codec.checksum(bytes(1)), 1
    while length < 1 << 20:
        crc, length = codec.checksum_combine(crc, crc, length), 2 * length
    assert crc == codec.checksum(bytes(1 << 20))


# --------------------------------------------------------------------------- fingerprints


def test_a_fingerprint_is_each_buffers_crc32c_and_the_xxh3_128_of_all_in_order() -> None:
    parts = [memoryview(np.arange(n, dtype=np.uint8).tobytes()) for n in (0, 1, 300_000, 17)]
    whole = b"".join(bytes(p) for p in parts)
    crcs, digest, each = codec.fingerprint(parts)
    assert crcs == [codec.checksum(p) for p in parts] and digest == xxhash.xxh3_128(whole).digest()
    assert codec.combine_checksums(crcs, [p.nbytes for p in parts]) == codec.checksum(whole)
    assert each == [None] * len(parts)
    assert codec.fingerprint(parts, 17)[2] == [
        None,
        None,
        xxhash.xxh3_128(parts[2]).digest(),
        xxhash.xxh3_128(b"".join([parts[3]])).digest(),
    ]


def test_a_tree_entry_with_leaves_stored_elsewhere_round_trips_and_spans_the_rest() -> None:
    tree = {"a": np.ones(2048, dtype=np.float32), "b": np.arange(4096, dtype=np.int16), "step": 3}
    blob = codec.encode_blob("w", tree)
    digests = [b"\x02" * 16, b"\x03" * 16]
    entry = blob.entry(96, 7, None, b"\x01" * 16, None, digests, {0: (1, 123_456)})
    skeleton = len(blob.source)
    a, b = entry.leaves
    assert (a.ref, a.offset, a.xxh3) == (1, 123_456, b"\x02" * 16) and (b.ref, b.offset) == (None, skeleton)
    assert entry.length == skeleton + 8192 and entry.payload_length == blob.length and entry.leaf_refs
    assert BlobEntry.from_json(entry.to_json(), "w") == entry
    with pytest.raises(CheckpointCorruptedError, match="stored in others"):
        BlobEntry.from_json({**entry.to_json(), "ref": 0}, "w")
    with pytest.raises(CheckpointCorruptedError, match="not contiguous"):
        BlobEntry.from_json(blob.entry(96, 7, None, None, None, None, {1: (0, 9)}).to_json() | {"skeleton": 1}, "w")


@pytest.mark.parametrize(
    "value",
    [np.ones((4, 5), dtype=np.float32), {"w": np.ones(2048, dtype=np.float32), "step": 3}, b"abc"],
    ids=["ndarray", "tree", "bytes"],
)
def test_an_entry_with_a_digest_and_a_pointer_round_trips(value: Any) -> None:
    blob = codec.encode_blob("w", value)
    entry = blob.entry(96, 7, None, b"\x01" * 16, 2)
    assert (entry.xxh3, entry.ref) == (b"\x01" * 16, 2)
    assert BlobEntry.from_json(blob.entry_json(96, 7, None, b"\x01" * 16, 2), "w") == entry
    assert BlobEntry.from_json(entry.to_json(), "w") == entry


@pytest.mark.parametrize("fields", [{"xxh3": b"short"}, {"xxh3": "0" * 32}, {"ref": -1}, {"ref": True}])
def test_a_malformed_digest_or_pointer_is_corrupted_error(fields: dict[str, Any]) -> None:
    raw = {**codec.encode_blob("w", b"abc").entry_json(0, 1), **fields}
    with pytest.raises(CheckpointCorruptedError, match="blob index entry"):
        BlobEntry.from_json(raw, "w")


@pytest.mark.parametrize("version", [1, 2])
def test_header_of_a_readable_format_version_parses(version: int) -> None:
    body = msgpack.packb({"format": "asyncckpt-shard", "version": version, "node": NODE})
    header = codec.parse_header(b"ACKPTSH1" + len(body).to_bytes(4, "little") + body, "shard")
    assert header["version"] == version


def test_header_of_a_future_format_version_is_corrupted_error() -> None:
    body = msgpack.packb({"format": "asyncckpt-shard", "version": codec.FORMAT_VERSION + 1, "node": NODE})
    with pytest.raises(CheckpointCorruptedError, match="unsupported shard format version"):
        codec.parse_header(b"ACKPTSH1" + len(body).to_bytes(4, "little") + body, "shard")


def test_format_1_blob_bytes_still_decode() -> None:
    # a version 1 writer's msgpack payload (arrays as NDARRAY with four fields, str keys)
    legacy = msgpack.packb(
        {"w": msgpack.ExtType(1, msgpack.packb(["<f4", [2], "C", np.arange(2, dtype="<f4").tobytes()]))}
    )
    entry = BlobEntry.from_json({"offset": 0, "length": len(legacy), "encoding": "msgpack", "crc32c": 0}, "b")
    decoded = codec.decode_blob(entry, memoryview(legacy), "b", verify=False)
    assert_same(decoded, {"w": np.arange(2, dtype="<f4")})
