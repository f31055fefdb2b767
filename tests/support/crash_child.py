"""A checkpointing "training job" for the crash tests, run as a child process.

    python crash_child.py ENDPOINT DB_PREFIX SEED EPOCH [EPOCH ...]

saves each epoch's deterministic state (:func:`crash_state`) through
``MultiNodeCheckpointManager`` to the S3 endpoint (the fault proxy, in the tests),
prints ``SAVED <epoch>`` after each save returns, then ``DONE``, and blocks on stdin
until the parent closes it (or kills the process). The parent imports
:func:`crash_state` to recompute what the child saved.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import numpy as np

MiB = 1 << 20
NODES = ("trainer_0", "trainer_1", "ps_0")


def make_state(seed: int, epoch: int, big_bytes: int = 12 * MiB) -> dict[str, dict[str, Any]]:
    """Every node's blobs for ``epoch``: trainer_0 holds ``big_bytes`` of float32 (multipart
    with 5 MiB parts past 20 MiB, one PUT below), the others a mix of small arrays and plain values."""
    rng = np.random.default_rng([seed, epoch])
    return {
        "trainer_0": {
            "weights": rng.standard_normal(big_bytes // 4, dtype=np.float32),
            "step": epoch * 1000,
            "name": f"trainer_0@{epoch}",
        },
        "trainer_1": {
            "w": rng.integers(-(2**40), 2**40, size=(64, 33), dtype=np.int64),
            "bias": np.asfortranarray(rng.random((7, 5))),
            "meta": {"lr": 0.1 / (epoch + 1), "tags": ["a", "b"], "seen": [epoch, None, True]},
        },
        "ps_0": {
            "emb": rng.random((300, 17)).astype(np.float16),
            "raw": rng.bytes(1000 + epoch),
            "empty": np.zeros((0, 3), dtype=np.uint8),
        },
    }


def crash_state(seed: int, epoch: int) -> dict[str, dict[str, Any]]:
    """What the crash child saves: a small epoch 1, and a 22 MiB trainer_0 in every later
    epoch (past one PUT's 4 parts: a multipart upload of four 5 MiB+ parts)."""
    return make_state(seed, epoch, big_bytes=22 * MiB if epoch > 1 else MiB // 2)


def assert_state_equal(got: dict[str, Any], want: dict[str, Any], where: str = "") -> None:
    """Blob-by-blob equality: arrays by dtype, shape and bytes; everything else by ``==``."""
    assert set(got) == set(want), f"{where}: blob names {sorted(got)} != {sorted(want)}"
    for name, expected in want.items():
        value = got[name]
        if isinstance(expected, np.ndarray):
            assert isinstance(value, np.ndarray), f"{where}/{name}: {type(value).__name__}"
            assert value.dtype == expected.dtype and value.shape == expected.shape, f"{where}/{name}"
            assert value.tobytes() == expected.tobytes(), f"{where}/{name}: array bytes differ"
        else:
            assert value == expected, f"{where}/{name}: {value!r} != {expected!r}"


async def _main(endpoint: str, db_prefix: str, seed: int, epochs: list[int]) -> None:
    from asyncckpt import MiB as _MiB
    from asyncckpt import MultiNodeCheckpointManager, TransferConfig

    config = TransferConfig(part_size=5 * _MiB, range_size=5 * _MiB, max_attempts=3, read_timeout=30.0)
    options = {"endpoint_url": endpoint, "region_name": "us-east-1", "addressing_style": "path"}
    async with MultiNodeCheckpointManager(db_prefix, storage_options=options, config=config) as mgr:
        await mgr.init(list(NODES))
        for epoch in epochs:
            for node, blobs in crash_state(seed, epoch).items():
                mgr.workspace(node).clear()
                mgr.workspace(node).update(blobs)
            await mgr.save(epoch)
            print(f"SAVED {epoch}", flush=True)
        print("DONE", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # wait for the parent (or SIGKILL)


if __name__ == "__main__":
    _endpoint, _prefix, _seed, *_epochs = sys.argv[1:]
    asyncio.run(_main(_endpoint, _prefix, int(_seed), [int(e) for e in _epochs]))
