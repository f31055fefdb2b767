"""The metadata handler: what the manager tells it, and which of its answers it uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from asyncckpt import CheckpointNotFoundError, MultiNodeCheckpointManager
from tests.support.locations import RawStorages, manager
from tests.support.workspaces import TWO_NODES


class RecordingHandler:
    """A metadata handler (async methods) that records every call it gets."""

    def __init__(self, location: Any, storages: RawStorages, last_epoch: Any = "ask the user", accessible: bool = True):
        self.location = location
        self.storages = storages
        self.calls: list[tuple[str, Any]] = []
        self.last_epoch_answer = last_epoch
        self.accessible = accessible
        self.committed_when_written: dict[int, bool] = {}

    async def set_params(
        self, db_prefix: str, db_type: str, node_names: list[str], path_prefix: str | None, path_type: str | None
    ) -> None:
        self.calls.append(
            (
                "set_params",
                {
                    "db_prefix": db_prefix,
                    "db_type": db_type,
                    "node_names": list(node_names),
                    "path_prefix": path_prefix,
                    "path_type": path_type,
                },
            )
        )

    async def write(self, epoch: int) -> None:
        self.calls.append(("write", epoch))
        async with self.storages.open(self.location) as storage:
            self.committed_when_written[epoch] = await storage.exists(f"epochs/{epoch:012d}/manifest.json")

    async def last_epoch(self, user_epoch: int | None = None) -> int | None:
        self.calls.append(("last_epoch", user_epoch))
        return user_epoch if self.last_epoch_answer == "ask the user" else self.last_epoch_answer

    async def cp_accessible(self, epoch: int | None = None) -> bool:
        self.calls.append(("cp_accessible", epoch))
        return self.accessible

    async def report(self, action_name: str, stats: dict[str, Any]) -> None:
        self.calls.append(("report", (action_name, stats)))

    def called(self, method: str) -> list[Any]:
        return [args for name, args in self.calls if name == method]


async def test_metadata_handler_gets_set_params_then_write_after_each_commit_and_reports(
    location: Any, sibling: Callable[[str], Any], raw_storages: RawStorages
) -> None:
    handler = RecordingHandler(location, raw_storages)
    upload = sibling("uploaded")
    async with manager(location, metadata_handler=handler) as mgr:
        await mgr.init(list(TWO_NODES), path_prefix=upload.url)
        for ws in (mgr.workspace(node) for node in TWO_NODES):
            ws["total"] = 1
        await mgr.save(0)
        await mgr.save(1)
        report = await mgr.report_checkpoint_stats("checkpoint_save")

    assert handler.calls[0][0] == "set_params"
    assert handler.called("set_params")[0] == {
        "db_prefix": location.url,
        "db_type": "msgpack",
        "node_names": list(TWO_NODES),
        "path_prefix": upload.url,
        "path_type": None,
    }
    assert handler.called("write") == [0, 1]
    assert handler.committed_when_written == {0: True, 1: True}
    assert handler.called("report") == [("checkpoint_save", report)]


async def test_metadata_handler_last_epoch_answer_is_used_and_verified(
    location: Any, raw_storages: RawStorages
) -> None:
    async with manager(location) as writer:
        await writer.init({"trainer_0": {"total": 1}})
        for epoch in (0, 1, 2):
            await writer.save(epoch)

    handler = RecordingHandler(location, raw_storages, last_epoch=1)
    async with manager(location, metadata_handler=handler) as mgr:
        assert await mgr.get_resume_from_epoch_id() == 1
        assert await mgr.get_resume_from_epoch_id(2) == 1
    assert handler.called("last_epoch") == [None, 2]

    handler = RecordingHandler(location, raw_storages, last_epoch=None)  # the handler says: start fresh
    async with manager(location, metadata_handler=handler) as mgr:
        assert await mgr.get_resume_from_epoch_id() is None

    handler = RecordingHandler(location, raw_storages, last_epoch=7)  # an epoch that is not committed
    async with manager(location, metadata_handler=handler) as mgr:
        with pytest.raises(CheckpointNotFoundError):
            await mgr.get_resume_from_epoch_id()


async def test_metadata_handler_cp_accessible_answer_is_used(location: Any, raw_storages: RawStorages) -> None:
    handler = RecordingHandler(location, raw_storages, accessible=False)
    async with manager(location, metadata_handler=handler) as mgr:
        assert await mgr.cp_accessible() is False
        handler.accessible = True
        assert await mgr.cp_accessible() is True
    assert handler.called("cp_accessible") == [None, None]


HANDLER_METHODS = ("set_params", "write", "last_epoch", "cp_accessible", "report")


async def test_a_metadata_handler_missing_a_method_is_refused_at_construction(location: Any) -> None:
    for missing in HANDLER_METHODS:
        methods = {name: getattr(RecordingHandler, name) for name in HANDLER_METHODS if name != missing}
        incomplete = type("IncompleteHandler", (), methods)()
        with pytest.raises(TypeError, match=missing):
            MultiNodeCheckpointManager(location.url, metadata_handler=incomplete, storage_options=location.options)
        not_callable = type("NotCallableHandler", (), {**methods, missing: "not a method"})()
        with pytest.raises(TypeError, match=missing):
            MultiNodeCheckpointManager(location.url, metadata_handler=not_callable, storage_options=location.options)
