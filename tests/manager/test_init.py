"""Building a manager, init, and the end of its life. Bad arguments get a clear error
naming the problem, before any I/O or write."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from asyncckpt import CheckpointNotFoundError, CheckpointStateError, MultiNodeCheckpointManager
from asyncckpt.storage import drop_memory_store, storage_for
from tests.support.locations import RawStorages, manager
from tests.support.workspaces import TWO_NODES


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://Bad_Bucket/x", "invalid S3 bucket name"),
        ("gs://bucket/x", "unsupported location scheme"),
        ("", "non-empty"),
        ("memory://", "store name"),
        ("file://otherhost/dir", "names a host"),
    ],
)
def test_a_malformed_location_is_refused_when_the_manager_is_built(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        MultiNodeCheckpointManager(url)


def test_an_unknown_db_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown db_type 'minidb'"):
        MultiNodeCheckpointManager("memory://bad-db-type", "minidb")


def test_unknown_storage_options_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        MultiNodeCheckpointManager("s3://bucket/x", storage_options={"endpoint": "http://127.0.0.1:1"})
    with pytest.raises(ValueError, match="do not apply"):
        MultiNodeCheckpointManager("memory://opts", storage_options={"endpoint_url": "http://127.0.0.1:1"})


def test_a_config_of_the_wrong_type_and_a_bad_run_id_are_refused() -> None:
    with pytest.raises(TypeError, match="TransferConfig"):
        MultiNodeCheckpointManager("memory://cfg", config={"part_size": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="run id"):
        MultiNodeCheckpointManager("memory://cfg", run_id="has/slash")


async def test_unknown_path_type_and_malformed_path_prefix_are_refused_and_nothing_is_written() -> None:
    url = "memory://bad-path-type"
    try:
        async with MultiNodeCheckpointManager(url) as mgr:
            with pytest.raises(ValueError, match="unknown path_type 'hdfs'"):
                await mgr.init(["trainer_0"], path_type="hdfs")
            with pytest.raises(ValueError, match="no bucket"):
                mgr.set_params(["trainer_0"], path_prefix="s3://")
            with pytest.raises(ValueError, match="path_type says"):
                mgr.set_params(["trainer_0"], path_prefix="s3://bucket/x", path_type="file")
            with pytest.raises(ValueError, match="not among the job's nodes"):
                await mgr.init(["trainer_0"], local_nodes=["trainer_9"])
        storage = storage_for(url)
        assert [info.key async for info in storage.list()] == []
    finally:
        drop_memory_store("bad-path-type")


# --------------------------------------------------------------------------- init


INVALID_NODE_LISTS: list[tuple[str, Any, type[Exception]]] = [
    ("an empty name", ["trainer_0", ""], ValueError),
    ("a slash", ["trainer_0", "a/b"], ValueError),
    ("'..'", ["trainer_0", ".."], ValueError),
    ("'..' inside", ["trainer_0", "x..y"], ValueError),
    ("a leading dot", ["trainer_0", ".hidden"], ValueError),
    ("a name that is not a str", ["trainer_0", 7], TypeError),
    ("a duplicate", ["trainer_0", "trainer_0"], ValueError),
    ("no nodes", [], ValueError),
    ("a mapping with a slash", {"trainer_0": {"w": 1}, "a/b": {"w": 2}}, ValueError),
]


async def test_init_rejects_an_invalid_node_list_before_writing_anything(
    location: Any, raw_storages: RawStorages
) -> None:
    for case, nodes, error in INVALID_NODE_LISTS:
        mgr = manager(location)
        try:
            with pytest.raises(error):
                await mgr.init(nodes)
            with pytest.raises(CheckpointStateError):
                await mgr.save(0)  # the failed init declared no nodes
        except BaseException as exc:
            exc.add_note(f"node list with {case}: {nodes!r}")
            raise
        finally:
            await mgr.close()
    assert await raw_storages.stored_keys(location) == []
    async with manager(location) as fresh:
        assert await fresh.get_resume_from_epoch_id() is None


async def test_second_init_is_a_no_op_with_the_same_nodes_and_an_error_with_others(
    location: Any, raw_storages: RawStorages
) -> None:
    workspaces = {"trainer_0": {"w": 1}, "trainer_1": {"w": 2}}
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.init(list(workspaces))
        await mgr.init(workspaces)
        assert mgr.nodes == list(workspaces)
        assert mgr.workspace("trainer_0") is workspaces["trainer_0"]
        for other_nodes in (["trainer_0"], ["trainer_0", "trainer_1", "trainer_2"], ["ps_0", "ps_1"]):
            with pytest.raises(CheckpointStateError):
                await mgr.init(other_nodes)
        assert mgr.nodes == list(workspaces)
        assert dict(mgr.workspace("trainer_1")) == {"w": 2}
        await mgr.save(0)  # still usable with its own nodes
    assert sorted((await raw_storages.read_manifest(location, 0))["nodes"]) == list(workspaces)


async def test_init_retrieving_a_missing_epoch_or_node_raises_not_found(location: Any) -> None:
    async with manager(location) as mgr:
        with pytest.raises(CheckpointNotFoundError) as info:
            await mgr.init(list(TWO_NODES), retrieve_from_epoch=3)
        assert isinstance(info.value, FileNotFoundError)
    async with manager(location) as writer:
        await writer.init({"trainer_0": {"w": 1}})
        await writer.save(2)
    async with manager(location) as mgr:
        with pytest.raises(CheckpointNotFoundError, match="trainer_1"):
            await mgr.init(list(TWO_NODES), retrieve_from_epoch=2)


# --------------------------------------------------------------------------- lifecycle


async def test_a_manager_is_unusable_after_its_async_with_block(location: Any) -> None:
    workspaces = {"trainer_0": {"total": 1}}
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(0)
    operations: list[Callable[[], Any]] = [
        lambda: mgr.save(1),
        lambda: mgr.load(0),
        lambda: mgr.init(workspaces, retrieve_from_epoch=0),
        lambda: mgr.cp_accessible(),
        lambda: mgr.cp_accessible(0),
        lambda: mgr.get_resume_from_epoch_id(),
        lambda: mgr.load_blobs_locally(["trainer_0"], ["total"], 0, {}),
    ]
    for operation in operations:
        with pytest.raises(CheckpointStateError):
            await operation()
    await mgr.close()  # closing twice is harmless
    assert workspaces == {"trainer_0": {"total": 1}}
