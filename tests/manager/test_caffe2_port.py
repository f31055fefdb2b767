"""caffe2's ``checkpoint_test.py`` scenarios, on asyncckpt (reference/caffe2_checkpoint.md section 3).

A small simulated ``JobRunner`` drives a job the way caffe2's does: ``set_params``,
``get_resume_from_epoch_id``, the init group when starting fresh, ``init``, a save of
epoch 0 (or a load of the resume epoch), then one epoch after another, each followed
by ``cp_accessible(None)`` -> ``save`` -> ``write_checkpoint_metadata`` ->
``report_checkpoint_stats``; a failed save is logged as a warning and training goes on.

The storage-failure scenarios also run on local paths only (caffe2's own test used
``/tmp/path_does_not_exist/``): with a missing S3 bucket, ``get_resume_from_epoch_id``
already raises ``StorageError`` before the first epoch, so the S3 case is covered by
a run whose storage breaks midway.

The pipeline of every node is caffe2's ``build_pipeline``: a dataset of the values
0..9, a reader cursor and ``total = [100]`` live in the node's workspace (so they are
checkpointed); an epoch reads up to 3 values and adds them to ``total``; the job stops
when the data is finished. Totals per epoch: 103, 115, 136, 145.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asyncckpt import CheckpointConflictError, MultiNodeCheckpointManager, StorageError
from asyncckpt.storage import storage_for

log = logging.getLogger(__name__)

EXPECTED_TOTALS = [103, 115, 136, 145]
DATASET_SIZE = 10
READS_PER_EPOCH = 3

Session = dict[str, MutableMapping[str, Any]]  # node name -> that node's workspace


@dataclasses.dataclass
class Job:
    """The nodes of a job and their pipeline (caffe2's ``build_pipeline``)."""

    nodes: list[str]

    def run_init_group(self, session: Session) -> None:
        for node in self.nodes:
            ws = session.setdefault(node, {})
            ws["dataset"] = np.arange(DATASET_SIZE, dtype=np.int64)
            ws["cursor"] = 0
            ws["total"] = np.array([100], dtype=np.int64)
            ws["node"] = node

    def run_epoch_group(self, session: Session, read: dict[str, list[int]]) -> bool:
        """One epoch on every node; True when the data is finished (the stop condition)."""
        finished = []
        for node in self.nodes:
            ws = session[node]
            start = int(ws["cursor"])
            values = ws["dataset"][start : start + READS_PER_EPOCH]
            ws["cursor"] = start + len(values)
            ws["total"] = ws["total"] + values.sum()
            read.setdefault(node, []).extend(int(v) for v in values)
            finished.append(len(values) < READS_PER_EPOCH)
        return any(finished)


class JobRunner:
    """caffe2's ``JobRunner.train``, made async, with the checkpoint manager optional."""

    def __init__(
        self,
        job: Job,
        checkpoint_manager: MultiNodeCheckpointManager | None = None,
        resume_from_epoch: int | None = None,
        after_epoch: Callable[[JobRunner, int], None] | None = None,
    ):
        self.job = job
        self.checkpoint_manager = checkpoint_manager
        self.resume_from_epoch = resume_from_epoch
        self.after_epoch = after_epoch
        self.values_read: dict[str, list[int]] = {}
        self.saved: list[int] = []
        self.failed_saves: dict[int, BaseException] = {}
        self.skipped_saves: list[int] = []

    async def train(self, session: Session) -> int:
        mgr = self.checkpoint_manager
        resume = self.resume_from_epoch
        if mgr is not None:
            mgr.set_params(nodes=self.job.nodes)
            resume = await mgr.get_resume_from_epoch_id(resume)
            if resume is not None:
                log.info("Resuming from epoch %d", resume)
        from_scratch = resume is None
        if from_scratch:
            self.job.run_init_group(session)
        if mgr is not None:
            for node in self.job.nodes:
                session.setdefault(node, {})
            await mgr.init({node: session[node] for node in self.job.nodes}, retrieve_from_epoch=resume)
            if from_scratch:
                await self.save_checkpoints(0)
            else:
                assert resume is not None
                await mgr.load(resume)
                await mgr.report_checkpoint_stats("checkpoint_load")
        epoch = 1 if from_scratch else resume + 1  # type: ignore[operator]
        while True:
            stop = self.job.run_epoch_group(session, self.values_read)
            if self.checkpoint_manager is not None:
                await self.save_checkpoints(epoch)
            if self.after_epoch is not None:
                self.after_epoch(self, epoch)
            if stop:
                break
            epoch += 1
        return epoch

    async def save_checkpoints(self, epoch: int) -> None:
        mgr = self.checkpoint_manager
        if mgr is None:
            raise ValueError("Checkpoint manager is None")
        try:
            if await mgr.cp_accessible(None):
                await mgr.save(epoch)
                await mgr.write_checkpoint_metadata(epoch)  # save committed already: a no-op
                await mgr.report_checkpoint_stats("checkpoint_save")
                self.saved.append(epoch)
            else:
                log.warning("Checkpoint files cannot be accessed! (epoch %d)", epoch)
                self.skipped_saves.append(epoch)
        except Exception as exc:  # caffe2: a job makes progress even if a checkpoint fails
            log.warning("Unable to write checkpoint for epoch %d: %s", epoch, exc)
            self.failed_saves[epoch] = exc


def manager(location: Any) -> MultiNodeCheckpointManager:
    return MultiNodeCheckpointManager(location.url, storage_options=location.options)


def total_of(workspace: MutableMapping[str, Any]) -> int:
    total = workspace["total"]
    assert isinstance(total, np.ndarray) and total.shape == (1,)
    return int(total[0])


async def train_fresh(location: Any, nodes: list[str]) -> tuple[int, Session, JobRunner]:
    session: Session = {}
    async with manager(location) as mgr:
        runner = JobRunner(Job(nodes), mgr)
        last_epoch = await runner.train(session)
    return last_epoch, session, runner


async def test_fresh_run_trains_four_epochs_and_saves_every_one(location: Any) -> None:
    last_epoch, session, runner = await train_fresh(location, ["trainer_0"])
    assert last_epoch == 4
    assert total_of(session["trainer_0"]) == 145
    assert runner.values_read == {"trainer_0": list(range(DATASET_SIZE))}
    assert runner.saved == [0, 1, 2, 3, 4]
    assert runner.failed_saves == {} and runner.skipped_saves == []


async def test_every_epoch_loads_back_its_own_total_and_cursor(location: Any) -> None:
    await train_fresh(location, ["trainer_0"])
    workspace: dict[str, Any] = {}
    async with manager(location) as mgr:
        await mgr.init({"trainer_0": workspace})
        for epoch, expected in enumerate([100, *EXPECTED_TOTALS]):
            await mgr.load(epoch)
            assert total_of(workspace) == expected, epoch
            assert workspace["cursor"] == min(READS_PER_EPOCH * epoch, DATASET_SIZE)


async def test_resuming_from_every_epoch_with_a_new_manager_ends_with_total_145(location: Any) -> None:
    await train_fresh(location, ["trainer_0"])
    for resume in (1, 2, 3, 4):
        session: Session = {}  # a fresh workspace: everything must come from the checkpoint
        async with manager(location) as mgr:
            runner = JobRunner(Job(["trainer_0"]), mgr, resume_from_epoch=resume)
            last_epoch = await runner.train(session)
        assert last_epoch == max(4, resume + 1)
        assert total_of(session["trainer_0"]) == 145
        assert session["trainer_0"]["cursor"] == DATASET_SIZE
        # the cursor was restored: no value read twice, none skipped
        assert runner.values_read["trainer_0"] == list(range(READS_PER_EPOCH * resume, DATASET_SIZE))
        # re-saving a committed epoch is refused (no silent overwrite) and training goes on
        assert set(runner.failed_saves) == set(range(resume + 1, 5))
        assert all(isinstance(exc, CheckpointConflictError) for exc in runner.failed_saves.values())

    workspace: dict[str, Any] = {}
    async with manager(location) as mgr:  # the refused re-saves changed no committed epoch
        await mgr.init({"trainer_0": workspace})
        for epoch, expected in enumerate(EXPECTED_TOTALS, start=1):
            await mgr.load(epoch)
            assert total_of(workspace) == expected


async def test_three_trainers_then_a_fresh_manager_loads_two_totals_per_epoch(location: Any) -> None:
    nodes = ["trainer_0", "trainer_1", "trainer_2"]
    async with manager(location) as mgr:
        await mgr.init(nodes)
        for node in nodes:  # caffe2: the shard name of every node, before anything is saved
            url = mgr.get_ckpt_db_name(node, 5)
            assert url is not None and url.startswith(location.url + "/") and node in url
        assert mgr.get_ckpt_db_name("trainer_3", 5) is None
    last_epoch, session, _ = await train_fresh(location, nodes)
    assert last_epoch == 4
    assert [total_of(session[node]) for node in nodes] == [145, 145, 145]

    async with manager(location) as fresh:
        for epoch, expected in enumerate(EXPECTED_TOTALS, start=1):
            loaded: dict[str, Any] = {}
            assert await fresh.load_blobs_locally(
                ["trainer_1", "trainer_2"], ["trainer_1/total", "trainer_2/total"], epoch, loaded
            )
            assert sorted(loaded) == ["trainer_1/total", "trainer_2/total"]
            assert [total_of({"total": loaded[name]}) for name in sorted(loaded)] == [expected, expected]
        names: dict[str, Any] = {}
        assert await fresh.load_blobs_locally(
            ["trainer_1", "trainer_2"], ["trainer_1/node", "trainer_2/node"], 3, names
        )
        assert names == {"trainer_1/node": "trainer_1", "trainer_2/node": "trainer_2"}
        missing: dict[str, Any] = {}
        assert not await fresh.load_blobs_locally(
            ["trainer_1", "trainer_2"], ["trainer_1/total", "trainer_2/total"], 5, missing
        )
        assert missing == {}


async def test_one_manager_reused_for_a_fresh_run_and_every_resume(location: Any) -> None:
    job = Job(["trainer_0"])
    session: Session = {}  # and one session, as in caffe2's test
    async with manager(location) as mgr:
        assert await JobRunner(job, mgr).train(session) == 4
        assert total_of(session["trainer_0"]) == 145
        for resume in (1, 2, 3, 4):
            runner = JobRunner(job, mgr, resume_from_epoch=resume)
            await runner.train(session)
            assert total_of(session["trainer_0"]) == 145
            assert runner.values_read["trainer_0"] == list(range(READS_PER_EPOCH * resume, DATASET_SIZE))


# --------------------------------------------------------------------------- storage failures


@dataclasses.dataclass(frozen=True)
class BrokenLocation:
    url: str
    options: dict[str, Any] | None = None


def below_a_regular_file(tmp_path: Path) -> BrokenLocation:
    """A directory that can never be created: its parent is a regular file."""
    (tmp_path / "a_file").write_bytes(b"not a directory")
    return BrokenLocation((tmp_path / "a_file" / "ckpt").as_uri())


def with_epochs_as_a_regular_file(tmp_path: Path) -> BrokenLocation:
    """A usable directory in which no epoch can be written: ``epochs`` is a regular file."""
    root = tmp_path / "blocked"
    root.mkdir()
    (root / "epochs").write_bytes(b"not a directory")
    return BrokenLocation(root.as_uri())


@pytest.fixture(params=["file-below-a-regular-file", "file-with-epochs-as-a-regular-file"])
def failing_location(request: pytest.FixtureRequest, tmp_path: Path) -> BrokenLocation:
    """A location where every save fails (local paths, like caffe2's /tmp/path_does_not_exist/)."""
    if request.param == "file-below-a-regular-file":
        return below_a_regular_file(tmp_path)
    return with_epochs_as_a_regular_file(tmp_path)


async def test_training_completes_when_every_checkpoint_save_fails(
    failing_location: BrokenLocation, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=__name__)
    for node in ("trainer_0", "trainer_1"):  # as in caffe2, each node's job on its own: every run finishes
        session: Session = {}
        async with MultiNodeCheckpointManager(failing_location.url) as mgr:
            runner = JobRunner(Job([node]), mgr)
            assert await runner.train(session) == 4
            assert total_of(session[node]) == 145
            assert runner.saved == []
            assert sorted([*runner.failed_saves, *runner.skipped_saves]) == [0, 1, 2, 3, 4]
            for epoch in range(5):
                assert await mgr.cp_accessible(epoch) is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == __name__]
    assert len(warnings) == 10
    assert all("Unable to write checkpoint" in message or "cannot be accessed" in message for message in warnings)


