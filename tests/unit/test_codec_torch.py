"""torch tensors and ml_dtypes arrays in the codec: every dtype round-trips bit-exact with its
type, containers of large tensors are trees whose leaves are written from the caller's
memory, and damaged or malformed trees are CheckpointCorruptedError."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

from asyncckpt import arrays, codec  # noqa: E402
from asyncckpt.codec import BlobEntry, EncodedBlob  # noqa: E402
from asyncckpt.errors import CheckpointCorruptedError  # noqa: E402

NODE = "trainer-0"


def payload_of(blob: EncodedBlob) -> bytes:
    return b"".join(bytes(view) for view in blob.buffers)


def encode_one(value: Any) -> EncodedBlob:
    (blob,) = codec.encode_blobs(NODE, {"blob": value})
    return blob


def entry_of(blob: EncodedBlob) -> BlobEntry:
    """The entry as a reader sees it: through the index's JSON and back."""
    raw = json.loads(json.dumps(blob.entry(0, codec.checksum(payload_of(blob))).to_json()))
    return BlobEntry.from_json(raw, f"blob {blob.name!r}")


def round_trip(value: Any, *, readonly: bool = False) -> Any:
    blob = encode_one(value)
    payload = payload_of(blob)
    assert blob.length == len(payload)
    view = memoryview(payload) if readonly else memoryview(bytearray(payload))
    return codec.decode_blob(entry_of(blob), view, "test blob")


def bits(tensor: Any) -> bytes:
    """The bytes of a tensor's logical values, in C order (conj/neg applied)."""
    host = tensor.detach().resolve_conj().resolve_neg().cpu().reshape(-1).contiguous()
    if host.numel() == 0:
        return b""
    return bytes(host.view(torch.uint8).numpy())


def assert_same_tensor(decoded: Any, original: Any) -> None:
    assert type(decoded) is torch.Tensor
    assert decoded.dtype == original.dtype
    assert decoded.shape == original.shape
    assert decoded.device.type == "cpu"
    assert bits(decoded) == bits(original)


