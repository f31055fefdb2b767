"""``JobRunner``: resume or start at 0, the save cadence, background saves overlapping the
next epoch, failing saves, and a job SIGKILLed at every epoch that resumes to the same end."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asyncckpt import (
    CheckpointError,
    CheckpointStateError,
    JobRunner,
    MultiNodeCheckpointManager,
    SyncCheckpointManager,
    TransferConfig,
)
from asyncckpt.runner import FailedSave
from tests.support.crash_child import assert_state_equal
from tests.support.faultproxy import FaultProxy, Hold, Request, Respond
from tests.support.locations import manager
from tests.support.runner_child import (
    NODES,
    assert_same_as_uninterrupted,
    initial_state,
    run_child,
    run_example,
    run_readme_snippet,
    state_digest,
    train_step,
    uninterrupted,
)

WAIT = 30.0


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A plain ``train_epoch``: records which epochs ran, where, and returns ``metrics``."""

    def __init__(
        self, metrics: Callable[[int], Any] = lambda epoch: None, clock: FakeClock | None = None, step: float = 0.0
    ):
        self.epochs: list[int] = []
        self.threads: list[threading.Thread] = []
        self._metrics = metrics
        self._clock = clock
        self._step = step

    def __call__(self, epoch: int) -> Any:
        self.epochs.append(epoch)
        self.threads.append(threading.current_thread())
        if self._clock is not None:
            self._clock.now += self._step
        return self._metrics(epoch)


@pytest.fixture
def memory_url(request: pytest.FixtureRequest) -> Iterator[str]:
    from asyncckpt.storage import drop_memory_store

    name = f"runner-{request.node.name}"[:60].replace("[", "-").replace("]", "")
    yield f"memory://{name}"
    drop_memory_store(name)


def training(workspaces: dict[str, Any]) -> Callable[[int], dict[str, float] | None]:
    """A plain ``train_epoch`` of the child job's training, on ``workspaces``."""

    def train_epoch(epoch: int) -> dict[str, float] | None:
        return train_step(workspaces, epoch)

    return train_epoch


# ---------------------------------------------------------------------------- a fresh run, resumes


async def test_a_fresh_run_saves_epoch_0_and_every_epoch_bit_exact(location: Any) -> None:
    """The workspaces change in place in a worker thread; every committed epoch holds
    exactly the state after it, and run() returns the last epoch."""
    workspaces = initial_state()
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        runner = JobRunner(mgr)
        assert await runner.run(training(workspaces), 3) == 3
        assert runner.resumed_from is None and runner.failed_saves == []
    await assert_same_as_uninterrupted(location, 3, f"FINAL {state_digest(workspaces)}")


async def test_resume_loads_the_latest_epoch_and_trains_only_the_rest(memory_url: str) -> None:
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        workspaces = initial_state()
        await mgr.init(workspaces)
        assert await JobRunner(mgr).run(training(workspaces), 2) == 2

    async with MultiNodeCheckpointManager(memory_url) as mgr:
        workspaces = {node: {} for node in NODES}  # a new process: nothing but the checkpoint
        await mgr.init(workspaces)
        seen_at_start: list[int] = []

        def train_epoch(epoch: int) -> None:
            seen_at_start.append(workspaces["trainer_0"]["step"])
            train_step(workspaces, epoch)

        runner = JobRunner(mgr)
        assert await runner.run(train_epoch, 4) == 4
        assert runner.resumed_from == 2
        assert seen_at_start == [2, 3]  # epoch 3 trained on the loaded state of epoch 2
        assert await mgr.committed_epochs() == [0, 1, 2, 3, 4]
    states, _ = uninterrupted(4)
    for node in NODES:
        assert_state_equal(workspaces[node], states[4][node], node)


async def test_a_job_already_past_num_epochs_trains_nothing(memory_url: str) -> None:
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": np.arange(4)}})
        assert await JobRunner(mgr).run(lambda epoch: None, 3) == 3
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        workspace: dict[str, Any] = {}
        await mgr.init({"n": workspace})
        recorder = Recorder()
        runner = JobRunner(mgr)
        assert await runner.run(recorder, 2) == 3
        assert recorder.epochs == [] and runner.resumed_from == 3
        assert np.array_equal(workspace["x"], np.arange(4))  # loaded all the same
        assert await mgr.committed_epochs() == [0, 1, 2, 3]


async def test_zero_epochs_saves_epoch_0_and_returns_it(memory_url: str) -> None:
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": 1}})
        recorder = Recorder()
        assert await JobRunner(mgr).run(recorder, 0) == 0
        assert recorder.epochs == [] and await mgr.committed_epochs() == [0]


# ---------------------------------------------------------------------------- cadence


