"""jax arrays in the codec: every dtype round-trips bit-exact as a jax.Array, pytrees with
bfloat16 leaves keep their structure."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from asyncckpt import codec  # noqa: E402
from asyncckpt.codec import BlobEntry  # noqa: E402

NODE = "host-0"


def round_trip(value: Any) -> Any:
    (blob,) = codec.encode_blobs(NODE, {"blob": value})
    payload = b"".join(bytes(view) for view in blob.buffers)
    raw = json.loads(json.dumps(blob.entry(0, codec.checksum(payload)).to_json()))
    return codec.decode_blob(BlobEntry.from_json(raw, "blob"), memoryview(bytearray(payload)), "blob")


def assert_same_array(decoded: Any, original: Any) -> None:
    assert isinstance(decoded, jax.Array)
    assert decoded.dtype == original.dtype and decoded.shape == original.shape
    assert np.asarray(decoded).tobytes() == np.asarray(original).tobytes()


DTYPES = ["bool", "int8", "uint8", "int16", "int32", "uint32", "float16", "bfloat16", "float32", "complex64"]
DTYPES += ["float8_e4m3fn", "float8_e5m2"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (40, 30)], ids=["0-d", "empty", "vector", "leaf"])
def test_jax_array_of_every_dtype_round_trips_bit_exact(dtype: str, shape: tuple[int, ...]) -> None:
    np_dtype = np.dtype(jnp.dtype(dtype))
    carrier = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[np_dtype.itemsize]
    raw = np.random.default_rng(3).integers(0, 2**8, size=int(np.prod(shape)) * np_dtype.itemsize, dtype=np.uint8)
    if dtype == "bool":
        raw &= 1
    host = raw.view(carrier).view(np_dtype).reshape(shape) if dtype != "bool" else raw.view(np.bool_).reshape(shape)
    original = jnp.asarray(host)
    assert_same_array(round_trip(original), original)


def test_pytree_with_bf16_leaves_round_trips_with_its_structure() -> None:
    key = jax.random.PRNGKey(0)
    tree = {
        "params": {"dense": {"kernel": jax.random.normal(key, (64, 64), jnp.bfloat16), "bias": jnp.zeros(64)}},
        "opt": (jnp.ones((32, 32), jnp.float32), [jnp.asarray(3, jnp.int32)]),
        "step": 10,
    }
    (blob,) = codec.encode_blobs(NODE, {"state": tree})
    assert blob.encoding == "tree" and [leaf.kind for leaf in blob.leaves] == ["jax", "jax"]
    decoded = round_trip(tree)
    assert jax.tree_util.tree_structure(decoded) == jax.tree_util.tree_structure(tree)
    for got, want in zip(jax.tree_util.tree_leaves(decoded), jax.tree_util.tree_leaves(tree)):
        if isinstance(want, jax.Array):
            assert_same_array(got, want)
        else:
            assert got == want
