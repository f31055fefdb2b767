"""An incremental training job with ``Retention(keep_last=1)``, run as a child process by
the crash tests of retention deletes.

    python retention_child.py ENDPOINT DB_PREFIX EPOCHS

saves epochs 1..EPOCHS of :func:`retention_state` (node "frozen" never changes, so every
epoch points at epoch 1's shard of it; node "trained" changes every epoch), each save
followed by the retention delete of the epoch before, prints ``SAVED <epoch>`` after each
save returns, then ``DONE``, and blocks on stdin until the parent closes it (or kills it).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import numpy as np


def retention_state(epoch: int) -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng(11)
    return {
        "frozen": {f"w{i}": rng.standard_normal(1 << 15) for i in range(4)},
        "trained": {"w": np.full(1 << 15, float(epoch)), "step": epoch},
    }


async def _main(endpoint: str, db_prefix: str, epochs: int) -> None:
    from asyncckpt import MultiNodeCheckpointManager, Retention, TransferConfig

    config = TransferConfig(max_attempts=2, read_timeout=30.0)
    options = {"endpoint_url": endpoint, "region_name": "us-east-1", "addressing_style": "path"}
    async with MultiNodeCheckpointManager(
        db_prefix, storage_options=options, config=config, retention=Retention(keep_last=1)
    ) as mgr:
        await mgr.init({node: {} for node in ("frozen", "trained")})
        for epoch in range(1, epochs + 1):
            for node, blobs in retention_state(epoch).items():
                mgr.workspace(node).update(blobs)
            await mgr.save(epoch)
            print(f"SAVED {epoch}", flush=True)
        print("DONE", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # wait for the parent (or SIGKILL)


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