def random_bits(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> Any:
    """A tensor of ``dtype`` whose bytes are random (NaN payloads, -0.0, subnormals...)."""
    size = torch.empty(0, dtype=dtype).element_size()
    count = int(np.prod(shape))
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    raw = np.random.default_rng(seed).integers(0, 256, size=count * size, dtype=np.uint8)
    if dtype == torch.bool:
        raw &= 1
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def special_floats(dtype: Any) -> Any:
    """-0.0, a quiet and a signalling NaN with payloads, infinities, where the dtype has them."""
    size = torch.empty(0, dtype=dtype).element_size()
    patterns = {
        2: [0x8000, 0x7FC1, 0xFFA5, 0x7C01, 0x7F81, 0x0001],
        4: [0x80000000, 0x7FC00001, 0xFFA5A5A5, 0x7F800001, 0x00000001],
        8: [0x8000000000000000, 0x7FF8000000000001, 0xFFF5A5A5A5A5A5A5, 0x0000000000000001],
        1: [0x80, 0x7F, 0xFF, 0x01, 0xFE],
    }[size]
    carrier = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
    return torch.from_numpy(np.array(patterns, dtype=carrier).view(np.uint8).copy()).view(dtype)


DTYPES = {
    str(d).removeprefix("torch."): d
    for d in [
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.float8_e4m3fnuz,
        torch.float8_e5m2fnuz,
        torch.float8_e8m0fnu,
    ]
}
FLOATS = [name for name, d in DTYPES.items() if d.is_floating_point and d.itemsize > 1] + [
    "float8_e4m3fn",
    "float8_e5m2",
]
SHAPES = {"0-d": (), "empty": (0,), "empty 2-d": (3, 0), "vector": (7,), "3-d": (2, 3, 5)}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_tensor_of_every_dtype_and_shape_round_trips_bit_exact(dtype: Any, shape: tuple[int, ...]) -> None:
    original = random_bits(dtype, shape)
    assert_same_tensor(round_trip(original), original)
    assert_same_tensor(round_trip({"nested": [original]})["nested"][0], original)


@pytest.mark.parametrize("name", FLOATS)
def test_nan_payloads_and_negative_zero_survive(name: str) -> None:
    original = special_floats(DTYPES[name])
    assert_same_tensor(round_trip(original), original)
    big = original.repeat(4096)  # a tree leaf, not inline
    assert_same_tensor(round_trip({"w": big})["w"], big)


LAYOUTS = {
    "transpose": lambda: torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    "stepped": lambda: torch.arange(100, dtype=torch.int64)[3:90:7],
    "2-d stepped bf16": lambda: torch.arange(48, dtype=torch.float32).reshape(6, 8)[::2, 1::3].to(torch.bfloat16),
    "expanded": lambda: torch.arange(3, dtype=torch.float64).expand(4, 3),
    "conj": lambda: torch.tensor([1 + 2j, -3 - 4j], dtype=torch.complex64).conj(),
    "conj transpose": lambda: (torch.arange(6.0, dtype=torch.float64) * (1 + 1j)).reshape(2, 3).conj().t(),
    "neg bit": lambda: torch.tensor([1 + 2j, 3j]).conj().imag,
    "parameter": lambda: torch.nn.Parameter(torch.arange(4, dtype=torch.float32)),
    "requires grad": lambda: torch.ones(3, requires_grad=True) * 2,
    "big non-contiguous float8": lambda: random_bits(torch.float8_e4m3fn, (128, 64)).t(),
}


@pytest.mark.parametrize("make", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_non_contiguous_conj_and_grad_tensors_round_trip_as_their_values(make: Any) -> None:
    original = make()
    assert_same_tensor(round_trip(original), original)
    assert_same_tensor(round_trip((original, 1))[0], original)


@pytest.mark.parametrize("readonly", [False, True], ids=["writable-payload", "readonly-payload"])
def test_decoded_tensors_are_writable_without_warnings(readonly: bool) -> None:
    original = {"w": torch.arange(2048, dtype=torch.float32), "b": torch.ones(2, dtype=torch.bfloat16)}
    decoded = round_trip(original, readonly=readonly)
    decoded["w"] += 1
    decoded["b"] += 1
    top = round_trip(torch.arange(8, dtype=torch.bfloat16), readonly=readonly)
    top += 1


# --------------------------------------------------------------------------- numpy + ml_dtypes

ML_NAMES = sorted(name for name in arrays.ML_DTYPE_NAMES if hasattr(ml_dtypes, name))


@pytest.mark.parametrize("name", ML_NAMES)
def test_numpy_array_with_ml_dtype_round_trips_bit_exact_under_its_name(name: str) -> None:
    dtype = np.dtype(getattr(ml_dtypes, name))
    carrier = np.uint8 if dtype.itemsize == 1 else np.uint16
    raw = np.random.default_rng(1).integers(0, 256, size=3000 * dtype.itemsize, dtype=np.uint8)
    original = raw.view(carrier).view(dtype).reshape(60, 50)
    for value in (original, original[::2, ::3], np.asfortranarray(original), original[0, 0]):
        blob = encode_one(value)
        if blob.encoding == "ndarray":
            assert blob.dtype == name
            assert entry_of(blob).to_json()["dtype"] == name
        decoded = round_trip(value)
        assert type(decoded) is type(value)
        assert decoded.dtype == dtype and decoded.shape == value.shape
        assert np.asarray(decoded).view(carrier).tobytes() == np.asarray(value).view(carrier).tobytes()
    decoded = round_trip({"leaf": original, "small": original[:2, :2]})
    assert decoded["leaf"].view(carrier).tobytes() == original.view(carrier).tobytes()


@pytest.mark.parametrize("spec", ["<V2", "|V1", "bfloat17", "float8", "<bfloat16", "object"])
def test_unknown_or_ambiguous_dtype_in_an_entry_is_corrupted_error(spec: str) -> None:
    raw = {"offset": 0, "length": 2, "encoding": "ndarray", "crc32c": 0, "dtype": spec, "shape": [1], "order": "C"}
    with pytest.raises(CheckpointCorruptedError, match="invalid blob index entry"):
        BlobEntry.from_json(raw, "blob 'x'")


# --------------------------------------------------------------------------- trees


def state_dict_like() -> dict[str, Any]:
    return {
        "layer.weight": torch.randn(64, 32),  # 8 KiB: a leaf
        "layer.bias": torch.randn(32),  # 128 B: inline
        "emb": torch.randn(100, 16).to(torch.bfloat16),  # 3200 B: inline
        "big.bf16": torch.randn(64, 64).to(torch.bfloat16),  # 8 KiB: a leaf
        "numpy": np.arange(2048, dtype=np.float64),  # 16 KiB: a leaf
        "step": 12,
        "groups": [{"params": [0, 1], "betas": (0.9, 0.999), "lr": torch.tensor(0.1)}],
    }


def test_container_of_large_tensors_is_a_tree_whose_leaves_are_the_callers_memory() -> None:
    original = state_dict_like()
    blob = encode_one(original)
    assert blob.encoding == "tree"
    assert [leaf.kind for leaf in blob.leaves] == ["torch", "torch", "numpy"]  # in the dict's order
    big_bf16, weight, numpy_leaf = original["big.bf16"], original["layer.weight"], original["numpy"]
    for leaf, source in zip(blob.leaves, [weight.numpy(), big_bf16.view(torch.int16).numpy(), numpy_leaf]):
        assert np.shares_memory(leaf.stored, source)
    views = blob.buffers
    assert len(views) == 4 and views[0].nbytes < 4096
    entry = entry_of(blob)
    assert entry.skeleton == views[0].nbytes
    assert [(leaf.offset, leaf.length) for leaf in entry.leaves] == [
        (views[0].nbytes, 8192),
        (views[0].nbytes + 8192, 8192),
        (views[0].nbytes + 16384, 16384),
    ]
    assert [leaf.dtype for leaf in entry.leaves] == ["<f4", "bfloat16", "<f8"]
    assert [leaf.kind for leaf in entry.leaves] == ["torch", "torch", "numpy"]
    for leaf, view in zip(entry.leaves, views[1:]):
        assert leaf.crc32c == codec.checksum(view)
    decoded = round_trip(original)
    assert list(decoded) == list(original)
    for key in ("layer.weight", "layer.bias", "emb", "big.bf16"):
        assert_same_tensor(decoded[key], original[key])
    assert np.array_equal(decoded["numpy"], original["numpy"]) and decoded["step"] == 12
    assert decoded["groups"][0]["betas"] == (0.9, 0.999)
    assert_same_tensor(decoded["groups"][0]["lr"], original["groups"][0]["lr"])


def test_tree_decoded_from_a_writable_payload_is_a_zero_copy_view() -> None:
    blob = encode_one({"w": torch.zeros(4096)})
    buffer = bytearray(payload_of(blob))
    decoded = codec.decode_blob(entry_of(blob), memoryview(buffer), "blob")
    decoded["w"][0] = 42.0
    assert np.frombuffer(buffer, dtype=np.float32, count=1, offset=len(buffer) - 4 * 4096)[0] == 42.0


def test_tree_index_entry_fits_the_size_bound_and_parses_back() -> None:
    blob = encode_one(state_dict_like())
    header = codec.shard_header(NODE)
    index = codec.ShardIndex(1)
    index.add(blob, len(header), codec.checksum(payload_of(blob)))
    trailer, crc = index.trailer(len(header) + blob.length)
    size = len(header) + blob.length + len(trailer)
    assert size <= codec.shard_size_bound(header, [blob]) <= size + 4 * (1 + len(blob.leaves))
    parsed = codec.parse_index(memoryview(trailer)[: -codec.TRAILER_SIZE], crc, "shard")
    assert parsed["blob"] == blob.entry(len(header), codec.checksum(payload_of(blob)))


def test_corrupted_leaf_byte_is_corrupted_error() -> None:
    blob = encode_one(state_dict_like())
    entry = entry_of(blob)
    payload = bytearray(payload_of(blob))
    payload[entry.leaves[1].offset + 5] ^= 0x10
    with pytest.raises(CheckpointCorruptedError, match="CRC32C mismatch"):
        codec.decode_blob(entry, memoryview(payload), "blob 'blob'")


def _tree_json() -> tuple[dict[str, Any], bytes]:
    blob = encode_one({"a": torch.zeros(1024), "b": torch.ones(2048)})
    return json.loads(json.dumps(blob.entry(0, codec.checksum(payload_of(blob))).to_json())), payload_of(blob)


def _set(path: list[Any], value: Any) -> Any:
    def damage(raw: dict[str, Any]) -> None:
        target: Any = raw
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return damage


MALFORMED_TREES = {
    "gap between leaves": _set(["leaves", 1, "offset"], 10**6),
    "leaf past the end": _set(["leaves", 1, "length"], 2048 * 4 + 4),
    "no leaves": _set(["leaves"], []),
    "skeleton longer than blob": _set(["skeleton"], 10**9),
    "zero skeleton": _set(["skeleton"], 0),
    "leaf length vs shape": _set(["leaves", 0, "shape"], [1023]),
    "leaf bad kind": _set(["leaves", 0, "kind"], "tensorflow"),
    "leaf ambiguous dtype": _set(["leaves", 0, "dtype"], "<V2"),
    "leaf not a map": _set(["leaves", 0], [0, 4096]),
    "stateful not a bool": _set(["stateful"], "yes"),
}


@pytest.mark.parametrize("damage", MALFORMED_TREES.values(), ids=MALFORMED_TREES.keys())
def test_malformed_tree_entry_is_corrupted_error(damage: Any) -> None:
    raw, _ = _tree_json()
    damage(raw)
    with pytest.raises(CheckpointCorruptedError, match="invalid blob index entry"):
        BlobEntry.from_json(raw, "blob 'x'")


def _leaf(number: int) -> msgpack.ExtType:
    return msgpack.ExtType(codec.ExtCode.LEAF, msgpack.packb(number))


SKELETONS = {
    "repeated leaf": {"a": _leaf(0), "b": _leaf(0)},
    "unused leaf": {"a": _leaf(0)},
    "missing leaf": {"a": _leaf(0), "b": _leaf(1), "c": _leaf(2)},
    "negative leaf": {"a": _leaf(-1), "b": _leaf(1)},
}


@pytest.mark.parametrize("tree", SKELETONS.values(), ids=SKELETONS.keys())
def test_skeleton_that_misuses_its_leaves_is_corrupted_error(tree: dict[str, Any]) -> None:
    raw, payload = _tree_json()
    leaves = payload[raw["skeleton"] :]
    body = msgpack.packb(tree)
    raw["skeleton"] = len(body)
    for leaf_raw in raw["leaves"]:
        leaf_raw["offset"] += len(body) - (len(payload) - len(leaves))
    raw["length"] = len(body) + len(leaves)
    data = body + leaves
    raw["crc32c"] = codec.checksum(data)
    entry = BlobEntry.from_json(raw, "blob 'x'")
    with pytest.raises(CheckpointCorruptedError, match="does not decode"):
        codec.decode_blob(entry, memoryview(bytearray(data)), "blob 'x'")


# --------------------------------------------------------------------------- refused tensors


REFUSED = {
    "sparse": (lambda: torch.tensor([0.0, 1.0]).to_sparse(), "dense"),
    "complex32": (lambda: torch.zeros(2, dtype=torch.complex32), "no numpy equivalent"),
    "quantized": (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8), "dense"),
    "meta": (lambda: torch.empty(3, device="meta"), "dense"),
}


@pytest.mark.parametrize(("make", "why"), REFUSED.values(), ids=REFUSED.keys())
@pytest.mark.filterwarnings("ignore::UserWarning")  # complex32 and quantized tensors are experimental or deprecated
def test_unsupported_tensor_is_type_error_naming_node_blob_path_and_why(make: Any, why: str) -> None:
    value = make()
    for blobs, path in (({"bad": value}, "bad"), ({"opt": {"state": [value]}}, "opt['state'][0]")):
        with pytest.raises(TypeError) as info:
            codec.encode_blobs(NODE, {"fine": torch.ones(2), **blobs})
        message = str(info.value)
        assert f"node {NODE!r}" in message and path in message and why in message
        assert "torch" in message


# --------------------------------------------------------------------------- Stateful


class Counter:
    def __init__(self) -> None:
        self.count = 3
        self.table = torch.arange(2048, dtype=torch.int32)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "table": self.table}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.table = state["count"], state["table"]


def test_stateful_value_is_encoded_as_its_state_dict_and_marked_stateful() -> None:
    blob = encode_one(Counter())
    assert blob.stateful and blob.encoding == "tree"
    entry = entry_of(blob)
    assert entry.stateful and entry.to_json()["stateful"] is True
    decoded = codec.decode_blob(entry, memoryview(bytearray(payload_of(blob))), "blob")
    assert decoded["count"] == 3 and torch.equal(decoded["table"], torch.arange(2048, dtype=torch.int32))
    module = torch.nn.Linear(3, 2)
    (mblob,) = codec.encode_blobs(NODE, {"model": module})
    assert mblob.stateful and mblob.encoding == "msgpack"


def test_a_stateful_class_is_not_a_stateful_value() -> None:
    with pytest.raises(TypeError, match="unsupported type builtins.type"):
        encode_one(Counter)
