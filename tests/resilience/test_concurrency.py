"""Concurrent and cancelled saves and loads.

* Two jobs (separate managers, same location) racing to save the same epoch: exactly one
  commits, the other gets ``CheckpointConflictError``, and the committed epoch is wholly
  the winner's.
* A zombie writer whose save runs after its replacement committed the epoch: it gets
  ``CheckpointConflictError`` and can never overwrite the committed shards.
* ``save`` and ``load`` cancelled after k event-loop iterations, for a sweep of k: the
  ``CancelledError`` propagates, nothing is half-committed, no multipart upload stays
  open, workspaces are untouched, and the same manager keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aioboto3
import numpy as np
import pytest
from aiobotocore.config import AioConfig

from asyncckpt import MultiNodeCheckpointManager, TransferConfig
from asyncckpt.errors import CheckpointConflictError
from asyncckpt.layout import decision_key, epoch_dir, manifest_key
from asyncckpt.storage import storage_for
from tests.support.asserts import assert_same

MiB = 1 << 20
NODES = ("worker-0", "worker-1", "worker-2")


# --------------------------------------------------------------------------- helpers


def job_values(job: str, epoch: int) -> dict[str, dict[str, Any]]:
    """Small per-node state whose every value says which job (and epoch) wrote it."""
    mark = {"A": 1, "B": 2}.get(job, 3)
    return {
        node: {
            "writer": job,
            "epoch": epoch,
            "weights": np.full(256, mark * 1000 + epoch * 10 + i, dtype=np.float64),
            "blob": f"{job}:{node}:{epoch}".encode() * 10,
        }
        for i, node in enumerate(NODES)
    }


def manager(location: Any, **kwargs: Any) -> MultiNodeCheckpointManager:
    return MultiNodeCheckpointManager(location.url, storage_options=location.options, **kwargs)


async def load_fresh(location: Any, epoch: int) -> dict[str, dict[str, Any]]:
    """What a third job (a new manager) loads from ``epoch``."""
    workspaces: dict[str, dict[str, Any]] = {node: {} for node in NODES}
    async with manager(location) as reader:
        await reader.init(workspaces)
        await reader.load(epoch)
    return workspaces


async def try_save(mgr: MultiNodeCheckpointManager, epoch: int) -> BaseException | None:
    try:
        await mgr.save(epoch)
    except Exception as exc:
        return exc
    return None


async def stored_keys(location: Any, prefix: str) -> list[str]:
    async with storage_for(location.url, options=location.options) as raw:
        return [info.key async for info in raw.list(prefix)]


# --------------------------------------------------------------------------- races


async def test_two_jobs_saving_the_same_epoch_exactly_one_commits(location: Any) -> None:
    reader_ws: dict[str, dict[str, Any]] = {node: {} for node in NODES}
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(manager(location, run_id="jobA"))
        b = await stack.enter_async_context(manager(location, run_id="jobB"))
        reader = await stack.enter_async_context(manager(location, run_id="reader"))
        raw = await stack.enter_async_context(storage_for(location.url, options=location.options))
        await a.init({node: {} for node in NODES})
        await b.init({node: {} for node in NODES})
        await reader.init(reader_ws)
        for epoch in range(4):
            values = {"A": job_values("A", epoch), "B": job_values("B", epoch)}
            for job, mgr in (("A", a), ("B", b)):
                for node, blobs in values[job].items():
                    mgr.workspace(node).clear()
                    mgr.workspace(node).update(blobs)
            async with asyncio.TaskGroup() as tg:  # both started in the same loop iteration
                task_a = tg.create_task(try_save(a, epoch))
                task_b = tg.create_task(try_save(b, epoch))
            outcome = {"A": task_a.result(), "B": task_b.result()}
            winners = [job for job, exc in outcome.items() if exc is None]
            assert len(winners) == 1, f"epoch {epoch}: expected exactly one winner, got {outcome}"
            (winner,) = winners
            (loser,) = set(outcome) - {winner}
            assert isinstance(outcome[loser], CheckpointConflictError), f"epoch {epoch}: loser got {outcome[loser]!r}"

            for ws in reader_ws.values():
                ws.clear()
            await reader.load(epoch)
            assert {ws["writer"] for ws in reader_ws.values()} == {winner}, f"epoch {epoch}: mixed writers"
            for node in NODES:
                assert_same(reader_ws[node], values[winner][node], f"epoch {epoch} {node}")
            assert await a.cp_accessible(epoch) and await b.cp_accessible(epoch)

            # the manifest is the winner's, and the loser's attempt left nothing behind
            body = json.loads(await raw.get(manifest_key(epoch)))
            assert body["writer_id"].startswith(f"job{winner}.")
            index = json.loads(await raw.get(body["index"]["key"]))
            named = {manifest_key(epoch), body["index"]["key"], decision_key(epoch, body["writer_id"])}
            named |= {r["shard"] for r in index["nodes"].values()}
            assert {info.key async for info in raw.list(epoch_dir(epoch))} == named


async def test_zombie_writer_that_saves_after_the_commit_gets_a_conflict(location: Any) -> None:
    """Job B (the replacement) commits epoch 5; job A (the zombie) then saves epoch 5."""
    async with manager(location, run_id="zombie") as a, manager(location, run_id="replacement") as b:
        await a.init(job_values("A", 5))
        await b.init(job_values("B", 5))
        await b.save(5)
        with pytest.raises(CheckpointConflictError):
            await a.save(5)
        loaded = await load_fresh(location, 5)
        for node in NODES:
            assert_same(loaded[node], job_values("B", 5)[node], node)
        # the keys A would write can never be B's
        for node in NODES:
            a_key, b_key = a.get_ckpt_db_name(node, 5), b.get_ckpt_db_name(node, 5)
            assert a_key is not None and b_key is not None and a_key != b_key


class PausingManager(MultiNodeCheckpointManager):
    """A manager whose commit waits for a signal: its shards are uploaded, its manifest not yet."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at_commit = asyncio.Event()
        self.go = asyncio.Event()

    async def write_checkpoint_metadata(self, epoch: int) -> None:
        self.at_commit.set()
        await self.go.wait()
        await super().write_checkpoint_metadata(epoch)


