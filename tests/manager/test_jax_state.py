"""JAX pytrees as workspace values: bf16 leaves round-trip as jax.Arrays, and a blob whose
workspace entry holds a jax.Array of the same dtype and shape comes back on its sharding."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from tests.support.locations import manager  # noqa: E402

NODE = "host_0"


def same(a: Any, b: Any) -> bool:
    return bool(a.dtype == b.dtype and a.shape == b.shape and np.asarray(a).tobytes() == np.asarray(b).tobytes())


async def test_pytree_with_bf16_leaves_round_trips_as_jax_arrays(location: Any) -> None:
    key = jax.random.PRNGKey(0)
    params = {
        "dense": {"kernel": jax.random.normal(key, (128, 64), jnp.bfloat16), "bias": jnp.zeros(64, jnp.bfloat16)},
        "scale": jnp.asarray(2.0, jnp.float32),
    }
    opt_state = (jnp.ones((128, 64), jnp.float32), {"count": jnp.asarray(3, jnp.int32)})
    ws: dict[str, Any] = {"params": params, "opt_state": opt_state, "w": jnp.arange(2048, dtype=jnp.bfloat16)}
    async with manager(location) as mgr:
        await mgr.init({NODE: ws})
        await mgr.save(1)
    target = jnp.zeros(2048, jnp.bfloat16)
    fresh: dict[str, Any] = {"w": target}
    async with manager(location) as mgr:
        await mgr.init({NODE: fresh})
        await mgr.load(1)
    assert jax.tree_util.tree_structure(fresh["params"]) == jax.tree_util.tree_structure(params)
    for got, want in zip(jax.tree_util.tree_leaves(fresh["params"]), jax.tree_util.tree_leaves(params)):
        assert isinstance(got, jax.Array) and same(got, want)
    assert isinstance(fresh["opt_state"], tuple) and same(fresh["opt_state"][0], opt_state[0])
    assert same(fresh["opt_state"][1]["count"], opt_state[1]["count"])
    assert isinstance(fresh["w"], jax.Array) and same(fresh["w"], ws["w"])
    assert fresh["w"].sharding == target.sharding
