"""Metrics, retention, delete_epoch and prune, on memory, a directory and S3.

Deleting an epoch removes its commit record first (the epoch stops existing at once),
then its objects; it never touches another epoch. A delete paused at every step beside
loads and saves (a holding proxy in front of S3): nothing loads mixed data, and every
other committed epoch stays intact.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from asyncckpt import (
    CheckpointNotFoundError,
    MultiNodeCheckpointManager,
    Retention,
)
from asyncckpt import (
    storage as storage_api,
)
from tests.support.asserts import assert_same
from tests.support.faultproxy import FaultProxy, Hold, Request

NODES = ("trainer_0", "trainer_1")
WAIT = 30.0


def state(epoch: int) -> dict[str, dict[str, Any]]:
    return {node: {"w": np.full(512, epoch * 10 + i, dtype=np.float64), "epoch": epoch} for i, node in enumerate(NODES)}


def fill(mgr: MultiNodeCheckpointManager, epoch: int) -> None:
    for node, blobs in state(epoch).items():
        mgr.workspace(node).clear()
        mgr.workspace(node).update(blobs)


def manager(location: Any, **kwargs: Any) -> MultiNodeCheckpointManager:
    return MultiNodeCheckpointManager(location.url, storage_options=location.options, **kwargs)


async def keys_of(location: Any) -> set[str]:
    async with storage_api.storage_for(location.url, options=location.options) as raw:
        return {info.key async for info in raw.list("")}


async def check_epochs_load(location: Any, epochs: list[int]) -> None:
    async with manager(location) as mgr:
        await mgr.init({node: {} for node in NODES})
        assert await mgr.committed_epochs() == epochs
        for epoch in epochs:
            await mgr.load(epoch)
            for node, blobs in state(epoch).items():
                assert_same(dict(mgr.workspace(node)), blobs, f"epoch {epoch} {node}")


# --------------------------------------------------------------------------- metrics


async def test_metrics_are_kept_in_the_manifest(location: Any) -> None:
    async with manager(location) as mgr:
        await mgr.init(state(1))
        await mgr.save(1, metrics={"loss": 0.31, "step": 100})
        await mgr.save(2)
        handle = await mgr.save_async(3, metrics={"loss": 0.25})
        await handle
        manifests = {m.epoch: m for m in await mgr.committed_manifests()}
    assert manifests[1].metrics == {"loss": 0.31, "step": 100.0}
    assert manifests[2].metrics == {}
    assert manifests[3].metrics == {"loss": 0.25}


@pytest.mark.parametrize(
    ("metrics", "error"),
    [({"loss": float("nan")}, ValueError), ({"loss": "low"}, TypeError), ({"": 1.0}, TypeError), ([1.0], TypeError)],
)
async def test_bad_metrics_are_refused_before_anything_is_written(location: Any, metrics: Any, error: type) -> None:
    async with manager(location) as mgr:
        await mgr.init(state(1))
        with pytest.raises(error):
            await mgr.save(1, metrics=metrics)
        with pytest.raises(error):
            await mgr.save_async(1, metrics=metrics)
    assert await keys_of(location) == set()


# --------------------------------------------------------------------------- retention


RULES = {
    "keep_last": (Retention(keep_last=2), [5, 6]),
    "keep_every": (Retention(keep_every=3), [0, 3, 6]),
    "keep_best_min": (Retention(keep_best=2, metric="loss", mode="min"), [2, 4, 6]),
    "keep_best_max": (Retention(keep_best=2, metric="loss", mode="max"), [1, 3, 6]),
    "union": (Retention(keep_last=1, keep_every=5, keep_best=1, metric="loss"), [0, 4, 5, 6]),
}
LOSSES = {0: 0.5, 1: 0.9, 2: 0.1, 3: 0.8, 4: 0.05, 5: None, 6: None}  # epochs 5 and 6 report no loss


@pytest.mark.parametrize("mode", ["save", "save_async"])
@pytest.mark.parametrize("rule", list(RULES))
async def test_retention_after_each_save_keeps_what_its_rules_keep(location: Any, rule: str, mode: str) -> None:
    retention, expected = RULES[rule]
    async with manager(location, retention=retention) as mgr:
        await mgr.init({node: {} for node in NODES})
        for epoch, loss in LOSSES.items():
            fill(mgr, epoch)
            metrics = {} if loss is None else {"loss": loss}
            if mode == "save":
                await mgr.save(epoch, metrics=metrics)
            else:
                await (await mgr.save_async(epoch, metrics=metrics))
            assert epoch in await mgr.committed_epochs()  # the latest is always kept
    await check_epochs_load(location, expected)
    left = await keys_of(location)  # nothing of a deleted epoch stays behind
    assert {k.split("/")[1] for k in left} == {f"{e:012d}" for e in expected}


async def test_prune_applies_rules_once_and_a_dry_run_deletes_nothing(location: Any) -> None:
    async with manager(location) as mgr:
        await mgr.init({node: {} for node in NODES})
        for epoch in range(5):
            fill(mgr, epoch)
            await mgr.save(epoch)
        with pytest.raises(ValueError):
            await mgr.prune()  # no rules given, none configured
        assert await mgr.prune(Retention(keep_last=2), dry_run=True) == [0, 1, 2]
        assert await mgr.committed_epochs() == [0, 1, 2, 3, 4]
        assert await mgr.prune(Retention(keep_last=2)) == [0, 1, 2]
        assert await mgr.prune(Retention(keep_last=2)) == []
    await check_epochs_load(location, [3, 4])


# --------------------------------------------------------------------------- delete_epoch


async def test_delete_epoch_removes_it_and_nothing_else(location: Any) -> None:
    async with manager(location) as mgr:
        await mgr.init({node: {} for node in NODES})
        for epoch in (1, 2, 3):
            fill(mgr, epoch)
            await mgr.save(epoch)
        before = await keys_of(location)
        await mgr.delete_epoch(2)
        assert await mgr.committed_epochs() == [1, 3]
        with pytest.raises(CheckpointNotFoundError):
            await mgr.delete_epoch(2)
        with pytest.raises(CheckpointNotFoundError):
            await mgr.load(2)
        assert mgr.get_ckpt_db_name("trainer_0", 2) is not None  # a name for a new save of epoch 2
        fill(mgr, 2)
        await mgr.save(2)  # the epoch can be saved again
    after = await keys_of(location)
    assert {k for k in before if "/000000000002/" not in k} <= after  # the other epochs untouched
    await check_epochs_load(location, [1, 2, 3])


async def test_a_crash_after_the_commit_record_went_leaves_only_what_gc_removes(location: Any) -> None:
    async with manager(location) as mgr:
        await mgr.init({node: {} for node in NODES})
        for epoch in (1, 2):
            fill(mgr, epoch)
            await mgr.save(epoch)
    async with storage_api.storage_for(location.url, options=location.options) as raw:
        # delete_epoch's first two steps, as a process that died after them leaves it
        (decision,) = [i.key async for i in raw.list("epochs/000000000001/") if i.key.endswith(".decision")]
        await raw.delete([decision])
        await raw.delete(["epochs/000000000001/manifest.json"])
    async with manager(location) as mgr:
        await mgr.init({node: {} for node in NODES})
        assert await mgr.committed_epochs() == [2]
        report = await mgr.gc(grace_period=0)
        assert len(report.abandoned) == 1 and report.completed_epochs == []  # never resurrected
    left = await keys_of(location)
    assert [k for k in left if "/000000000001/" in k and not k.endswith(".decision")] == []
    await check_epochs_load(location, [2])


# --------------------------------------------------------------------------- delete paused at every step


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_endpoint).start()
    try:
        yield proxy
    finally:
        proxy.stop()
    assert not proxy.errors, f"fault proxy failed internally: {proxy.errors!r}"


def _delete_of(what: Callable[[str], bool]) -> Callable[[Request], bool]:
    """A DeleteObjects request (its keys are in the body, so: the n-th delete)."""
    return lambda r: r.method == "POST" and "delete" in r.query and what(r.path)


# delete_epoch makes three DeleteObjects calls: the decision, the manifest, the rest
DELETE_STEPS = ["the decision", "the manifest", "the shards and the index"]


@pytest.mark.parametrize("step", range(len(DELETE_STEPS)), ids=DELETE_STEPS)
async def test_a_delete_paused_at_each_step_beside_loads_and_saves(
    step: int, proxy: FaultProxy, s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    """While the delete of epoch 2 is held at one step: loads of epoch 2 get its exact
    data or CheckpointNotFoundError, epochs 1 and 3 load, and a save of epoch 4 commits."""
    url = f"s3://{s3_bucket}/paused-delete"
    location = type("Location", (), {"url": url, "options": s3_options})()
    hold = Hold(timeout=WAIT)
    calls = {"n": 0}

    def nth_delete(_: str) -> bool:
        calls["n"] += 1
        return calls["n"] == step + 1

    async with (
        MultiNodeCheckpointManager(url, storage_options={**s3_options, "endpoint_url": proxy.url}) as deleter,
        MultiNodeCheckpointManager(url, storage_options=s3_options) as other,
    ):
        await other.init({node: {} for node in NODES})
        for epoch in (1, 2, 3):
            fill(other, epoch)
            await other.save(epoch)
        proxy.add_rule(_delete_of(nth_delete), hold, times=1)
        deleting = asyncio.create_task(deleter.delete_epoch(2))
        try:
            assert await asyncio.to_thread(hold.arrived.wait, WAIT), f"the delete never reached {DELETE_STEPS[step]}"
            for _ in range(2):
                try:
                    await other.load(2)
                except CheckpointNotFoundError:
                    assert step >= 1, "epoch 2 vanished before its commit record went"
                else:
                    for node, blobs in state(2).items():
                        assert_same(dict(other.workspace(node)), blobs, f"epoch 2 {node} during the delete")
                session: dict[str, Any] = {}
                if await other.load_blobs_locally(list(NODES), ["trainer_1/w"], 2, session):
                    assert_same(session, {"trainer_1/w": state(2)["trainer_1"]["w"]})
            fill(other, 4)
            await other.save(4)
            for epoch in (1, 3, 4):
                await other.load(epoch)
                for node, blobs in state(epoch).items():
                    assert_same(dict(other.workspace(node)), blobs, f"epoch {epoch} {node}")
        finally:
            hold.release(forward=True)
        await deleting
    await check_epochs_load(location, [1, 3, 4])
    assert not [k for k in await keys_of(location) if "/000000000002/" in k]


# --------------------------------------------------------------------------- progress


@pytest.mark.parametrize("how", ["save", "save_async", "load"])
async def test_progress_is_reported_from_the_loop_up_to_the_total(location: Any, how: str) -> None:
    calls: list[tuple[int, int]] = []
    loop_thread = threading.get_ident()

    def progress(done: int, total: int) -> None:
        assert threading.get_ident() == loop_thread, "progress must be called from the event loop"
        calls.append((done, total))

    big = {node: {"w": np.arange(300_000, dtype=np.float64) + i} for i, node in enumerate(NODES)}  # 2.4 MB each
    async with manager(location) as mgr:
        await mgr.init(big)
        if how == "save":
            await mgr.save(1, progress=progress)
        elif how == "save_async":
            await (await mgr.save_async(1, progress=progress))
        else:
            await mgr.save(1)
            await mgr.load(1, progress=progress)
        shard_bytes = (await mgr.report_checkpoint_stats("checkpoint_save"))["bytes"]
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1]
    totals = {total for _, total in calls}
    assert len(totals) == 1 and totals.pop() >= shard_bytes
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


async def test_a_progress_that_is_not_callable_is_refused_before_anything_is_written(location: Any) -> None:
    async with manager(location) as mgr:
        await mgr.init(state(1))
        with pytest.raises(TypeError, match="progress"):
            await mgr.save(1, progress=42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="progress"):
            await mgr.save_async(1, progress="bar")  # type: ignore[arg-type]
    assert await keys_of(location) == set()
