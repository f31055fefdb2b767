"""A delete racing an incremental save that points at the deleted epoch's objects.

The save of epoch 2 points at epoch 1's shards (it builds on epoch 1). It writes its
index (naming those objects), checks that epoch 1 is still committed, then decides; a
delete uncommits epoch 1, then lists and reads every index and receipt and deletes only
what none names (DESIGN.md §3). Each test pauses one step of one side (a storage wrapper
holds one request until released: no sleeps, no timing) while the other runs to its end.
Whatever the interleaving, the save either commits an epoch that loads bit-exact (the
delete kept what it points at) or fails with CheckpointConflictError saying its base was
deleted, and nothing of it stays committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest

from asyncckpt import CheckpointConflictError, MultiNodeCheckpointManager, TransferConfig
from asyncckpt.attempt import SaveAttempt
from asyncckpt.commit import decide_commit, publish_manifest
from asyncckpt.housekeeping import delete_epoch
from asyncckpt.manifest import EpochIndex, read_index, read_manifest
from asyncckpt.staging import encode_workspaces
from asyncckpt.storage import ByteBudget, Storage, storage_for
from asyncckpt.testing.wrappers import StorageWrapper
from asyncckpt.transfer import Reuse
from tests.support.asserts import assert_same

T = TypeVar("T")
WAIT = 30.0
NODES = ("n0", "n1")
CONFIG = TransferConfig()


def state(epoch: int) -> dict[str, dict[str, Any]]:
    """n0 is frozen (the same at every epoch), n1 trains."""
    rng = np.random.default_rng(5)
    return {"n0": {f"w{i}": rng.standard_normal(1 << 15) for i in range(4)}, "n1": {"w": np.full(1 << 15, epoch)}}


class Pausing(StorageWrapper):
    """Holds the first operation that ``matches`` (op, key) until :meth:`release`."""

    def __init__(self, inner: Storage, matches: Callable[[str, str | None], bool]):
        super().__init__(inner)
        self._matches = matches
        self.arrived = asyncio.Event()
        self._released = asyncio.Event()

    def release(self) -> None:
        self._released.set()

    async def intercept(self, op: str, keys: tuple[str | None, ...], call: Callable[[], Awaitable[T]]) -> T:
        if not self.arrived.is_set() and any(self._matches(op, key) for key in keys):
            self.arrived.set()
            async with asyncio.timeout(WAIT):
                await self._released.wait()
        return await call()


async def save_epoch_2(storage: Storage, base: EpochIndex) -> None:
    """What ``save(2)`` of an incremental manager that committed epoch 1 (``base``) does:
    upload (pointing at epoch 1), write the index, check the base, decide, publish."""
    encoded = encode_workspaces(state(2))
    attempt = SaveAttempt(
        storage, ByteBudget(CONFIG.max_bytes_in_flight), CONFIG, "msgpack", "racer", list(NODES), 2, "0a0b",
        reuse=Reuse(CONFIG, base),
    )  # fmt: skip
    staged = await attempt.upload(encoded)
    assert staged.index.reused_bytes > 0  # it does point at epoch 1
    await decide_commit(storage, staged.manifest)
    await publish_manifest(storage, staged.manifest)


def _index_put(op: str, key: str | None) -> bool:
    return op == "put" and key is not None and key.startswith("epochs/000000000002/") and key.endswith("index.json")


def _base_check(op: str, key: str | None) -> bool:  # the save's GET of epoch 1's manifest, after its index
    return op == "get" and key == "epochs/000000000001/manifest.json"


def _decision_put(op: str, key: str | None) -> bool:
    return op == "put" and key is not None and key.startswith("epochs/000000000002/") and key.endswith(".decision")


def _delete_listing(op: str, key: str | None) -> bool:  # the delete uncommitted epoch 1 and lists what is named
    return op == "list"


def _delete_objects(op: str, key: str | None) -> bool:  # the delete read every index and deletes
    return op == "delete" and key is not None and key.endswith(".shard")


# paused side, its step, and how the save ends: "committed" (the delete kept what it points
# at) or "refused" (it saw its base deleted)
PAUSES: dict[str, tuple[str, Callable[[str, str | None], bool], str]] = {
    "save before its index": ("save", _index_put, "refused"),
    "save before its base check": ("save", _base_check, "refused"),
    "save before its decision": ("save", _decision_put, "committed"),
    "delete before its listing": ("delete", _delete_listing, "refused"),
    "delete before deleting objects": ("delete", _delete_objects, "refused"),
}


@pytest.mark.parametrize("pause", list(PAUSES))
async def test_a_delete_of_the_base_racing_an_incremental_save_keeps_its_objects_or_fails_it(
    location: Any, pause: str
) -> None:
    side, matches, outcome = PAUSES[pause]
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options, config=CONFIG) as mgr:
        await mgr.init(state(1))
        await mgr.save(1)
    async with storage_for(location.url, options=location.options, config=CONFIG) as storage:
        base = await read_index(storage, await read_manifest(storage, 1))
        paused = Pausing(storage, matches)
        saver = paused if side == "save" else storage
        deleter = paused if side == "delete" else storage
        first = asyncio.create_task(save_epoch_2(saver, base) if side == "save" else delete_epoch(deleter, 1))
        try:
            async with asyncio.timeout(WAIT):
                await paused.arrived.wait()
            # the other side runs to its end while this one is held
            error: BaseException | None = None
            if side == "save":
                await delete_epoch(deleter, 1)
            else:
                try:
                    await save_epoch_2(saver, base)
                except CheckpointConflictError as exc:
                    error = exc
        finally:
            paused.release()
        if side == "save":
            try:
                await first
            except CheckpointConflictError as exc:
                error = exc
        else:
            await first
    if outcome == "committed":
        assert error is None, repr(error)
    else:
        assert isinstance(error, CheckpointConflictError), repr(error)
        assert "epoch 1, whose stored blobs this save reuses, was deleted while it saved" in str(error)
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
        await mgr.init({node: {} for node in NODES})
        assert await mgr.committed_epochs() == ([2] if outcome == "committed" else [])
        for _ in range(2):  # as saved, and again after gc took what is garbage
            for epoch in await mgr.committed_epochs():
                assert await mgr.cp_accessible(epoch)
                await mgr.load(epoch)
                for node, blobs in state(epoch).items():
                    assert_same(dict(mgr.workspace(node)), blobs, f"epoch {epoch} {node}")
            await mgr.gc(grace_period=0)
        if outcome == "refused":  # a retry uploads every blob and commits
            for node, blobs in state(2).items():
                mgr.workspace(node).update(blobs)
            await mgr.save(2)
            assert (await mgr.report_checkpoint_stats("checkpoint_save"))["reused_bytes"] == 0