async def test_zombie_writer_paused_before_its_commit_loses_and_overwrites_nothing(location: Any) -> None:
    """A uploads its shards, stalls; B saves and commits the same epoch; A resumes and loses."""
    a = PausingManager(location.url, storage_options=location.options, run_id="zombie")
    async with a, manager(location, run_id="replacement") as b:
        await a.init(job_values("A", 5))
        await b.init(job_values("B", 5))
        zombie = asyncio.create_task(try_save(a, 5))
        await a.at_commit.wait()
        a_objects = set(await stored_keys(location, epoch_dir(5)))
        assert a_objects and all("/zombie." in key for key in a_objects), a_objects

        await b.save(5)
        b_shards = {node: b.get_ckpt_db_name(node, 5) for node in NODES}
        async with storage_for(location.url, options=location.options) as raw:
            a_shard_urls = {raw.url_of(k) for k in a_objects if k.endswith(".shard")}
        assert len(a_shard_urls) == len(NODES)
        assert not a_shard_urls & set(b_shards.values()), "the zombie's shard keys collide with the committed ones"

        a.go.set()
        outcome = await zombie
        assert isinstance(outcome, CheckpointConflictError), repr(outcome)
        loaded = await load_fresh(location, 5)
        for node in NODES:
            assert_same(loaded[node], job_values("B", 5)[node], node)
        assert await b.get_resume_from_epoch_id() == 5
        assert await a.cp_accessible(5)


async def test_every_save_attempt_writes_new_shard_keys(location: Any) -> None:
    """Keys carry the run id and a fresh attempt token: even two managers with the same
    run id (processes of one job, or a restart that reuses it) never share a shard key."""
    async with manager(location, run_id="samejob") as a, manager(location, run_id="samejob") as b:
        await a.init(job_values("A", 3))
        await b.init(job_values("B", 3))
        keys_a = {a.get_ckpt_db_name(node, 3) for node in NODES}
        keys_b = {b.get_ckpt_db_name(node, 3) for node in NODES}
        assert len(keys_a) == len(keys_b) == len(NODES)
        assert not keys_a & keys_b
        assert all("/samejob." in str(key) for key in keys_a | keys_b)
        # a failed attempt (conflict) does not reuse its keys for the next epoch's attempt either
        await a.save(3)
        with pytest.raises(CheckpointConflictError):
            await a.save(3)
        committed = {a.get_ckpt_db_name(node, 3) for node in NODES}
        await a.save(4)
        assert not committed & {a.get_ckpt_db_name(node, 4) for node in NODES}


# --------------------------------------------------------------------------- cancellation

