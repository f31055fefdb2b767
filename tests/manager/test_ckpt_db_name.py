"""MultiNodeCheckpointManager.get_ckpt_db_name: the URL of a node's shard object."""

from __future__ import annotations

from typing import Any

from tests.support.locations import RawStorages, key_below, manager
from tests.support.workspaces import THREE_NODES


async def test_ckpt_db_name_names_the_committed_shard_object_and_none_for_unknown_nodes(
    location: Any, raw_storages: RawStorages
) -> None:
    async with manager(location) as mgr:
        assert mgr.get_ckpt_db_name("trainer_0", 5) is None  # before init no node is known
        await mgr.init({node: {"total": i} for i, node in enumerate(THREE_NODES)})
        assert mgr.get_ckpt_db_name("trainer_9", 5) is None
        predicted = {node: mgr.get_ckpt_db_name(node, 5) for node in THREE_NODES}
        await mgr.save(5)
        written = {node: mgr.get_ckpt_db_name(node, 5) for node in THREE_NODES}
        assert mgr.get_ckpt_db_name("trainer_9", 5) is None
    manifest = await raw_storages.read_manifest(location, 5)
    committed = {node: f"{location.url}/{manifest['nodes'][node]['shard']}" for node in THREE_NODES}
    assert written == committed
    assert predicted == committed  # the name before save is the object save then writes
    async with raw_storages.open(location) as storage:
        for url in written.values():
            assert url is not None and url.startswith(f"{location.url}/epochs/000000000005/")
            assert await storage.exists(key_below(location, url))
    async with manager(location) as reader:
        await reader.init({node: {} for node in THREE_NODES}, retrieve_from_epoch=5)
        assert {node: reader.get_ckpt_db_name(node, 5) for node in THREE_NODES} == committed
        await reader.load(5)
        assert {node: reader.get_ckpt_db_name(node, 5) for node in THREE_NODES} == committed
