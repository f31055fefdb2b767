"""Incremental saves (TransferConfig.incremental): a blob unchanged since the last epoch the
manager committed or loaded is not uploaded again; the new epoch points at the stored
bytes, and loads (whole and partial) follow the pointer, bit-exact."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from asyncckpt import CheckpointCorruptedError, MultiNodeCheckpointManager, Retention, TransferConfig
from asyncckpt.layout import epoch_dir
from tests.support.asserts import assert_same
from tests.support.locations import RawStorages, manager

ARRAYS = 10
ELEMENTS = 32 << 10  # 256 KiB of float64 per array


def frozen_state(seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    """Ten arrays of the same size: "a0" trains, "a1".."a9" are frozen (90% of the bytes)."""
    rng = np.random.default_rng(seed)
    return {f"a{i}": rng.standard_normal(ELEMENTS) for i in range(ARRAYS)}


def train(state: dict[str, Any], step: int) -> None:
    """One step: only "a0" changes."""
    state["a0"] = np.random.default_rng(1000 + step).standard_normal(ELEMENTS)


async def stored_bytes(raw_storages: RawStorages, location: Any, epoch: int | None = None) -> int:
    """The size of every object of ``epoch`` (every epoch when None), as stored."""
    async with raw_storages.open(location) as storage:
        prefix = epoch_dir(epoch) if epoch is not None else "epochs/"
        return sum([info.size async for info in storage.list(prefix)])


async def index_json(raw_storages: RawStorages, location: Any, epoch: int) -> dict[str, Any]:
    async with raw_storages.open(location) as storage:
        manifest = json.loads(await storage.get(f"{epoch_dir(epoch)}manifest.json"))
        return {"manifest": manifest, "index": json.loads(await storage.get(manifest["index"]["key"]))}


async def load_fresh(location: Any, epoch: int, nodes: tuple[str, ...] = ("n0",)) -> dict[str, dict[str, Any]]:
    async with manager(location) as mgr:
        await mgr.init({node: {} for node in nodes})
        await mgr.load(epoch)
        return {node: dict(mgr.workspace(node)) for node in nodes}


async def test_second_save_uploads_only_the_trained_tenth_and_both_epochs_load_bit_exact(
    location: Any, raw_storages: RawStorages
) -> None:
    state = frozen_state()
    first = dict(state)
    async with manager(location) as mgr:
        await mgr.init({"n0": state})
        await mgr.save(1)
        saved1 = await mgr.report_checkpoint_stats("checkpoint_save")
        train(state, 1)
        await mgr.save(2)
        saved2 = await mgr.report_checkpoint_stats("checkpoint_save")
    state_bytes = ARRAYS * ELEMENTS * 8
    assert saved1["reused_bytes"] == 0 and saved1["bytes"] >= state_bytes
    assert saved2["reused_bytes"] == 9 * ELEMENTS * 8
    assert saved2["bytes"] <= 0.12 * saved1["bytes"], (saved2["bytes"], saved1["bytes"])
    assert saved2["nodes"]["n0"]["reused_bytes"] == saved2["reused_bytes"]
    # what the bucket holds says the same, whatever the stats say
    epoch1, epoch2 = await stored_bytes(raw_storages, location, 1), await stored_bytes(raw_storages, location, 2)
    assert epoch2 <= 0.12 * epoch1, (epoch2, epoch1)
    assert_same((await load_fresh(location, 1))["n0"], first, "epoch 1")
    assert_same((await load_fresh(location, 2))["n0"], state, "epoch 2")


async def test_changing_one_element_of_a_frozen_array_uploads_that_blob_again(
    location: Any, raw_storages: RawStorages
) -> None:
    state = frozen_state()
    async with manager(location) as mgr:
        await mgr.init({"n0": state})
        await mgr.save(1)
        state["a7"] = state["a7"].copy()
        state["a7"][12345] = np.nextafter(state["a7"][12345], np.inf)  # one ulp of one element
        await mgr.save(2)
        saved = await mgr.report_checkpoint_stats("checkpoint_save")
    assert saved["reused_bytes"] == 9 * ELEMENTS * 8  # every array but a7
    entries = (await raw_storages.read_manifest(location, 2))["nodes"]["n0"]["blobs"]
    assert "ref" not in entries["a7"] and all("ref" in entries[f"a{i}"] for i in range(ARRAYS) if i != 7)
    assert_same((await load_fresh(location, 2))["n0"], state, "epoch 2")


async def test_a_blob_whose_layout_changed_is_uploaded_again(location: Any) -> None:
    """The same bytes as another dtype or shape are a new entry, not a pointer."""
    state = frozen_state()
    async with manager(location) as mgr:
        await mgr.init({"n0": state})
        await mgr.save(1)
        state["a1"] = state["a1"].view(np.int64)
        state["a2"] = state["a2"].reshape(256, -1)
        state["a3"] = np.asfortranarray(state["a3"].reshape(128, -1))
        await mgr.save(2)
        saved = await mgr.report_checkpoint_stats("checkpoint_save")
    assert saved["reused_bytes"] == 7 * ELEMENTS * 8
    assert_same((await load_fresh(location, 2))["n0"], state, "epoch 2")


async def test_records_point_at_the_object_holding_the_bytes_and_the_format_says_so(
    location: Any, raw_storages: RawStorages
) -> None:
    """Epoch 3 points straight at epoch 1's shard (not through epoch 2); an epoch that
    points at nothing is written as format 2, one that does as format 3."""
    state = frozen_state()
    async with manager(location) as mgr:
        await mgr.init({"n0": state})
        for epoch in (1, 2, 3):
            train(state, epoch)
            await mgr.save(epoch)
    first = await index_json(raw_storages, location, 1)
    third = await index_json(raw_storages, location, 3)
    assert first["manifest"]["version"] == 2 and first["index"]["version"] == 2
    assert "reused_bytes" not in first["manifest"]
    assert third["manifest"]["version"] == 3 and third["index"]["version"] == 3
    assert third["manifest"]["reused_bytes"] == 9 * ELEMENTS * 8
    record = third["index"]["nodes"]["n0"]
    shard1 = first["index"]["nodes"]["n0"]["shard"]
    assert record["refs"] == [{"key": shard1, "size": first["index"]["nodes"]["n0"]["size"]}]
    assert record["base"] == {
        "epoch": 2,
        "writer_id": (await index_json(raw_storages, location, 2))["index"]["writer_id"],
    }
    assert_same((await load_fresh(location, 3))["n0"], state, "epoch 3")


async def test_partial_loads_follow_the_pointers(location: Any) -> None:
    state = frozen_state()
    async with manager(location) as mgr:
        await mgr.init({"n0": state, "n1": {"small": 3, "w": np.arange(100_000, dtype=np.int32)}})
        await mgr.save(1)
        train(state, 1)
        await mgr.save(2)
        session: dict[str, Any] = {}
        assert await mgr.load_blobs_locally(["n0", "n1"], ["a0", "a4", "a9", "w", "small"], 2, session)
        partial = await mgr.report_checkpoint_stats("checkpoint_partial_load")
    assert_same(
        session,
        {"a0": state["a0"], "a4": state["a4"], "a9": state["a9"], "w": np.arange(100_000, dtype=np.int32), "small": 3},
    )
    assert partial["nodes"]["n0"]["bytes"] == 3 * ELEMENTS * 8


async def test_a_manager_reuses_what_it_loaded_and_save_async_reuses_too(location: Any) -> None:
    state = frozen_state()
    async with manager(location) as mgr:
        await mgr.init({"n0": dict(state)})
        await mgr.save(1)
    async with manager(location) as mgr:
        await mgr.init({"n0": {}})
        await mgr.save(2)  # nothing committed or loaded here yet: everything is uploaded
        assert (await mgr.report_checkpoint_stats("checkpoint_save"))["reused_bytes"] == 0
        await mgr.load(1)
        mgr.workspace("n0")["a0"] = state["a0"] + 1
        handle = await mgr.save_async(3)
        await handle
        assert (await mgr.report_checkpoint_stats("checkpoint_save"))["reused_bytes"] == 9 * ELEMENTS * 8
    assert_same((await load_fresh(location, 3))["n0"], {**state, "a0": state["a0"] + 1}, "epoch 3")


async def test_incremental_off_uploads_every_blob_as_format_2(location: Any, raw_storages: RawStorages) -> None:
    state = frozen_state()
    config = TransferConfig(incremental=False)
    async with manager(location, config=config) as mgr:
        await mgr.init({"n0": state})
        await mgr.save(1)
        await mgr.save(2)
        assert (await mgr.report_checkpoint_stats("checkpoint_save"))["reused_bytes"] == 0
    second = await index_json(raw_storages, location, 2)
    assert second["manifest"]["version"] == 2 and "refs" not in second["index"]["nodes"]["n0"]
    entries = (await raw_storages.read_manifest(location, 2))["nodes"]["n0"]["blobs"]
    assert not any("xxh3" in entry for entry in entries.values())  # no hash pass either
    # such epochs (format 2, no fingerprints) load, and an incremental manager builds on them
    async with manager(location) as mgr:
        await mgr.init({"n0": {}})
        await mgr.load(2)
        assert_same(dict(mgr.workspace("n0")), state, "epoch 2")
        await mgr.save(3)  # no fingerprints to compare with: every blob is uploaded
        assert (await mgr.report_checkpoint_stats("checkpoint_save"))["reused_bytes"] == 0
        await mgr.save(4)
        assert (await mgr.report_checkpoint_stats("checkpoint_save"))["reused_bytes"] == ARRAYS * ELEMENTS * 8


async def test_damaged_referenced_bytes_are_named_on_load(location: Any, raw_storages: RawStorages) -> None:
    state = frozen_state()
    async with manager(location) as mgr:
        await mgr.init({"n0": state})
        await mgr.save(1)
        train(state, 1)
        await mgr.save(2)
    record = (await index_json(raw_storages, location, 2))["index"]["nodes"]["n0"]
    entries = (await raw_storages.read_manifest(location, 2))["nodes"]["n0"]["blobs"]
    async with raw_storages.open(location) as storage:
        key = record["refs"][0]["key"]
        data = bytearray(await storage.get(key))
        data[entries["a5"]["offset"] + 10] ^= 0xFF
        await storage.put(key, bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=r"blob 'a5'.*CRC32C"):
        await load_fresh(location, 2)


async def test_a_record_pointing_outside_its_objects_is_refused(location: Any, raw_storages: RawStorages) -> None:
    state = frozen_state()
    async with manager(location) as mgr:
        await mgr.init({"n0": state})
        await mgr.save(1)
        await mgr.save(2)
    async with raw_storages.open(location) as storage:
        manifest = json.loads(await storage.get(f"{epoch_dir(2)}manifest.json"))
        index = json.loads(await storage.get(manifest["index"]["key"]))
        index["nodes"]["n0"]["refs"][0]["key"] = index["nodes"]["n0"]["shard"]  # its own epoch: refused
        await storage.put(manifest["index"]["key"], json.dumps(index).encode())
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
        await mgr.init({"n0": {}})
        with pytest.raises(CheckpointCorruptedError):
            await mgr.load(2)


# --------------------------------------------------------------------------- lifecycle: shared objects


async def test_keep_last_1_over_20_epochs_stores_about_one_state_and_the_kept_epoch_loads(
    location: Any, raw_storages: RawStorages
) -> None:
    state = frozen_state()
    async with manager(location, retention=Retention(keep_last=1)) as mgr:
        await mgr.init({"n0": state})
        for epoch in range(1, 21):
            train(state, epoch)
            await mgr.save(epoch)
        assert await mgr.committed_epochs() == [20]
        report = await mgr.gc(grace_period=0)
        assert report.deleted == []  # retention left nothing behind...
        assert report.kept_referenced == 1  # ...but epoch 1's shard, which epoch 20 points at
    state_bytes = ARRAYS * ELEMENTS * 8
    stored = await stored_bytes(raw_storages, location)
    assert stored <= 1.25 * state_bytes, (stored, state_bytes)  # epoch 1's shard + epoch 20's trained tenth
    assert_same((await load_fresh(location, 20))["n0"], state, "epoch 20")


async def test_deleting_an_epoch_keeps_what_later_epochs_point_at_and_reclaims_it_with_them(
    location: Any, raw_storages: RawStorages
) -> None:
    frozen, trained = frozen_state(), {"w": np.zeros(ELEMENTS)}
    async with manager(location) as mgr:
        await mgr.init({"n0": frozen, "n1": trained})
        for epoch in (1, 2, 3):
            trained["w"] = trained["w"] + 1
            await mgr.save(epoch)
        shard1 = {n: r["shard"] for n, r in (await index_json(raw_storages, location, 1))["index"]["nodes"].items()}
        await mgr.delete_epoch(1)
        keys = await raw_storages.stored_keys_below(location)
        assert shard1["n0"] in keys  # epochs 2 and 3 point at it
        assert shard1["n1"] not in keys and not [k for k in keys if k.startswith(epoch_dir(1)) and k != shard1["n0"]]
        assert (await mgr.gc(grace_period=0)).kept_referenced == 1  # gc keeps it too
        for epoch in (2, 3):
            assert await mgr.cp_accessible(epoch)
            loaded = await load_fresh(location, epoch, ("n0", "n1"))
            assert_same(loaded["n0"], frozen, f"epoch {epoch}")
            assert_same(loaded["n1"], {"w": np.zeros(ELEMENTS) + epoch}, f"epoch {epoch}")
        await mgr.delete_epoch(2)
        assert shard1["n0"] in await raw_storages.stored_keys_below(location)  # epoch 3 still points at it
        await mgr.delete_epoch(3)  # the last epoch pointing at it: it goes with it
        left = await raw_storages.stored_keys_below(location)
        assert all(key.endswith(".decision") for key in left), left  # gc's claim stays, as a tombstone


async def test_gc_reclaims_what_a_crashed_delete_left_and_keeps_what_is_pointed_at(
    location: Any, raw_storages: RawStorages
) -> None:
    """A delete that uncommitted epochs 1 and 2 and died before deleting objects: gc keeps
    epoch 1's shard (epoch 3 points at it) and removes the rest."""
    frozen, trained = frozen_state(), {"w": np.zeros(ELEMENTS)}
    async with manager(location) as mgr:
        await mgr.init({"n0": frozen, "n1": trained})
        for epoch in (1, 2, 3):
            trained["w"] = trained["w"] + 1
            await mgr.save(epoch)
        first = await index_json(raw_storages, location, 1)
        async with raw_storages.open(location) as storage:
            for epoch in (1, 2):
                writer = (await index_json(raw_storages, location, epoch))["index"]["writer_id"]
                await storage.delete([f"{epoch_dir(epoch)}{writer}.decision", f"{epoch_dir(epoch)}manifest.json"])
        report = await mgr.gc(grace_period=0)
        assert report.kept_referenced == 1
        keys = await raw_storages.stored_keys_below(location)
        assert first["index"]["nodes"]["n0"]["shard"] in keys
        outside = {k for k in keys if not k.startswith(epoch_dir(3)) and not k.endswith(".decision")}
        assert outside == {first["index"]["nodes"]["n0"]["shard"]}
    loaded = await load_fresh(location, 3, ("n0", "n1"))
    assert_same(loaded["n0"], frozen, "epoch 3")
