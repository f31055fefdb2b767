"""MultiNodeCheckpointManager.report_checkpoint_stats: per-node stats of the last save and load."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.support.locations import RawStorages, manager
from tests.support.workspaces import THREE_NODES, sample_workspaces


def assert_node_stats(report: dict[str, Any], nodes: tuple[str, ...], sizes: dict[str, int]) -> None:
    assert set(report["nodes"]) == set(nodes)
    for node, stats in report["nodes"].items():
        assert isinstance(stats["seconds"], float) and stats["seconds"] >= 0
        assert stats["bytes"] == sizes[node]
        assert isinstance(stats["objects"], int) and stats["objects"] >= 1
        assert isinstance(stats["requests"], int) and stats["requests"] >= stats["objects"]
        assert isinstance(stats["retries"], int) and stats["retries"] >= 0
    slowest = report["slowest_node"]
    assert slowest in nodes
    assert report["nodes"][slowest]["seconds"] == max(s["seconds"] for s in report["nodes"].values())


async def test_report_after_save_and_load_gives_per_node_stats_and_the_slowest_node(
    location: Any, raw_storages: RawStorages
) -> None:
    workspaces = sample_workspaces(THREE_NODES)
    workspaces["trainer_2"]["big"] = np.zeros(100_000)
    async with manager(location) as mgr:
        for action in ("save", "checkpoint_saved", "", "CHECKPOINT_SAVE"):
            with pytest.raises(ValueError):
                await mgr.report_checkpoint_stats(action)
        await mgr.init(workspaces)
        await mgr.save(4)
        manifest = await raw_storages.read_manifest(location, 4)
        sizes = {node: manifest["nodes"][node]["size"] for node in THREE_NODES}

        saved = await mgr.report_checkpoint_stats("checkpoint_save")
        assert saved["action"] == "checkpoint_save" and saved["epoch"] == 4
        assert_node_stats(saved, THREE_NODES, sizes)

        await mgr.load(4)
        loaded = await mgr.report_checkpoint_stats("checkpoint_load")
        assert loaded["action"] == "checkpoint_load" and loaded["epoch"] == 4
        assert_node_stats(loaded, THREE_NODES, sizes)
        assert await mgr.report_checkpoint_stats("checkpoint_save") == saved  # each action keeps its own
