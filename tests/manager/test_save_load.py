"""MultiNodeCheckpointManager.save and load on memory, file and s3 locations: what a load restores,
what a failed or refused save leaves behind.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from asyncckpt import CheckpointConflictError, CheckpointCorruptedError, CheckpointError, CheckpointStateError
from tests.support.locations import RawStorages, key_below, manager
from tests.support.workspaces import THREE_NODES, TWO_NODES, sample_workspaces, snapshot


async def test_load_restores_saved_values_into_the_callers_workspace_objects(location: Any) -> None:
    workspaces = sample_workspaces(THREE_NODES)
    saved = snapshot(workspaces)
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(3)
        for ws in workspaces.values():
            ws["weights"] = np.ones(1)
            ws["history"].append("changed after save")
            del ws["name"]
        await mgr.load(3)
        assert mgr.workspace("trainer_0") is workspaces["trainer_0"]
    assert snapshot(workspaces) == saved

    fresh: dict[str, dict[str, Any]] = {node: {} for node in THREE_NODES}
    async with manager(location) as reader:
        await reader.init(fresh, retrieve_from_epoch=3)
        await reader.load(3)
    assert snapshot(fresh) == saved


async def test_load_replaces_same_named_entries_and_leaves_the_others_alone(location: Any) -> None:
    workspaces = {"trainer_0": {"total": 1, "lr": 0.5}, "trainer_1": {"total": 2}}
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(0)
        workspaces["trainer_0"].update(total=99, lr=0.1, created_later="keep me")
        del workspaces["trainer_1"]["total"]
        await mgr.save(1)  # what is in the workspace at the time of the call
        await mgr.load(0)
        assert workspaces == {
            "trainer_0": {"total": 1, "lr": 0.5, "created_later": "keep me"},
            "trainer_1": {"total": 2},
        }
        workspaces["trainer_1"]["total"] = 7
        await mgr.load(1)
        assert workspaces == {
            "trainer_0": {"total": 99, "lr": 0.1, "created_later": "keep me"},
            "trainer_1": {"total": 7},  # epoch 1 has no trainer_1/total: left alone
        }


async def test_saving_a_committed_epoch_again_raises_conflict_and_keeps_the_original(location: Any) -> None:
    workspaces = {"trainer_0": {"total": 1}}
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(2)
        workspaces["trainer_0"]["total"] = 999
        with pytest.raises(CheckpointConflictError) as info:
            await mgr.save(2)
        assert isinstance(info.value, FileExistsError)
    async with manager(location) as zombie:  # another writer of the same location
        await zombie.init({"trainer_0": {"total": -1}})
        with pytest.raises(CheckpointConflictError):
            await zombie.save(2)
    restored: dict[str, Any] = {}
    async with manager(location) as reader:
        await reader.init({"trainer_0": restored}, retrieve_from_epoch=2)
        await reader.load(2)
    assert restored == {"total": 1}


async def test_save_and_load_before_init_raise_state_error_and_write_nothing(
    location: Any, raw_storages: RawStorages
) -> None:
    async with manager(location) as mgr:
        with pytest.raises(CheckpointStateError):
            await mgr.save(0)
        with pytest.raises(CheckpointStateError):
            await mgr.load(0)
        with pytest.raises(CheckpointStateError):
            mgr.workspace("trainer_0")
    assert await raw_storages.stored_keys(location) == []


BAD_EPOCHS: list[tuple[Any, type[Exception]]] = [
    (-1, ValueError),
    (1.5, TypeError),
    ("3", TypeError),
    (True, TypeError),
    (None, TypeError),
    (10**12, ValueError),
]


async def test_a_bad_epoch_is_refused_before_anything_is_written(location: Any, raw_storages: RawStorages) -> None:
    async with manager(location) as mgr:
        await mgr.init({"trainer_0": {"total": 1}})
        for epoch, error in BAD_EPOCHS:
            calls: list[Callable[[], Any]] = [
                lambda epoch=epoch: mgr.save(epoch),
                lambda epoch=epoch: mgr.load(epoch),
                lambda epoch=epoch: mgr.load_blobs_locally(["trainer_0"], ["total"], epoch, {}),
                lambda epoch=epoch: mgr.get_ckpt_db_name("trainer_0", epoch),
            ]
            if epoch is not None:  # None means "no particular epoch" for these two
                calls += [
                    lambda epoch=epoch: mgr.cp_accessible(epoch),
                    lambda epoch=epoch: mgr.get_resume_from_epoch_id(epoch),
                ]
            for call in calls:
                try:
                    with pytest.raises(error):
                        result = call()
                        if inspect.isawaitable(result):
                            await result
                except BaseException as exc:
                    exc.add_note(f"epoch {epoch!r}")
                    raise
    assert await raw_storages.stored_keys(location) == []


UNSUPPORTED_BLOBS: list[Any] = [object(), {1, 2}, {1.5: "a"}, {True: "a"}, [1, 2, object()]]


async def test_an_unsupported_blob_raises_type_error_naming_node_and_blob_and_writes_nothing(
    location: Any, raw_storages: RawStorages
) -> None:
    workspaces = sample_workspaces()
    epoch0 = snapshot(workspaces)
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(0)
        keys_after_epoch0 = await raw_storages.stored_keys(location)
        for bad_value in UNSUPPORTED_BLOBS:
            workspaces["trainer_1"]["bad_blob"] = bad_value
            with pytest.raises(TypeError) as info:
                await mgr.save(1)
            assert "trainer_1" in str(info.value), bad_value
            assert "bad_blob" in str(info.value), bad_value
        assert await raw_storages.stored_keys(location) == keys_after_epoch0
        assert await mgr.get_resume_from_epoch_id() == 0
        del workspaces["trainer_1"]["bad_blob"]
        await mgr.save(1)  # the failed attempts did not poison the epoch
    fresh: dict[str, dict[str, Any]] = {node: {} for node in TWO_NODES}
    async with manager(location) as reader:
        await reader.init(fresh)
        await reader.load(0)
    assert snapshot(fresh) == epoch0


async def test_a_masked_array_is_refused_by_save_and_save_async_naming_node_and_blob_and_writes_nothing(
    location: Any, raw_storages: RawStorages
) -> None:
    workspaces = sample_workspaces()
    workspaces["trainer_1"]["masked"] = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        for save in (mgr.save, mgr.save_async):  # save_async used to drop the mask silently
            with pytest.raises(TypeError) as info:
                await save(0)
            message = str(info.value)
            assert "trainer_1" in message and "'masked'" in message, save
            assert "masked arrays are not supported" in message, save
        assert await raw_storages.stored_keys(location) == []
        assert await mgr.get_resume_from_epoch_id() is None


async def test_load_after_deleted_shard_leaves_every_workspace_unchanged(
    location: Any, raw_storages: RawStorages
) -> None:
    workspaces = sample_workspaces(THREE_NODES)
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(1)
        shard_url = mgr.get_ckpt_db_name("trainer_1", 1)
        assert shard_url is not None
        for i, ws in enumerate(workspaces.values()):
            ws["total"] = np.array([-i])
            ws["created_later"] = "keep me"
            del ws["name"]
        before = snapshot(workspaces)
        await raw_storages.delete_object(location, shard_url)
        with pytest.raises(CheckpointError) as info:
            await mgr.load(1)
        assert "trainer_1" in str(info.value)
        assert snapshot(workspaces) == before

    fresh = {node: {"marker": node} for node in THREE_NODES}
    async with manager(location) as reader:
        await reader.init(fresh, retrieve_from_epoch=1)  # the manifest is still there
        with pytest.raises(CheckpointError):
            await reader.load(1)
    assert fresh == {node: {"marker": node} for node in THREE_NODES}


async def test_load_of_a_corrupted_blob_raises_corrupted_naming_it_and_leaves_every_workspace_unchanged(
    location: Any, raw_storages: RawStorages
) -> None:
    workspaces = sample_workspaces(THREE_NODES)
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(1)
        shard_url = mgr.get_ckpt_db_name("trainer_2", 1)
        assert shard_url is not None
        for ws in workspaces.values():
            ws["weights"] = np.zeros(1)
        before = snapshot(workspaces)

        entry = (await raw_storages.read_manifest(location, 1))["nodes"]["trainer_2"]["blobs"]["weights"]
        async with raw_storages.open(location) as storage:
            key = key_below(location, shard_url)
            data = bytearray(await storage.get(key))
            data[entry["offset"] + entry["length"] // 2] ^= 0xFF  # same size, one flipped byte
            await storage.put(key, bytes(data))

        with pytest.raises(CheckpointCorruptedError) as info:
            await mgr.load(1)
        message = str(info.value)
        assert "trainer_2" in message and "weights" in message
        assert isinstance(info.value, ValueError)
        assert snapshot(workspaces) == before


LONGEST_NODE_NAMES = ("a" * 200, "b" * 200)  # validate_node_name's maximum: 200 characters


async def test_nodes_with_the_longest_allowed_names_save_and_load_in_one_process_and_in_a_job(location: Any) -> None:
    # The longest file a node gets on a local directory is "<node>.receipt.json" (213
    # bytes); no temporary name of a write may pass the 255-byte limit of a file name.
    workspaces = sample_workspaces(LONGEST_NODE_NAMES)
    saved = snapshot(workspaces)
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(0)
    async with manager(location, run_id="job") as first, manager(location, run_id="job") as second:
        await first.init(
            list(LONGEST_NODE_NAMES), local_nodes={LONGEST_NODE_NAMES[0]: workspaces[LONGEST_NODE_NAMES[0]]}
        )
        await second.init(
            list(LONGEST_NODE_NAMES), local_nodes={LONGEST_NODE_NAMES[1]: workspaces[LONGEST_NODE_NAMES[1]]}
        )
        async with asyncio.TaskGroup() as tg:  # each process writes its shard and receipt
            tg.create_task(first.save(1))
            tg.create_task(second.save(1))
    for epoch in (0, 1):
        fresh: dict[str, dict[str, Any]] = {node: {} for node in LONGEST_NODE_NAMES}
        async with manager(location) as reader:
            await reader.init(fresh)
            await reader.load(epoch)
        assert snapshot(fresh) == saved, epoch


async def test_an_in_place_load_reads_each_shard_s_data_with_one_request(location: Any) -> None:
    """Workspaces holding arrays of the saved shapes get the bytes in those arrays, and one
    scatter read per node fills all of them (one ranged GET on S3): a node's requests are
    a HEAD (the shard's size), a read of its blob index and one of its data."""
    rng = np.random.default_rng(5)
    workspaces: dict[str, dict[str, Any]] = {
        f"trainer_{n}": {
            **{
                f"w{i}": rng.standard_normal(1000 * (i + 1)).astype(np.float64 if i % 2 else np.float32)
                for i in range(8)
            },
            "step": n,
        }
        for n in range(4)
    }
    saved = {node: {key: np.copy(value) for key, value in ws.items()} for node, ws in workspaces.items()}
    targets = {node: dict(ws) for node, ws in workspaces.items()}
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(1)
        for ws in workspaces.values():
            for value in ws.values():
                if isinstance(value, np.ndarray):
                    value[...] = -1
            ws["step"] = -1
        await mgr.load(1)
        report = await mgr.report_checkpoint_stats("checkpoint_load")
    for node, ws in workspaces.items():
        for key, value in ws.items():
            np.testing.assert_array_equal(value, saved[node][key], err_msg=f"{node}/{key}")
            if key != "step":
                assert value is targets[node][key], f"{node}/{key} was replaced, not loaded into"
    data_reads = {node: stats["requests"] - 2 for node, stats in report["nodes"].items()}
    assert data_reads == dict.fromkeys(workspaces, 1)
