"""set_params and path_prefix: reads re-rooted at another location, saves kept under db_prefix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asyncckpt import CheckpointNotFoundError, MultiNodeCheckpointManager
from tests.support.locations import RawStorages, manager, plain_form
from tests.support.workspaces import TWO_NODES, sample_workspaces, snapshot


async def test_path_prefix_re_roots_reads_while_saves_stay_under_db_prefix(
    location: Any, sibling: Callable[[str], Any], raw_storages: RawStorages
) -> None:
    workspaces = sample_workspaces()
    saved = snapshot(workspaces)
    async with manager(location) as writer:
        await writer.init(workspaces)
        await writer.save(3)
    upload = sibling("uploaded")
    assert await raw_storages.copy_every_object(location, upload) > 0
    elsewhere = sibling("elsewhere")  # empty: only path_prefix can make epoch 3 loadable

    fresh: dict[str, dict[str, Any]] = {node: {} for node in TWO_NODES}
    async with manager(elsewhere) as mgr:
        await mgr.init(fresh)
        with pytest.raises(CheckpointNotFoundError):
            await mgr.load(3)
        await mgr.load(3, path_prefix=upload.url)
        assert snapshot(fresh) == saved
        shard_url = mgr.get_ckpt_db_name("trainer_0", 3)  # the object it read
        assert shard_url is not None and shard_url.startswith(upload.url + "/epochs/000000000003/")
        await mgr.save(4)
    assert "epochs/000000000004/manifest.json" in await raw_storages.stored_keys_below(elsewhere)
    assert not any(key.startswith("epochs/000000000004/") for key in await raw_storages.stored_keys_below(upload))

    again: dict[str, dict[str, Any]] = {node: {} for node in TWO_NODES}
    async with manager(sibling("third")) as mgr:
        await mgr.init(again, retrieve_from_epoch=3, path_prefix=upload.url)
        await mgr.load(3)
    assert snapshot(again) == saved


async def test_set_params_overwrites_path_prefix_and_path_type_only_with_truthy_values(
    location: Any, sibling: Callable[[str], Any], raw_storages: RawStorages
) -> None:
    async with manager(location) as writer:
        await writer.init({"trainer_0": {"total": 42}})
        await writer.save(1)
    upload = sibling("uploaded")
    await raw_storages.copy_every_object(location, upload)
    empty = sibling("empty")

    workspace: dict[str, Any] = {}
    async with manager(sibling("own")) as mgr:
        mgr.set_params(["trainer_0"], path_prefix=plain_form(upload), path_type=location.kind)
        assert mgr.nodes == ["trainer_0"]
        mgr.set_params(["trainer_0"])
        mgr.set_params(["trainer_0"], path_prefix="", path_type="")
        await mgr.init({"trainer_0": workspace})
        await mgr.load(1)  # still reads the upload: falsy values changed nothing
        assert workspace == {"total": 42}

        mgr.set_params(["trainer_0"], path_prefix=empty.url)
        with pytest.raises(CheckpointNotFoundError):
            await mgr.load(1)  # a truthy prefix did replace it


async def test_a_process_holding_some_nodes_loads_them_from_a_path_prefix(tmp_path: Path) -> None:
    # one process of a two-process job re-roots its reads; set_params must see all the
    # job's nodes, not only the ones this process holds
    nodes = ["trainer_0", "trainer_1"]
    saved = tmp_path / "saved"
    async with MultiNodeCheckpointManager(saved.as_uri()) as writer:
        await writer.init({"trainer_0": {"total": 7}, "trainer_1": {"total": 9}})
        await writer.save(3)
    async with MultiNodeCheckpointManager((tmp_path / "other").as_uri(), run_id="job") as mgr:
        await mgr.init(nodes, local_nodes=["trainer_1"])
        await mgr.load(3, path_prefix=saved.as_uri())
        assert dict(mgr.workspace("trainer_1")) == {"total": 9}
