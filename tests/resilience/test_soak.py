"""A bounded soak: 100 save/load cycles with one manager leak no sockets, tasks or memory.

One manager saves and loads a small three-node state 100 times (epochs 0..99). After a
warm-up of 10 cycles (connection pool filled, caches warm) the open sockets and file
descriptors, the asyncio tasks and the RSS are recorded; at the end none of the first
three may have grown, and RSS only by a small bound.
"""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import pytest

from asyncckpt import MultiNodeCheckpointManager
from tests.support.asserts import assert_same

NODES = ("node-0", "node-1", "node-2")
CYCLES = 100
WARM_UP = 10
RSS_GROWTH_LIMIT = 30 * (1 << 20)


def state(epoch: int) -> dict[str, dict[str, Any]]:
    return {
        node: {
            "weights": np.full((32, 32), epoch + i / 10, dtype=np.float32),
            "step": epoch,
            "tag": f"{node}@{epoch}",
            "blob": bytes([epoch % 256]) * 512,
        }
        for i, node in enumerate(NODES)
    }


@dataclass(frozen=True)
class Usage:
    sockets: int
    fds: int
    tasks: int
    rss: int

    @classmethod
    def now(cls) -> Usage:
        gc.collect()
        proc = psutil.Process()
        return cls(
            sockets=len(proc.net_connections(kind="all")),
            fds=proc.num_fds(),
            tasks=len(asyncio.all_tasks()),
            rss=proc.memory_info().rss,
        )


@pytest.mark.parametrize("location_kind", ["memory", "s3"])
async def test_soak_save_load_cycles_leak_nothing(location: Any) -> None:
    samples: list[Usage] = []
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
        await mgr.init({node: {} for node in NODES})
        for epoch in range(CYCLES):
            for node, blobs in state(epoch).items():
                mgr.workspace(node).update(blobs)
            await mgr.save(epoch)
            for node in NODES:
                mgr.workspace(node).clear()
            await mgr.load(epoch)
            if epoch % 10 == 0:  # spot-check the values; every cycle checks that load ran
                for node, blobs in state(epoch).items():
                    assert_same(dict(mgr.workspace(node)), blobs, f"epoch {epoch} {node}")
            assert mgr.workspace(NODES[-1])["step"] == epoch
            if epoch + 1 == WARM_UP or (epoch + 1) % 30 == 0 or epoch + 1 == CYCLES:
                samples.append(Usage.now())
        assert await mgr.get_resume_from_epoch_id() == CYCLES - 1
    baseline, final = samples[0], samples[-1]  # after cycle 10 and after cycle 100
    peak_sockets = max(s.sockets for s in samples)
    report = f"after warm-up {baseline}, at the end {final}, socket peak {peak_sockets}"
    assert final.sockets <= baseline.sockets, f"open sockets grew: {report}"
    assert final.fds <= baseline.fds, f"open file descriptors grew: {report}"
    assert final.tasks <= baseline.tasks, f"asyncio tasks grew: {report}"
    assert final.rss - baseline.rss < RSS_GROWTH_LIMIT, f"RSS grew by {(final.rss - baseline.rss) >> 20} MiB: {report}"
