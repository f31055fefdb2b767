"""Where a job resumes from: get_resume_from_epoch_id and cp_accessible."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from asyncckpt import CheckpointNotFoundError, MultiNodeCheckpointManager, StorageError
from tests.support.locations import RawStorages, manager
from tests.support.workspaces import TWO_NODES

# --------------------------------------------------------------------------- get_resume_from_epoch_id


async def test_resume_epoch_is_none_when_empty_else_the_latest_or_the_committed_one_asked_for(
    location: Any,
) -> None:
    async with manager(location) as mgr:
        assert await mgr.get_resume_from_epoch_id() is None
        await mgr.init({"trainer_0": {"total": 0}})
        for epoch in (0, 1, 12, 3):
            await mgr.save(epoch)
        assert await mgr.get_resume_from_epoch_id() == 12
        assert await mgr.get_resume_from_epoch_id(1) == 1
        with pytest.raises(CheckpointNotFoundError):
            await mgr.get_resume_from_epoch_id(4)
    async with manager(location) as fresh:
        assert await fresh.get_resume_from_epoch_id() == 12
        assert await fresh.get_resume_from_epoch_id(3) == 3


async def test_an_epoch_with_shards_but_no_manifest_is_ignored(location: Any, raw_storages: RawStorages) -> None:
    async with manager(location) as mgr:
        await mgr.init({"trainer_0": {"total": 0}})
        await mgr.save(5)
    async with raw_storages.open(location) as storage:  # leftovers of a save that never committed
        await storage.put("epochs/000000000007/x/y.shard", b"half a shard")
    async with manager(location) as mgr:
        assert await mgr.get_resume_from_epoch_id() == 5
        with pytest.raises(CheckpointNotFoundError):
            await mgr.get_resume_from_epoch_id(7)
        assert await mgr.cp_accessible(7) is False
        await mgr.init({"trainer_0": {}})
        with pytest.raises(CheckpointNotFoundError):
            await mgr.load(7)


async def test_resume_skips_a_latest_epoch_whose_manifest_does_not_parse(
    location: Any, raw_storages: RawStorages
) -> None:
    async with manager(location) as mgr:
        await mgr.init({"trainer_0": {"total": 0}})
        await mgr.save(1)
        await mgr.save(2)
    async with raw_storages.open(location) as storage:
        await storage.put("epochs/000000000002/manifest.json", b'{"format": "asyncckpt/manif')
    async with manager(location) as mgr:
        assert await mgr.get_resume_from_epoch_id() == 1


# --------------------------------------------------------------------------- cp_accessible


async def test_cp_accessible_is_true_for_a_good_location_and_for_committed_complete_epochs_only(
    location: Any, raw_storages: RawStorages
) -> None:
    async with manager(location) as mgr:
        assert await mgr.cp_accessible() is True  # nothing written yet
        assert await mgr.cp_accessible(None) is True
        assert await raw_storages.stored_keys(location) == []
        await mgr.init({node: {"total": i} for i, node in enumerate(TWO_NODES)})
        await mgr.save(1)
        await mgr.save(2)
        assert await mgr.cp_accessible(1) is True
        assert await mgr.cp_accessible(3) is False
        shard_url = mgr.get_ckpt_db_name("trainer_1", 1)
        assert shard_url is not None
        await raw_storages.delete_object(location, shard_url)
        assert await mgr.cp_accessible(1) is False
        assert await mgr.cp_accessible(2) is True
        assert await mgr.cp_accessible() is True


async def test_missing_s3_bucket_is_not_accessible_and_save_names_the_bucket(s3_options: dict[str, Any]) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    async with MultiNodeCheckpointManager(f"s3://{bucket}/run", storage_options=s3_options) as mgr:
        assert await mgr.cp_accessible() is False
        assert await mgr.cp_accessible(1) is False
        await mgr.init({node: {"total": 1} for node in TWO_NODES})
        with pytest.raises(StorageError) as info:
            await mgr.save(1)
    assert bucket in str(info.value)
    assert isinstance(info.value, OSError)


async def test_file_location_below_a_regular_file_is_not_accessible_and_save_raises_storage_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "a_file").write_bytes(b"not a directory")
    root = tmp_path / "a_file" / "ckpt"
    async with MultiNodeCheckpointManager(root.as_uri()) as mgr:
        assert await mgr.cp_accessible() is False
        assert await mgr.cp_accessible(0) is False
        await mgr.init({"trainer_0": {"total": 1}})
        with pytest.raises(StorageError):
            await mgr.save(0)
