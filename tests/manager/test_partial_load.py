"""MultiNodeCheckpointManager.load_blobs_locally: caffe2's partial load of named blobs into a session."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from asyncckpt import MultiNodeCheckpointManager, TransferConfig
from asyncckpt.storage import drop_memory_store
from tests.support.locations import RawStorages, manager
from tests.support.workspaces import TWO_NODES


async def save_totals(location: Any, epoch: int, totals: dict[str, Any], **extra: Any) -> None:
    """Commit ``epoch`` with one ``total`` blob per node (plus ``extra`` blobs on every node)."""
    async with manager(location) as writer:
        await writer.init({node: {"total": total, **extra} for node, total in totals.items()})
        await writer.save(epoch)


async def test_partial_load_returns_false_and_leaves_the_session_untouched_for_a_missing_epoch_or_node(
    location: Any,
) -> None:
    await save_totals(location, 1, {"trainer_0": 10, "trainer_1": 11})
    session = {"keep": "me"}
    async with manager(location) as mgr:  # no init needed, as in caffe2
        assert await mgr.load_blobs_locally(["trainer_0"], ["total"], 2, session) is False
        assert (
            await mgr.load_blobs_locally(["trainer_0", "trainer_9"], ["trainer_0/total", "total"], 1, session) is False
        )
    assert session == {"keep": "me"}


async def test_partial_load_returns_false_when_a_listed_nodes_shard_object_is_missing(
    location: Any, raw_storages: RawStorages
) -> None:
    await save_totals(location, 1, {"trainer_0": 10, "trainer_1": 11})
    session = {"keep": "me"}
    async with manager(location) as mgr:
        await mgr.init(list(TWO_NODES), retrieve_from_epoch=1)
        shard_url = mgr.get_ckpt_db_name("trainer_1", 1)
        assert shard_url is not None
        await raw_storages.delete_object(location, shard_url)
        # like caffe2's check_db_exists, for every listed node, whether or not a name asked for is its own
        assert (
            await mgr.load_blobs_locally(list(TWO_NODES), ["trainer_0/total", "trainer_1/total"], 1, session) is False
        )
        assert await mgr.load_blobs_locally(list(TWO_NODES), ["trainer_0/total"], 1, session) is False
    assert session == {"keep": "me"}


async def test_partial_load_skips_names_that_no_listed_shard_holds(location: Any) -> None:
    await save_totals(location, 4, {"trainer_0": 10, "trainer_1": 11}, lr=0.5)
    session: dict[str, Any] = {}
    async with manager(location) as mgr:
        loaded = await mgr.load_blobs_locally(["trainer_0"], ["total", "no_such_blob", "trainer_1/total"], 4, session)
    assert loaded is True
    assert session == {"total": 10}


async def test_partial_load_takes_node_qualified_names_as_session_keys(location: Any) -> None:
    await save_totals(location, 4, {"trainer_0": 10, "trainer_1": 11})
    async with manager(location) as writer:  # a blob only trainer_1 holds, in another epoch
        await writer.init({"trainer_0": {"total": 20}, "trainer_1": {"total": 21, "only_here": "t1"}})
        await writer.save(5)
    session: dict[str, Any] = {"keep": "me"}
    async with manager(location) as mgr:
        assert await mgr.load_blobs_locally(list(TWO_NODES), ["trainer_0/total", "trainer_1/total"], 4, session)
        assert session == {"keep": "me", "trainer_0/total": 10, "trainer_1/total": 11}
        assert await mgr.load_blobs_locally(list(TWO_NODES), ["only_here", "trainer_0/total"], 5, session)
    assert session == {"keep": "me", "trainer_0/total": 20, "trainer_1/total": 11, "only_here": "t1"}


async def test_partial_load_of_a_plain_name_held_by_two_nodes_raises_value_error(location: Any) -> None:
    await save_totals(location, 1, {"trainer_0": 10, "trainer_1": 11})
    session = {"keep": "me"}
    async with manager(location) as mgr:
        with pytest.raises(ValueError, match="total"):
            await mgr.load_blobs_locally(list(TWO_NODES), ["total"], 1, session)
    assert session == {"keep": "me"}


async def test_partial_load_fetches_only_the_requested_blobs_bytes(location: Any, raw_storages: RawStorages) -> None:
    big = np.arange(64 * 1024, dtype=np.float64)  # 512 KiB per node that must not be fetched
    workspaces = {node: {"weights": big + i, "total": np.array([100 + i])} for i, node in enumerate(TWO_NODES)}
    async with manager(location) as writer:
        await writer.init(workspaces)
        await writer.save(1)
    manifest = await raw_storages.read_manifest(location, 1)
    wanted = {node: manifest["nodes"][node]["blobs"]["total"]["length"] for node in TWO_NODES}
    shard_sizes = sum(manifest["nodes"][node]["size"] for node in TWO_NODES)

    session: dict[str, Any] = {}
    async with manager(location) as mgr:
        assert await mgr.load_blobs_locally(list(TWO_NODES), ["trainer_0/total", "trainer_1/total"], 1, session)
        report = await mgr.report_checkpoint_stats("checkpoint_partial_load")

    assert [int(session[f"{node}/total"][0]) for node in TWO_NODES] == [100, 101]
    assert report["bytes"] == sum(wanted.values())
    assert {node: stats["bytes"] for node, stats in report["nodes"].items()} == wanted
    assert report["bytes"] * 100 < shard_sizes


async def test_load_blobs_locally_refuses_a_single_string_of_names() -> None:
    async with MultiNodeCheckpointManager("memory://names") as mgr:
        with pytest.raises(TypeError, match="sequence of blob names"):
            await mgr.load_blobs_locally(["trainer_0"], "total", 1, {})
    drop_memory_store("names")


@pytest.mark.parametrize(("coalesce_gap", "data_reads"), [(TransferConfig().coalesce_gap, 1), (0, 2)])
async def test_partial_load_reads_wanted_blobs_close_together_with_one_request(
    location: Any, raw_storages: RawStorages, coalesce_gap: int, data_reads: int
) -> None:
    """Two wanted blobs with an unwanted one of 256 KiB between them: one read over all
    three (the gap's bytes dropped) while the gap is at most ``coalesce_gap``, else one each."""
    workspace = {"a": np.arange(1000.0), "b": np.zeros(32 * 1024), "c": np.arange(3000, dtype=np.int32)}
    async with manager(location) as writer:
        await writer.init({"trainer_0": workspace})
        await writer.save(1)
    blobs = (await raw_storages.read_manifest(location, 1))["nodes"]["trainer_0"]["blobs"]
    assert blobs["a"]["offset"] < blobs["b"]["offset"] < blobs["c"]["offset"]  # b lies between a and c

    session: dict[str, Any] = {"c": np.zeros(3000, dtype=np.int32)}
    target = session["c"]
    async with manager(location, config=TransferConfig(coalesce_gap=coalesce_gap)) as mgr:
        assert await mgr.load_blobs_locally(["trainer_0"], ["a", "c"], 1, session)
        report = await mgr.report_checkpoint_stats("checkpoint_partial_load")
    np.testing.assert_array_equal(session["a"], workspace["a"])
    np.testing.assert_array_equal(session["c"], workspace["c"])
    assert session["c"] is target  # loaded in place
    assert "b" not in session
    assert report["nodes"]["trainer_0"]["requests"] == data_reads  # (the size and blob index are read before)