@pytest.fixture
def broken_location(location: Any, tmp_path: Path) -> BrokenLocation:
    """A location whose saves fail: a missing bucket on the same S3 endpoint, else a blocked directory."""
    if location.kind == "s3":
        return BrokenLocation(f"s3://missing-{uuid.uuid4().hex[:12]}/job", location.options)
    return with_epochs_as_a_regular_file(tmp_path)


async def test_saves_failing_midway_lose_no_epoch_committed_before(
    location: Any, broken_location: BrokenLocation, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=__name__)
    session: Session = {"trainer_0": {}}
    async with (
        manager(location) as good,
        MultiNodeCheckpointManager(broken_location.url, storage_options=broken_location.options) as broken,
    ):
        await broken.init(session)  # same node, same workspace: only its storage differs

        def break_storage_after_epoch_2(runner: JobRunner, epoch: int) -> None:
            if epoch == 2:
                runner.checkpoint_manager = broken

        runner = JobRunner(Job(["trainer_0"]), good, after_epoch=break_storage_after_epoch_2)
        assert await runner.train(session) == 4
    assert total_of(session["trainer_0"]) == 145
    assert runner.saved == [0, 1, 2]
    assert sorted([*runner.failed_saves, *runner.skipped_saves]) == [3, 4]
    assert all(isinstance(exc, StorageError) for exc in runner.failed_saves.values())
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == __name__]
    assert len(warned) == 2

    workspace: dict[str, Any] = {}
    async with manager(location) as reader:
        assert await reader.get_resume_from_epoch_id() == 2
        await reader.init({"trainer_0": workspace}, retrieve_from_epoch=2)
        for epoch, expected in enumerate([100, 103, 115]):
            assert await reader.cp_accessible(epoch) is True
            await reader.load(epoch)
            assert total_of(workspace) == expected

    resumed: Session = {}
    async with manager(location) as mgr:  # and training resumes from the last good epoch
        runner = JobRunner(Job(["trainer_0"]), mgr)
        assert await runner.train(resumed) == 4
        assert runner.saved == [3, 4]
    assert total_of(resumed["trainer_0"]) == 145


async def test_final_epoch_copied_to_an_upload_location_loads_from_there(location: Any, tmp_path: Path) -> None:
    """caffe2's ``test_upload_checkpoint``: after training the final epoch is copied to
    an upload directory; a job reading it with ``path_prefix`` gets the final state."""
    last_epoch, _, _ = await train_fresh(location, ["trainer_0"])
    upload_dir = tmp_path / "upload"
    prefix = f"epochs/{last_epoch:012d}/"
    async with (
        storage_for(location.url, options=location.options) as source,
        storage_for(upload_dir.as_uri()) as target,
    ):
        async for info in source.list(prefix):
            await target.put(info.key, await source.get(info.key))
    assert (upload_dir / prefix / "manifest.json").is_file()

    workspace: dict[str, Any] = {}
    async with MultiNodeCheckpointManager((tmp_path / "scratch").as_uri()) as mgr:
        await mgr.init(
            {"trainer_0": workspace}, retrieve_from_epoch=last_epoch, path_prefix=str(upload_dir), path_type="file"
        )
        await mgr.load(last_epoch)
    assert total_of(workspace) == 145
    assert workspace["cursor"] == DATASET_SIZE
