"""A JAX training loop on asyncio: a pytree of parameters (bfloat16 and float32 leaves), its
PRNG key and step count checkpointed as they are, with ``MultiNodeCheckpointManager``.

The parameters are a nested dict of ``jax.Array`` leaves; they come back as ``jax.Array``
of the same dtypes, shapes and bits. The loop saves every epoch in the background while
the next one trains, stops half-way as if the job were preempted, starts again from the
latest committed epoch, and must end with exactly the parameters of a run that was never
interrupted (the minibatches are drawn from the restored key).

    python examples/jax_loop.py              # an embedded moto S3 server on 127.0.0.1
    python examples/jax_loop.py /some/dir    # a local directory
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

import jax
import jax.numpy as jnp

from asyncckpt import MultiNodeCheckpointManager

EPOCHS = 6


def init_state() -> dict[str, Any]:
    key = jax.random.PRNGKey(0)
    params = {
        "dense": {"w": jnp.zeros((16, 1), jnp.bfloat16), "b": jnp.zeros((1,), jnp.float32)},
        "scale": jnp.ones((), jnp.float32),
    }
    return {"params": params, "key": key, "step": 0}


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    w = params["dense"]["w"].astype(jnp.float32)
    pred = params["scale"] * (x @ w) + params["dense"]["b"]
    return jnp.mean((pred - y) ** 2)


@jax.jit
def sgd_step(params: dict[str, Any], x: jax.Array, y: jax.Array) -> tuple[dict[str, Any], jax.Array]:
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    params = jax.tree.map(lambda p, g: (p - 0.05 * g).astype(p.dtype), params, grads)
    return params, loss


def train_one_epoch(state: dict[str, Any]) -> float:
    """Eight minibatches drawn with the state's key; updates the state dict in place."""
    target = jnp.linspace(-1.0, 1.0, 16).reshape(16, 1)
    loss = jnp.zeros(())
    for _ in range(8):
        state["key"], sub = jax.random.split(state["key"])
        x = jax.random.normal(sub, (32, 16))
        state["params"], loss = sgd_step(state["params"], x, x @ target)
        state["step"] += 1
    return float(loss)


async def train(location: str, options: dict[str, Any] | None, stop_after: int | None = None) -> dict[str, Any]:
    """Train up to EPOCHS, resuming from the latest committed epoch; ``stop_after`` ends the
    run early, as a preemption would."""
    state = init_state()
    async with MultiNodeCheckpointManager(location, storage_options=options) as ckpt:
        await ckpt.init({"trainer": state})
        resume = await ckpt.get_resume_from_epoch_id()  # the latest committed epoch, or None
        first = 1
        if resume is not None:
            await ckpt.load(resume)  # jax.Array leaves, same dtypes (bfloat16 included)
            first = resume + 1
            print(f"resumed from epoch {resume} (step {state['step']})")
        pending = None
        for epoch in range(first, EPOCHS + 1):
            loss = train_one_epoch(state)
            if pending is not None:
                await pending  # the previous epoch is committed (its error raised here)
            pending = await ckpt.save_async(epoch, metrics={"loss": loss})  # returns once the state is copied
            print(f"epoch {epoch}: loss {loss:.4f}, saving in the background")
            if epoch == stop_after:
                break
        if pending is not None:
            await pending
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("location", nargs="?", help="a directory (default: a bucket on an embedded moto S3 server)")
    args = parser.parse_args()
    if args.location:
        asyncio.run(run(args.location, None))
        return
    from asyncckpt.testing.s3_server import embedded_bucket

    with contextlib.ExitStack() as stack:
        try:
            options = stack.enter_context(embedded_bucket("asyncckpt-example"))
        except RuntimeError as exc:
            parser.error(f"no location and no embedded S3 server ({exc})")
        asyncio.run(run("s3://asyncckpt-example/jax-loop", options))


async def run(location: str, options: dict[str, Any] | None) -> None:
    print(f"training {EPOCHS} epochs -> {location}; the job stops after epoch 3")
    await train(location, options, stop_after=3)
    print("the job starts again:")
    resumed = await train(location, options)
    state = init_state()  # the same training, never interrupted, no checkpoints
    for _ in range(EPOCHS):
        train_one_epoch(state)
    arrays, got = (state["params"], state["key"]), (resumed["params"], resumed["key"])
    same = jax.tree.map(
        lambda a, b: isinstance(b, jax.Array) and a.dtype == b.dtype and bool((a == b).all()), arrays, got
    )
    if not all(jax.tree.leaves(same)) or resumed["step"] != state["step"]:
        sys.exit("FAIL: the resumed run ended with other parameters than an uninterrupted one")
    print("PASS")


if __name__ == "__main__":
    main()