@pytest.mark.parametrize(
    ("save_every", "num_epochs", "saved"),
    [(1, 4, [0, 1, 2, 3, 4]), (2, 5, [0, 2, 4, 5]), (3, 7, [0, 3, 6, 7]), (None, 4, [0, 4]), (10, 3, [0, 3])],
)
async def test_save_every_saves_its_multiples_epoch_0_and_the_last(
    memory_url: str, save_every: int | None, num_epochs: int, saved: list[int]
) -> None:
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": 0}})
        recorder = Recorder()
        assert await JobRunner(mgr, save_every=save_every).run(recorder, num_epochs) == num_epochs
        assert recorder.epochs == list(range(1, num_epochs + 1))
        assert await mgr.committed_epochs() == saved


async def test_save_every_keeps_its_grid_across_a_resume(memory_url: str) -> None:
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": 0}})
        await JobRunner(mgr, save_every=2).run(Recorder(), 3)  # 0, 2 and the last, 3
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {}})
        await JobRunner(mgr, save_every=2).run(Recorder(), 8)  # 4, 6 and the last, 8
        assert await mgr.committed_epochs() == [0, 2, 3, 4, 6, 8]


async def test_save_every_seconds_saves_once_that_long_passed_since_the_last_save(memory_url: str) -> None:
    """Each epoch takes 4 s of a fake clock; a save is due 10 s after the previous one began."""
    clock = FakeClock()
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": 0}})
        runner = JobRunner(mgr, save_every=None, save_every_seconds=10, clock=clock)
        assert await runner.run(Recorder(clock=clock, step=4.0), 8) == 8
        # epoch 0 saved at t=0; 3 at t=12; 6 at t=24; 8 is the last
        assert await mgr.committed_epochs() == [0, 3, 6, 8]


async def test_both_cadences_save_when_either_is_due(memory_url: str) -> None:
    """Each epoch takes 6 s: epoch 2 (t=12) is 10 s after epoch 0, 3 a multiple of 3, 5 (t=30)
    10 s after epoch 3 (t=18), 6 a multiple of 3, 7 the last."""
    clock = FakeClock()
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": 0}})
        runner = JobRunner(mgr, save_every=3, save_every_seconds=10, clock=clock)
        await runner.run(Recorder(clock=clock, step=6.0), 7)
        assert await mgr.committed_epochs() == [0, 2, 3, 5, 6, 7]


# ---------------------------------------------------------------------------- train_epoch


async def test_a_plain_train_epoch_runs_in_a_worker_thread_and_an_async_one_on_the_loop(memory_url: str) -> None:
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": 0}})
        recorder = Recorder()
        await JobRunner(mgr).run(recorder, 2)
        assert all(thread is not threading.current_thread() for thread in recorder.threads)

    on_loop: list[bool] = []

    async def train_epoch(epoch: int) -> None:
        on_loop.append(asyncio.get_running_loop() is loop)

    class AsyncCallable:
        async def __call__(self, epoch: int) -> None:
            on_loop.append(asyncio.get_running_loop() is loop)

    loop = asyncio.get_running_loop()
    async with MultiNodeCheckpointManager(memory_url + "-async") as mgr:
        await mgr.init({"n": {"x": 0}})
        await JobRunner(mgr).run(train_epoch, 2)
    async with MultiNodeCheckpointManager(memory_url + "-callable") as mgr:
        await mgr.init({"n": {"x": 0}})
        await JobRunner(mgr).run(AsyncCallable(), 2)
    assert on_loop == [True] * 4


async def test_a_training_epoch_overlaps_the_previous_save(s3_endpoint: str, s3_bucket: str, s3_options: Any) -> None:
    """Epoch 1's commit is held at the proxy: epoch 2 trains meanwhile, and only then is
    the commit let through."""
    hold = Hold(timeout=WAIT)
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(lambda r: r.method == "PUT" and r.path.endswith("/epochs/000000000001/manifest.json"), hold)
        url = f"s3://{s3_bucket}/overlap"
        async with MultiNodeCheckpointManager(url, storage_options={**s3_options, "endpoint_url": proxy.url}) as mgr:
            await mgr.init({"n": {"x": np.zeros(8)}})
            seen: list[list[int]] = []

            async def train_epoch(epoch: int) -> None:
                if epoch == 2:
                    assert await asyncio.to_thread(hold.arrived.wait, WAIT), "epoch 1's commit never came"
                    seen.append(await mgr.committed_epochs())
                    hold.release(forward=True)

            assert await JobRunner(mgr).run(train_epoch, 3) == 3
            assert seen == [[0]]  # epoch 2 trained while epoch 1 was not yet committed
            assert await mgr.committed_epochs() == [0, 1, 2, 3]
        assert not proxy.errors


