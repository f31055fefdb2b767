"""``SyncCheckpointManager``: the async manager's methods, blocking, on a thread of its own;
its save handle; closing; refusal inside an event loop; and a plain loop that is SIGKILLed
at every epoch and resumes to the same end."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asyncckpt import (
    CheckpointConflictError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointStateError,
    GcReport,
    MultiNodeCheckpointManager,
    SyncCheckpointManager,
    TransferConfig,
)
from asyncckpt.sync import SyncSaveHandle
from tests.support.crash_child import assert_state_equal
from tests.support.faultproxy import FaultProxy, Hold, Request, Respond
from tests.support.runner_child import assert_same_as_uninterrupted, run_child, run_example, run_readme_snippet

WAIT = 30.0
THREAD_NAME = "asyncckpt-sync-manager"


def facade_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def sync_manager(location: Any, **kwargs: Any) -> SyncCheckpointManager:
    return SyncCheckpointManager(location.url, storage_options=location.options, **kwargs)


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_endpoint) as proxy:
        yield proxy
    assert not proxy.errors, f"fault proxy failed internally: {proxy.errors!r}"


def manifest_put(epoch: int) -> Callable[[Request], bool]:
    return lambda r: r.method == "PUT" and r.path.endswith(f"/epochs/{epoch:012d}/manifest.json")


# ---------------------------------------------------------------------------- the surface


def public_members(cls: type) -> dict[str, Any]:
    """The public members a class defines or inherits (from asyncckpt's own classes)."""
    members: dict[str, Any] = {}
    for klass in reversed(cls.__mro__[:-1]):
        members.update(vars(klass))
    return {name: member for name, member in members.items() if not name.startswith("_")}


def test_every_coroutine_method_has_a_blocking_twin_with_the_same_arguments() -> None:
    async_members = public_members(MultiNodeCheckpointManager)
    assert async_members, "nothing to compare"
    for name, member in async_members.items():
        twin = getattr(SyncCheckpointManager, name)
        if isinstance(member, property):
            assert isinstance(twin, property), name
            continue
        assert not inspect.iscoroutinefunction(twin), name
        async_parameters = list(inspect.signature(member).parameters.values())
        assert list(inspect.signature(twin).parameters.values()) == async_parameters, name
    assert inspect.signature(SyncCheckpointManager) == inspect.signature(MultiNodeCheckpointManager)
    assert inspect.signature(SyncCheckpointManager.save_async).return_annotation == "SyncSaveHandle"


def test_the_facade_adds_only_its_lifecycle_and_handle() -> None:
    extra = set(public_members(SyncCheckpointManager)) - set(public_members(MultiNodeCheckpointManager))
    assert extra == {"closed"}


# ---------------------------------------------------------------------------- round trip


def test_a_plain_loop_saves_loads_and_queries_like_the_async_manager(location: Any) -> None:
    workspaces: dict[str, dict[str, Any]] = {"trainer_0": {"w": np.arange(6.0)}, "ps_0": {"emb": np.ones((3, 2))}}
    with sync_manager(location) as mgr:
        assert mgr.nodes == [] and mgr.db_prefix == location.url
        assert mgr.cp_accessible() is True
        mgr.init(workspaces)
        assert mgr.nodes == ["trainer_0", "ps_0"] and mgr.local_nodes == ["trainer_0", "ps_0"]
        assert mgr.get_resume_from_epoch_id() is None
        calls: list[tuple[int, int, str]] = []
        mgr.save(0, progress=lambda done, total: calls.append((done, total, threading.current_thread().name)))
        assert calls and calls[-1][0] == calls[-1][1] > 0  # a progress callback runs on the facade's thread
        assert {name for _, _, name in calls} == {THREAD_NAME}
        for epoch in (1, 2):
            workspaces["trainer_0"]["w"] += 1  # in place, right after save_async returned
            handle = mgr.save_async(epoch)
            workspaces["trainer_0"]["w"] *= 10  # the snapshot is already taken
            assert isinstance(handle, SyncSaveHandle) and handle.epoch == epoch
            assert handle.result(timeout=WAIT) is None and handle.done()
            workspaces["trainer_0"]["w"] /= 10
        assert mgr.committed_epochs() == [0, 1, 2]
        assert [m.epoch for m in mgr.committed_manifests()] == [0, 1, 2]
        assert mgr.get_resume_from_epoch_id() == 2 and mgr.cp_accessible(2) is True
        assert mgr.report_checkpoint_stats("checkpoint_save")["nodes"].keys() == {"trainer_0", "ps_0"}
        assert mgr.get_ckpt_db_name("trainer_0", 2).startswith(location.url)
        assert mgr.workspace("trainer_0") is workspaces["trainer_0"]
        mgr.write_checkpoint_metadata(2)  # committed here: a no-op

        mgr.load(1)
        assert np.array_equal(workspaces["trainer_0"]["w"], np.arange(6.0) + 1)
        session: dict[str, Any] = {}
        assert mgr.load_blobs_locally(["ps_0"], ["emb"], 2, session) is True
        assert_state_equal(session, {"emb": np.ones((3, 2))})
        assert mgr.load_blobs_locally(["ps_0"], ["emb"], 7, {}) is False
        assert isinstance(mgr.gc(dry_run=True), GcReport)
        mgr.set_params(["trainer_0", "ps_0"])
    assert mgr.closed and mgr.nodes == ["trainer_0", "ps_0"]  # properties outlive close


def test_exceptions_come_through_unchanged(location: Any) -> None:
    with sync_manager(location) as mgr:
        with pytest.raises(CheckpointStateError, match=r"init\(nodes\) must be called before save\(\)"):
            mgr.save(0)
        mgr.init({"n": {"x": 1}})
        mgr.save(0)
        with pytest.raises(CheckpointConflictError, match="epoch 0 is already committed"):
            mgr.save(0)
        with pytest.raises(CheckpointNotFoundError):
            mgr.load(5)
        with pytest.raises(ValueError):
            mgr.save(-1)
        with pytest.raises(TypeError):
            mgr.save(1, "unexpected")
        with pytest.raises(KeyError, match="unknown node"):
            mgr.workspace("nobody")
        mgr.workspace("n")["x"] = object()
        with pytest.raises(TypeError):
            mgr.save_async(1)
        mgr.workspace("n")["x"] = 2
        with pytest.raises(CheckpointConflictError):  # raised by the handle, as in the async manager
            mgr.save_async(0).result(WAIT)


def test_invalid_arguments_raise_and_leave_no_thread_behind() -> None:
    before = len(facade_threads())
    with pytest.raises(ValueError, match="unknown db_type"):
        SyncCheckpointManager("memory://sync-bad", db_type="pickle")
    with pytest.raises(TypeError, match="config must be a TransferConfig"):
        SyncCheckpointManager("memory://sync-bad", config={"part_size": 1})
    with pytest.raises(TypeError):
        SyncCheckpointManager()  # type: ignore[call-arg]
    assert len(facade_threads()) == before


# ---------------------------------------------------------------------------- threads and closing


def test_each_facade_runs_on_a_thread_of_its_own_until_closed() -> None:
    before = set(facade_threads())
    first = SyncCheckpointManager("memory://sync-threads-1")
    second = SyncCheckpointManager("memory://sync-threads-2")
    try:
        assert len(set(facade_threads()) - before) == 2
        first.init({"n": {"x": 1}})
        first.save(0)
    finally:
        first.close()
        first.close()  # a second close does nothing
    assert len(set(facade_threads()) - before) == 1
    second.close()
    assert set(facade_threads()) == before


def test_a_closed_facade_refuses_calls() -> None:
    mgr = SyncCheckpointManager("memory://sync-closed")
    mgr.init({"n": {"x": 1}})
    mgr.close()
    with pytest.raises(CheckpointStateError, match="closed"):
        mgr.save(0)
    with pytest.raises(CheckpointStateError, match="closed"):
        mgr.save_async(0)
    with pytest.raises(CheckpointStateError, match="closed"):
        mgr.__enter__()
    assert mgr.workspace("n") == {"x": 1}  # plain methods still answer
    assert "closed" in repr(mgr)


def test_close_waits_for_the_save_in_flight(proxy: FaultProxy, s3_bucket: str, s3_options: Any) -> None:
    hold = Hold(timeout=WAIT)
    proxy.add_rule(manifest_put(1), hold)
    url = f"s3://{s3_bucket}/close-waits"
    mgr = SyncCheckpointManager(url, storage_options={**s3_options, "endpoint_url": proxy.url})
    mgr.init({"n": {"x": np.arange(10)}})
    mgr.save(0)
    handle = mgr.save_async(1)
    assert hold.arrived.wait(WAIT)
    closing = threading.Thread(target=mgr.close)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive() and not handle.done()  # close() is waiting for the held commit
    hold.release(forward=True)
    closing.join(WAIT)
    assert not closing.is_alive() and handle.done()
    handle.result()  # committed; the facade is closed, the outcome is still known
    with SyncCheckpointManager(url, storage_options=s3_options) as fresh:
        assert fresh.committed_epochs() == [0, 1]


# ---------------------------------------------------------------------------- the handle


def test_result_with_a_timeout_leaves_the_save_running(proxy: FaultProxy, s3_bucket: str, s3_options: Any) -> None:
    hold = Hold(timeout=WAIT)
    proxy.add_rule(manifest_put(0), hold)
    with SyncCheckpointManager(f"s3://{s3_bucket}/t", storage_options={**s3_options, "endpoint_url": proxy.url}) as m:
        m.init({"n": {"x": np.arange(10)}})
        handle = m.save_async(0)
        assert hold.arrived.wait(WAIT)
        with pytest.raises(TimeoutError):
            handle.result(timeout=0.05)
        assert not handle.done()
        hold.release(forward=True)
        handle.result(timeout=WAIT)
        assert handle.done() and m.committed_epochs() == [0]
        assert "done" in repr(handle)


def test_a_cancelled_save_is_not_committed(proxy: FaultProxy, s3_bucket: str, s3_options: Any) -> None:
    hold = Hold(timeout=WAIT)
    proxy.add_rule(manifest_put(0), hold)
    with SyncCheckpointManager(f"s3://{s3_bucket}/c", storage_options={**s3_options, "endpoint_url": proxy.url}) as m:
        m.init({"n": {"x": np.arange(10)}})
        handle = m.save_async(0)
        assert hold.arrived.wait(WAIT)
        assert handle.cancel() is True
        with pytest.raises(concurrent.futures.CancelledError):
            handle.result(WAIT)
        assert handle.done() and handle.cancel() is False
        hold.release(forward=False)
        assert m.committed_epochs() == []
        m.save(1)
        assert m.committed_epochs() == [1]


def test_a_failed_save_nobody_asked_about_is_raised_by_close(
    proxy: FaultProxy, s3_bucket: str, s3_options: Any
) -> None:
    proxy.add_rule(lambda r: r.method == "PUT" and "/epochs/000000000001/" in r.path, Respond(500, "InternalError"))
    options = {**s3_options, "endpoint_url": proxy.url}
    mgr = SyncCheckpointManager(f"s3://{s3_bucket}/f", storage_options=options, config=TransferConfig(max_attempts=1))
    mgr.init({"n": {"x": np.arange(10)}})
    mgr.save(0)
    handle = mgr.save_async(1)
    with pytest.raises(CheckpointError) as raised:
        mgr.close()
    assert mgr.closed
    with pytest.raises(CheckpointError) as again:  # the handle still tells, after close
        handle.result()
    assert again.value is raised.value


def test_a_failed_save_nobody_asked_about_is_raised_by_the_next_save(
    proxy: FaultProxy, s3_bucket: str, s3_options: Any
) -> None:
    proxy.add_rule(lambda r: r.method == "PUT" and "/epochs/000000000001/" in r.path, Respond(500, "InternalError"))
    options = {**s3_options, "endpoint_url": proxy.url}
    with SyncCheckpointManager(
        f"s3://{s3_bucket}/n", storage_options=options, config=TransferConfig(max_attempts=1)
    ) as mgr:
        mgr.init({"n": {"x": np.arange(10)}})
        handle = mgr.save_async(1)
        with pytest.raises(CheckpointError) as raised:
            mgr.save(2)
        assert handle.done()
        mgr.save(2)
        with pytest.raises(CheckpointError) as again:
            handle.result()
        assert again.value is raised.value
        assert mgr.committed_epochs() == [2]


# ---------------------------------------------------------------------------- inside an event loop


async def test_blocking_calls_are_refused_inside_a_running_event_loop() -> None:
    with pytest.raises(CheckpointStateError, match="cannot be called from a thread that runs an event loop"):
        SyncCheckpointManager("memory://sync-in-loop")
    mgr = await asyncio.to_thread(SyncCheckpointManager, "memory://sync-in-loop")
    try:
        await asyncio.to_thread(mgr.init, {"n": {"x": 1}})
        for call in (lambda: mgr.save(0), lambda: mgr.committed_epochs(), mgr.close, mgr.__enter__):
            with pytest.raises(CheckpointStateError, match=r"in async code use MultiNodeCheckpointManager"):
                call()
        handle = await asyncio.to_thread(mgr.save_async, 0)
        with pytest.raises(CheckpointStateError, match=r"SyncSaveHandle.result\(\) blocks"):
            handle.result()
        assert mgr.workspace("n") == {"x": 1}  # plain methods are quick, and allowed
        await asyncio.to_thread(handle.result, WAIT)
    finally:
        await asyncio.to_thread(mgr.close)
    assert mgr.closed


def test_a_call_from_the_facades_own_loop_is_refused_not_deadlocked() -> None:
    """A metadata handler runs on the facade's loop; calling back into the facade would wait
    for that very loop."""
    answers: list[Any] = []

    class Handler:
        def set_params(self, **params: Any) -> None: ...

        def write(self, epoch: int) -> None:
            try:
                answers.append(mgr.committed_epochs())
            except CheckpointStateError as exc:
                answers.append(exc)

        def last_epoch(self, user_epoch: int | None = None) -> int | None:
            return user_epoch

        def cp_accessible(self, epoch: int | None = None) -> bool:
            return True

        def report(self, action_name: str, stats: dict[str, Any]) -> None: ...

    with SyncCheckpointManager("memory://sync-own-loop", metadata_handler=Handler()) as mgr:
        mgr.init({"n": {"x": 1}})
        mgr.save(0)
        assert mgr.nodes == ["n"]
    assert len(answers) == 1 and isinstance(answers[0], CheckpointStateError)


# ---------------------------------------------------------------------------- SIGKILL and resume


@pytest.mark.slow
@pytest.mark.parametrize("location_kind", ["file"])
@pytest.mark.parametrize(
    ("kill_after", "in_flight"), [(None, False), (0, False), (1, False), (2, False), (3, False), (2, True)]
)
def test_a_plain_loop_killed_after_any_epoch_resumes_to_the_state_of_an_uninterrupted_run(
    location: Any, kill_after: int | None, in_flight: bool
) -> None:
    """The synchronous loop commits epochs 0..kill_after and SIGKILLs itself (with
    ``in_flight``: as epoch kill_after's save is uploading); a new process resumes; every
    epoch and the final state equal an uninterrupted run's."""
    if kill_after is not None:
        run_child("sync", location, 3, kill_after=kill_after, in_flight=in_flight)
    lines = run_child("sync", location, 3)
    if not in_flight:
        assert lines[0] == f"RESUMED {kill_after}"
    asyncio.run(assert_same_as_uninterrupted(location, 3, lines[-1]))


@pytest.mark.slow
@pytest.mark.parametrize("location_kind", ["s3"])
def test_a_plain_loop_killed_on_s3_resumes_to_the_same_state(location: Any) -> None:
    run_child("sync", location, 3, kill_after=1)
    lines = run_child("sync", location, 3)
    assert lines[0] == "RESUMED 1"
    asyncio.run(assert_same_as_uninterrupted(location, 3, lines[-1]))


# ---------------------------------------------------------------------------- the example


@pytest.mark.parametrize("where", ["directory", pytest.param("embedded-s3", marks=pytest.mark.slow)])
def test_example_script(tmp_path: Path, where: str) -> None:
    """examples/sync_loop.py: stops after epoch 3, resumes from it, ends as an uninterrupted run."""
    lines = run_example("sync_loop.py", tmp_path, [str(tmp_path / "ckpt")] if where == "directory" else [])
    assert "committed epochs: [0, 1, 2, 3]" in lines and "resumed from epoch 3 (optimizer step 24)" in lines
    assert "committed epochs: [0, 1, 2, 3, 4, 5, 6]" in lines


def test_the_readme_snippet_runs_as_written_and_resumes(tmp_path: Path) -> None:
    name, url = "sync-loop", "s3://my-bucket/runs/exp1"
    every_epoch = list(range(11))
    assert run_readme_snippet(name, url, tmp_path / "ckpt") == [f"committed: {every_epoch} step: 10"]
    assert run_readme_snippet(name, url, tmp_path / "ckpt") == [f"committed: {every_epoch} step: 10"]
