"""gc racing saves: no committed epoch ever names a missing object, whatever the timing.

The commit protocol (asyncckpt/commit.py, DESIGN.md "Commit protocol") makes every save
attempt end with a create-only decision before its manifest, and gc claim an attempt with
its own create-only "abandoned" decision before it deletes anything of it. These tests
pause one request at every step, of the save while gc runs to the end (a holding proxy in
front of S3), and of gc while a save runs to the end; and they run gc with no grace period
in a loop beside saves on every backend. Every save that returned loads bit-exact; every
save that failed says gc claimed it (CheckpointConflictError), and nothing it wrote stays
committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from asyncckpt import CheckpointConflictError, MultiNodeCheckpointManager, TransferConfig
from asyncckpt.config import MiB
from tests.support.asserts import assert_same
from tests.support.faultproxy import Exchange, FaultProxy, Hold, Request

NODES = ("trainer_0", "trainer_1", "ps_0")
WAIT = 30.0


def state(epoch: int) -> dict[str, dict[str, Any]]:
    return {
        node: {"w": np.arange(2048, dtype=np.float32) * (epoch + 1) + i, "epoch": epoch, "tag": f"{node}@{epoch}"}
        for i, node in enumerate(NODES)
    }


def fill(mgr: MultiNodeCheckpointManager, epoch: int) -> None:
    for node, blobs in state(epoch).items():
        mgr.workspace(node).clear()
        mgr.workspace(node).update(blobs)


async def check_every_committed_epoch_loads(url: str, options: dict[str, Any] | None) -> list[int]:
    """Every committed epoch is intact (all its shards present) and loads its own state."""
    async with MultiNodeCheckpointManager(url, storage_options=options) as mgr:
        await mgr.init({node: {} for node in NODES})
        committed = await mgr.committed_epochs()
        for epoch in committed:
            assert await mgr.cp_accessible(epoch), f"epoch {epoch} is committed but not intact"
            await mgr.load(epoch)
            for node, blobs in state(epoch).items():
                assert_same(dict(mgr.workspace(node)), blobs, f"epoch {epoch} {node}")
        return committed


def assert_claimed_by_gc(exc: BaseException) -> None:
    assert isinstance(exc, CheckpointConflictError), repr(exc)
    assert "gc claimed this save" in str(exc), str(exc)


# --------------------------------------------------------------------------- one pause at every step


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_endpoint).start()
    try:
        yield proxy
    finally:
        proxy.stop()
    assert not proxy.errors, f"fault proxy failed internally: {proxy.errors!r}"


def _put(suffix: str) -> Callable[[Request], bool]:
    return lambda r: r.method == "PUT" and "/epochs/000000000002/" in r.path and r.path.endswith(suffix)


def _stored_shards(count: int) -> Callable[[list[Exchange]], bool]:
    """At least ``count`` shards of epoch 2 were stored (answered 200)."""

    def enough(log: list[Exchange]) -> bool:
        shards = {e.path for e in log if e.method == "PUT" and e.status == 200 and _put(".shard")(_as_request(e))}
        return len(shards) >= count

    return enough


def _as_request(e: Exchange) -> Request:
    return Request(e.method, e.path, e.query, {})


def _gc_claim(r: Request) -> bool:
    return r.method == "PUT" and r.path.endswith(".decision")


def _gc_delete(r: Request) -> bool:
    return r.method == "POST" and "delete" in r.query


# pause point: (which request of the save is held, what the save must end with)
SAVE_PAUSES: dict[str, tuple[Callable[[Request], bool], str]] = {
    "a shard upload": (_put("trainer_1.shard"), "claimed"),
    "the index": (_put("/index.json"), "claimed"),
    "the commit decision": (_put(".decision"), "claimed"),
    "the manifest": (_put("manifest.json"), "committed"),  # gc finishes the commit it finds decided
}


@pytest.mark.parametrize("pause", list(SAVE_PAUSES))
async def test_gc_while_a_save_is_paused_at_each_step(
    pause: str, proxy: FaultProxy, s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    """The save is held at one request; gc (no grace period) runs to its end; then the save
    goes on. A save that gc claimed fails clearly; one it found decided is completed."""
    predicate, outcome = SAVE_PAUSES[pause]
    url = f"s3://{s3_bucket}/paused-save"
    hold = Hold(timeout=WAIT)
    config = TransferConfig(max_attempts=2)
    async with (
        MultiNodeCheckpointManager(
            url, storage_options={**s3_options, "endpoint_url": proxy.url}, config=config
        ) as saver,
        MultiNodeCheckpointManager(url, storage_options=s3_options) as collector,
    ):
        await saver.init({node: {} for node in NODES})
        fill(saver, 1)
        await saver.save(1)
        fill(saver, 2)
        proxy.add_rule(predicate, hold, times=1)
        saving = asyncio.create_task(saver.save(2))
        try:
            assert await asyncio.to_thread(hold.arrived.wait, WAIT), f"the save never reached {pause}"
            # the other shards are stored (gc sees the attempt), the held one is not
            stored = _stored_shards(len(NODES) - 1 if pause == "a shard upload" else len(NODES))
            assert await asyncio.to_thread(proxy.wait_for, stored, WAIT), "the other shards were never stored"
            report = await collector.gc(grace_period=0)
        finally:
            hold.release(forward=True)
        try:
            await saving
            error = None
        except Exception as exc:
            error = exc
        if outcome == "claimed":
            assert error is not None, "gc claimed the save, yet it committed"
            assert_claimed_by_gc(error)
            assert len(report.abandoned) == 1 and report.completed_epochs == []
        else:
            assert error is None, repr(error)
            assert report.completed_epochs == [2] and report.abandoned == []
        assert await collector.gc(grace_period=0) is not None  # a second pass finds everything consistent
    committed = await check_every_committed_epoch_loads(url, s3_options)
    assert committed == ([1] if outcome == "claimed" else [1, 2])


# pause point: (which request of gc is held, while the save runs to its end)
GC_PAUSES: dict[str, Callable[[Request], bool]] = {
    "its claim": _gc_claim,  # gc listed before the commit and claims after it
    "its delete": _gc_delete,  # gc won its claim and deletes while the save tries to commit
}


@pytest.mark.parametrize("pause", list(GC_PAUSES))
async def test_a_save_while_gc_is_paused_at_each_step(
    pause: str, proxy: FaultProxy, s3_endpoint: str, s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    """The save of epoch 2 is held at its commit decision (its own proxy); gc runs (through
    another proxy) until it is held at one request of its own; the save goes on to its
    end; then gc goes on. Exactly one of them wins the writer's decision, and a committed
    epoch never loses an object."""
    url = f"s3://{s3_bucket}/paused-gc"
    save_hold, gc_hold = Hold(timeout=WAIT), Hold(timeout=WAIT)
    gc_proxy = FaultProxy(s3_endpoint).start()
    try:
        async with (
            MultiNodeCheckpointManager(url, storage_options={**s3_options, "endpoint_url": proxy.url}) as saver,
            MultiNodeCheckpointManager(url, storage_options={**s3_options, "endpoint_url": gc_proxy.url}) as collector,
        ):
            await saver.init({node: {} for node in NODES})
            fill(saver, 1)
            await saver.save(1)
            fill(saver, 2)
            proxy.add_rule(_put(".decision"), save_hold, times=1)
            gc_proxy.add_rule(GC_PAUSES[pause], gc_hold, times=1)
            saving = asyncio.create_task(saver.save(2))
            collecting: asyncio.Task[Any] | None = None
            try:
                assert await asyncio.to_thread(save_hold.arrived.wait, WAIT), "the save never reached its decision"
                collecting = asyncio.create_task(collector.gc(grace_period=0))  # lists shards and index, no verdict
                assert await asyncio.to_thread(gc_hold.arrived.wait, WAIT), f"gc never reached {pause}"
                save_hold.release(forward=True)  # the save decides and publishes while gc is held
                try:
                    await saving
                    error = None
                except Exception as exc:
                    error = exc
            finally:
                save_hold.release(forward=True)
                gc_hold.release(forward=True)
            assert collecting is not None
            report = await collecting
    finally:
        gc_proxy.stop()
    assert not gc_proxy.errors, gc_proxy.errors
    if pause == "its claim":  # the save decided first: gc finds the commit and keeps every object of it
        assert error is None, repr(error)
        assert report.abandoned == [] and report.deleted == []
        expected = [1, 2]
    else:  # gc claimed first: the save says so, and nothing of it is committed
        assert error is not None
        assert_claimed_by_gc(error)
        assert len(report.abandoned) == 1
        expected = [1]
    assert await check_every_committed_epoch_loads(url, s3_options) == expected


# --------------------------------------------------------------------------- gc in a loop beside saves


@pytest.mark.parametrize("location_kind", ["memory", "file", "s3"])
async def test_gc_in_a_loop_beside_saves_never_breaks_a_committed_epoch(location: Any) -> None:
    """gc with no grace period runs back to back while 12 epochs are saved: whatever it
    claims fails clearly, every save that returned loads bit-exact, and so does every
    epoch that is committed at the end."""
    epochs = range(1, 13)
    saved: list[int] = []
    claimed: list[int] = []
    done = asyncio.Event()
    passes = 0
    config = TransferConfig(part_size=5 * MiB)

    async def save_all(mgr: MultiNodeCheckpointManager) -> None:
        try:
            for epoch in epochs:
                fill(mgr, epoch)
                try:
                    await mgr.save(epoch)
                    saved.append(epoch)
                except CheckpointConflictError as exc:
                    assert_claimed_by_gc(exc)
                    claimed.append(epoch)
        finally:
            done.set()

    async def collect(mgr: MultiNodeCheckpointManager) -> None:
        nonlocal passes
        while not done.is_set() and passes < 500:
            await mgr.gc(grace_period=0)
            passes += 1

    async with (
        MultiNodeCheckpointManager(location.url, storage_options=location.options, config=config) as saver,
        MultiNodeCheckpointManager(location.url, storage_options=location.options) as collector,
    ):
        await saver.init({node: {} for node in NODES})
        async with asyncio.TaskGroup() as tg:
            tg.create_task(save_all(saver))
            tg.create_task(collect(collector))
        await collector.gc(grace_period=0)
    assert passes > 0 and sorted(saved + claimed) == list(epochs)
    committed = await check_every_committed_epoch_loads(location.url, location.options)
    assert set(saved) <= set(committed), (saved, committed)
    assert not set(committed) & set(claimed), (committed, claimed)