async def test_metrics_returned_by_train_epoch_reach_the_manifest(memory_url: str) -> None:
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": 0}})
        await JobRunner(mgr, save_every=2).run(lambda epoch: {"loss": 1.0 / epoch, "epoch": float(epoch)}, 3)
        manifests = await mgr.committed_manifests()
        assert [m.epoch for m in manifests] == [0, 2, 3]
        assert [m.metrics for m in manifests] == [{}, {"loss": 0.5, "epoch": 2.0}, {"loss": 1 / 3, "epoch": 3.0}]
        assert manifests[-1].metrics == {"loss": 1 / 3, "epoch": 3.0}


async def test_train_epoch_returning_something_else_than_metrics_raises(memory_url: str) -> None:
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": 0}})
        with pytest.raises(TypeError, match=r"train_epoch\(1\) returned a float"):
            await JobRunner(mgr).run(lambda epoch: 0.5, 3)


async def test_an_error_of_train_epoch_is_raised_once_the_save_in_flight_ended(memory_url: str) -> None:
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": 0}})

        def train_epoch(epoch: int) -> None:
            if epoch == 3:
                raise ZeroDivisionError("diverged")

        with pytest.raises(ZeroDivisionError, match="diverged"):
            await JobRunner(mgr).run(train_epoch, 5)
        assert await mgr.committed_epochs() == [0, 1, 2]


async def test_state_that_cannot_be_saved_stops_the_run_at_once(memory_url: str) -> None:
    """An unsupported blob would fail the final save too: it is raised, not recorded."""
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": 0}})
        recorder = Recorder()
        with pytest.raises(TypeError):
            await JobRunner(mgr).run(lambda epoch: recorder(epoch) or mgr.workspace("n").update(x=object()), 4)
        assert recorder.epochs == [1] and await mgr.committed_epochs() == [0]


async def test_metrics_that_cannot_be_kept_stop_the_run_at_once(memory_url: str) -> None:
    """A NaN loss is refused by the save before anything is written: raised, not recorded."""
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        await mgr.init({"n": {"x": 0}})
        runner = JobRunner(mgr)
        with pytest.raises(ValueError, match="metric 'loss' must be finite"):
            await runner.run(lambda epoch: {"loss": float("nan") if epoch == 2 else 1.0}, 4)
        assert runner.failed_saves == [] and await mgr.committed_epochs() == [0, 1]


# ---------------------------------------------------------------------------- failing saves


def _put_of_epoch(epoch: int) -> Callable[[Request], bool]:
    return lambda r: r.method in ("PUT", "POST") and f"/epochs/{epoch:012d}/" in r.path


async def test_a_failing_intermediate_save_is_reported_and_training_goes_on(
    s3_endpoint: str, s3_bucket: str, s3_options: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with FaultProxy(s3_endpoint) as proxy:
        broken = proxy.add_rule(_put_of_epoch(2), Respond(500, "InternalError"))
        url = f"s3://{s3_bucket}/failing"
        options = {**s3_options, "endpoint_url": proxy.url}
        async with MultiNodeCheckpointManager(url, storage_options=options, config=TransferConfig(max_attempts=2)) as m:
            await m.init({"a": {"x": np.arange(5)}, "b": {"y": 1}})
            recorder = Recorder()
            runner = JobRunner(m)
            assert await runner.run(recorder, 4) == 4
            assert recorder.epochs == [1, 2, 3, 4]
            assert [failed.epoch for failed in runner.failed_saves] == [2]
            assert isinstance(runner.failed_saves[0], FailedSave)
            assert isinstance(runner.failed_saves[0].error, CheckpointError)
            assert await m.committed_epochs() == [0, 1, 3, 4]
        assert broken.hits > 0 and not proxy.errors
    assert "checkpoint of epoch 2 failed; training goes on" in caplog.text


async def test_a_failing_final_save_raises(s3_endpoint: str, s3_bucket: str, s3_options: Any) -> None:
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(_put_of_epoch(3), Respond(500, "InternalError"))
        url = f"s3://{s3_bucket}/final"
        options = {**s3_options, "endpoint_url": proxy.url}
        async with MultiNodeCheckpointManager(url, storage_options=options, config=TransferConfig(max_attempts=2)) as m:
            await m.init({"a": {"x": np.arange(5)}})
            runner = JobRunner(m)
            with pytest.raises(CheckpointError):
                await runner.run(Recorder(), 3)
            assert runner.failed_saves == []
            assert await m.committed_epochs() == [0, 1, 2]
        assert not proxy.errors


# ---------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"save_every": 0}, "save_every must be a positive int or None"),
        ({"save_every": -2}, "save_every must be a positive int or None"),
        ({"save_every": 1.5}, "save_every must be a positive int or None"),
        ({"save_every": True}, "save_every must be a positive int or None"),
        ({"save_every_seconds": 0}, "save_every_seconds must be a positive, finite number"),
        ({"save_every_seconds": -1.0}, "save_every_seconds must be a positive, finite number"),
        ({"save_every_seconds": float("nan")}, "save_every_seconds must be a positive, finite number"),
        ({"save_every_seconds": float("inf")}, "save_every_seconds must be a positive, finite number"),
        ({"save_every_seconds": "60"}, "save_every_seconds must be a positive, finite number"),
    ],
)
async def test_invalid_cadence_raises_value_error(memory_url: str, kwargs: dict[str, Any], match: str) -> None:
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        with pytest.raises(ValueError, match=match):
            JobRunner(mgr, **kwargs)