CANCEL_CONFIG = TransferConfig(part_size=5 * MiB, range_size=5 * MiB)
# no retries: moto on loopback does not fail by itself, and an error should surface at once
NO_RETRY_CONFIG = TransferConfig(part_size=5 * MiB, range_size=5 * MiB, max_attempts=1)


def big_state(tag: int) -> dict[str, dict[str, Any]]:
    """One ~22 MiB node (past one PUT's 4 parts: four multipart parts / parallel ranges on
    S3) and two small ones."""
    return {
        "big": {
            "embedding": np.arange(11 * MiB // 2, dtype=np.float32) + tag,  # 22 MiB
            "step": tag,
        },
        "small-0": {"w": np.full(100, tag, dtype=np.int32), "name": f"small-0@{tag}"},
        "small-1": {"w": np.full(50, -tag, dtype=np.int64), "meta": {"tag": tag, "tags": [tag] * 3}},
    }


def fibonacci() -> Iterator[int]:
    """0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, ..."""
    yield 0
    a, b = 1, 2
    while True:
        yield a
        a, b = b, a + b


NODES_OF_BIG = tuple(big_state(0))


@contextlib.asynccontextmanager
async def s3_admin(location: Any) -> AsyncIterator[tuple[Any, str, str]]:
    """An aioboto3 client straight on the test endpoint, the bucket and the key prefix."""
    parts = urlsplit(location.url)
    config = AioConfig(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2})
    session = aioboto3.Session()
    async with session.client(
        "s3", endpoint_url=location.options["endpoint_url"], region_name=location.options["region_name"], config=config
    ) as client:
        yield client, parts.netloc, parts.path.strip("/") + "/"


async def open_uploads(location: Any, admin: Any) -> list[str]:
    if admin is None:
        return []
    client, bucket, prefix = admin
    response = await client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [u["Key"] for u in response.get("Uploads", [])]


def budget_in_use(mgr: MultiNodeCheckpointManager) -> int:
    """Bytes the manager's upload budget still counts as held (a leak if not 0 when idle)."""
    budget = getattr(mgr, "_budget", None)
    return 0 if budget is None else budget.in_use


def temp_files_left(location: Any) -> list[str]:
    """Temporary files of unfinished local writes (listings and gc never see them)."""
    if location.kind != "file":
        return []
    root = Path(unquote(urlsplit(location.url).path))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.asyncckpt-tmp")) if root.exists() else []


def collect_leaks() -> None:
    """Finalize what leaked now, so that a leaked file or socket (a ResourceWarning, an
    error here) is reported by the test that leaked it."""
    gc.collect()


async def run_and_cancel(aw: Any, k: int) -> asyncio.Task[Any]:
    """Start ``aw`` as a task; after ``k`` event-loop iterations cancel it unless it is done."""
    task = asyncio.ensure_future(aw)
    for _ in range(k):
        await asyncio.sleep(0)
        if task.done():
            break
    if not task.done():
        task.cancel()
    return task


@contextlib.asynccontextmanager
async def maybe_s3_admin(location: Any) -> AsyncIterator[Any]:
    if location.kind == "s3":
        async with s3_admin(location) as admin:
            yield admin
    else:
        yield None


async def test_large_multipart_save_and_load_round_trip(location: Any) -> None:
    """The precondition of the cancellation tests, without cancellation: the ~22 MiB node
    goes up as a multipart upload (four parts) and comes back in parallel ranges, with
    no warning (warnings are errors here)."""
    async with maybe_s3_admin(location) as admin, manager(location, config=NO_RETRY_CONFIG) as mgr:
        await mgr.init(big_state(3))
        await mgr.save(0)
        for node in NODES_OF_BIG:
            mgr.workspace(node).clear()
        await mgr.load(0)
        for node, blobs in big_state(3).items():
            assert_same(dict(mgr.workspace(node)), blobs, node)
        assert await open_uploads(location, admin) == []


# aiohttp warns about every request body above 1 MiB given as bytes (see the test above);
# the cancellation tests are about cancellation, so they do not fail on that warning.
async def test_cancelled_save_commits_nothing_and_the_manager_keeps_working(location: Any) -> None:
    async with maybe_s3_admin(location) as admin, manager(location, config=CANCEL_CONFIG) as mgr:
        await mgr.init(big_state(0))
        await mgr.save(0)
        baseline_tasks = len(asyncio.all_tasks())
        for node, blobs in big_state(1).items():
            mgr.workspace(node).update(blobs)
        epoch = 1
        cancelled = 0
        completed = False
        problems: list[str] = []
        committed_by_cancelled: list[int] = []
        reported: set[tuple[str, Any]] = set()
        for k in fibonacci():
            task = await run_and_cancel(mgr.save(epoch), k)
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    problems.append(f"k={k}: CancelledError was raised but the task is not cancelled")
                cancelled += 1
            else:
                completed = True
            accessible = await mgr.cp_accessible(epoch)
            resume = await mgr.get_resume_from_epoch_id()
            if completed:
                assert accessible and resume == epoch, (
                    f"k={k}: completed save, but cp_accessible={accessible} resume={resume}"
                )
                break
            if accessible and resume == epoch:
                # The cancel landed while the manifest PUT was on its way: the server may
                # commit it anyway, and the library can not take that back. Accepted only
                # if the epoch is whole (it loads below); the sweep goes on with a new epoch.
                committed_by_cancelled.append(epoch)
                epoch += 1
            elif accessible or resume != epoch - 1:
                problems.append(f"k={k}: half committed after the cancel: cp_accessible={accessible}, resume={resume}")
                break
            # leaks, each reported once (by the first k that shows it)
            leaks = {
                "multipart upload left open": await open_uploads(location, admin),
                "bytes of upload budget still held": [budget_in_use(mgr)] if budget_in_use(mgr) else [],
                "temporary file left": temp_files_left(location),
                "stray tasks left running": [len(asyncio.all_tasks()) - baseline_tasks]
                if len(asyncio.all_tasks()) != baseline_tasks
                else [],
            }
            for what, items in leaks.items():
                new = [item for item in items if (what, item) not in reported]
                reported.update((what, item) for item in new)
                if new:
                    problems.append(f"k={k}: {what}: {new}")
            if len(problems) > 5:
                break
            assert k < 100_000, "save never completed"
        collect_leaks()
        if problems:
            raise AssertionError("after cancelled saves:\n" + "\n".join(problems))
        assert cancelled >= 3, f"only {cancelled} cancellation(s) landed before the save completed"
        # the same manager loads what it saved after all those cancellations
        for e in [*committed_by_cancelled, epoch]:
            for node in NODES_OF_BIG:
                mgr.workspace(node).clear()
            await mgr.load(e)
            for node, blobs in big_state(1).items():
                assert_same(dict(mgr.workspace(node)), blobs, f"epoch {e} {node}")
        assert await open_uploads(location, admin) == []


async def test_cancelled_load_changes_no_workspace_and_the_manager_keeps_working(location: Any) -> None:
    async with manager(location, config=CANCEL_CONFIG) as mgr:
        await mgr.init(big_state(0))
        await mgr.save(0)
        for node, blobs in big_state(5).items():
            mgr.workspace(node).update(blobs)
            mgr.workspace(node)["local"] = [node]
        before = {node: copy.deepcopy(dict(mgr.workspace(node))) for node in NODES_OF_BIG}
        before_ids = {node: {k: id(v) for k, v in mgr.workspace(node).items()} for node in NODES_OF_BIG}
        baseline_tasks = len(asyncio.all_tasks())
        cancelled = 0
        for k in fibonacci():
            task = await run_and_cancel(mgr.load(0), k)
            try:
                await task
            except asyncio.CancelledError:
                cancelled += 1
            else:
                break
            for node in NODES_OF_BIG:
                ws = mgr.workspace(node)
                assert {key: id(v) for key, v in ws.items()} == before_ids[node], f"k={k}: {node}'s entries replaced"
                assert_same(dict(ws), before[node], f"k={k} {node}")
            assert len(asyncio.all_tasks()) == baseline_tasks, f"k={k}: stray tasks left running"
            assert k < 100_000, "load never completed"
        collect_leaks()
        assert cancelled >= 3, f"only {cancelled} cancellation(s) landed before the load completed"
        # the load that completed restored epoch 0 and left other entries alone
        for node, blobs in big_state(0).items():
            ws = mgr.workspace(node)
            assert_same({key: ws[key] for key in blobs}, blobs, node)
            assert ws["local"] == [node]
        # and the same manager saves and loads again
        for node, blobs in big_state(9).items():
            mgr.workspace(node).update(blobs)
        await mgr.save(1)
        for node in NODES_OF_BIG:
            mgr.workspace(node).clear()
        await mgr.load(1)
        for node, blobs in big_state(9).items():
            assert_same({key: mgr.workspace(node)[key] for key in blobs}, blobs, node)