async def test_invalid_run_arguments_raise_before_anything_happens(memory_url: str) -> None:
    async with MultiNodeCheckpointManager(memory_url) as mgr:
        runner = JobRunner(mgr, save_every_seconds=30)
        with pytest.raises(CheckpointStateError, match=r"init\(nodes\)"):
            await runner.run(Recorder(), 3)
        await mgr.init({"n": {"x": 0}})
        for num_epochs in (-1, 2.0, True, "3"):
            with pytest.raises(ValueError, match="num_epochs must be a non-negative int"):
                await runner.run(Recorder(), num_epochs)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="train_epoch must be callable"):
            await runner.run(None, 3)  # type: ignore[arg-type]
        assert await mgr.committed_epochs() == []


def test_the_runner_takes_the_async_manager_only() -> None:
    with SyncCheckpointManager("memory://runner-takes-async") as sync:
        with pytest.raises(TypeError, match="MultiNodeCheckpointManager"):
            JobRunner(sync)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock must be callable"):
        JobRunner(MultiNodeCheckpointManager("memory://runner-clock"), clock=5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- SIGKILL and resume


@pytest.mark.slow
@pytest.mark.parametrize("location_kind", ["file"])
@pytest.mark.parametrize("kill_after", [None, 0, 1, 2, 3])
def test_a_job_killed_after_any_epoch_resumes_to_the_state_of_an_uninterrupted_run(
    location: Any, kill_after: int | None
) -> None:
    """The child commits epochs 0..kill_after and SIGKILLs itself as the next epoch starts;
    a new process resumes; every epoch and the final state equal an uninterrupted run's."""
    if kill_after is not None:
        run_child("runner", location, 3, kill_after=kill_after)
        assert asyncio.run(_committed(location)) == list(range(kill_after + 1))
    lines = run_child("runner", location, 3)
    assert lines[0] == f"RESUMED {kill_after}"
    asyncio.run(assert_same_as_uninterrupted(location, 3, lines[-1]))


@pytest.mark.slow
@pytest.mark.parametrize(("location_kind", "mode", "kill_after"), [("file", "runner-async", 1), ("s3", "runner", 2)])
def test_a_job_killed_with_a_save_in_flight_resumes_to_the_same_state(
    location: Any, mode: str, kill_after: int
) -> None:
    """Killed as epoch ``kill_after``'s save is in flight: the resume starts from that epoch
    or the one before, and ends where an uninterrupted run ends."""
    run_child(mode, location, 3, kill_after=kill_after, in_flight=True)
    assert asyncio.run(_committed(location)) in (list(range(kill_after)), list(range(kill_after + 1)))
    lines = run_child(mode, location, 3)
    assert lines[0] in (f"RESUMED {kill_after - 1}", f"RESUMED {kill_after}")
    asyncio.run(assert_same_as_uninterrupted(location, 3, lines[-1]))


async def _committed(location: Any) -> list[int]:
    async with manager(location) as mgr:
        return await mgr.committed_epochs()


# ---------------------------------------------------------------------------- the example


@pytest.mark.parametrize("where", ["directory", pytest.param("embedded-s3", marks=pytest.mark.slow)])
def test_example_script(tmp_path: Path, where: str) -> None:
    """examples/job_runner.py: preempted at epoch 5, resumed from 4, ends as an uninterrupted run."""
    lines = run_example("job_runner.py", tmp_path, [str(tmp_path / "ckpt")] if where == "directory" else [])
    assert "committed epochs: [0, 2, 4]" in lines and "the job stops: preempted during epoch 5" in lines
    assert "(this run resumed from epoch 4)" in lines and "committed epochs: [0, 2, 4, 6, 8]" in lines


def test_the_readme_snippet_runs_as_written_and_resumes(tmp_path: Path) -> None:
    name, url = "job-runner", "s3://my-bucket/runs/exp2"
    assert run_readme_snippet(name, url, tmp_path / "ckpt") == ["epoch 10 is committed; resumed from None; failed: []"]
    assert run_readme_snippet(name, url, tmp_path / "ckpt") == ["epoch 10 is committed; resumed from 10; failed: []"]
