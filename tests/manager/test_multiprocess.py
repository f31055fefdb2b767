"""A job whose nodes live in separate OS processes, committing through storage alone.

Every test starts real Python processes (tests/support/mp_worker.py, one manager each) against
the moto server of conftest.py over loopback; the parent only starts, releases, kills and
inspects them, and checks the bucket directly with aioboto3.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aioboto3
import pytest
from aiobotocore.config import AioConfig

from asyncckpt import MultiNodeCheckpointManager, split_nodes
from tests.support import mp_worker
from tests.support.mp_worker import BLOBS, expected_state, same_state

WORKER = Path(mp_worker.__file__)
STARTUP_TIMEOUT = 60.0  # interpreters importing aioboto3 on a loaded 2-core machine
RUN_TIMEOUT = 60.0


class Worker:
    """One child process: JSON lines on stdout (read without buffering), stderr in a file."""

    def __init__(self, args: dict[str, Any], log_dir: Path, name: str):
        self.name = name
        self.args = args
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._stderr_path = log_dir / f"{name}.stderr"
        with open(self._stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                bufsize=0,
            )

    @property
    def stderr(self) -> str:
        return self._stderr_path.read_text(errors="replace")

    def _read_more(self, deadline: float) -> bool:
        """Read what is available before ``deadline``; False at EOF."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError(f"{self.name}: no output in time; events so far {self.events}\n{self.stderr}")
        chunk = os.read(fd, 65536)
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self.events.append(json.loads(line))
        return bool(chunk)

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event["event"] == name:
                    return event
            seen = len(self.events)
            if not self._read_more(deadline):
                raise AssertionError(f"{self.name} exited before {name!r}: {self.events}\n{self.stderr}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float) -> int:
        """Read until EOF, then reap; the exit code."""
        deadline = time.monotonic() + timeout
        while self._read_more(deadline):
            pass
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 1.0))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


@contextmanager
def workers(log_dir: Path) -> Iterator[list[Worker]]:
    """A list to start workers into; every one still alive at the end is SIGKILLed by PID."""
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            try:
                w.kill()
            finally:
                w.close()


def run_job(
    log_dir: Path,
    argses: list[dict[str, Any]],
    *,
    barrier: bool = True,
    startup: float = STARTUP_TIMEOUT,
    timeout: float = RUN_TIMEOUT,
) -> list[Worker]:
    """Start every worker at once, release them together, wait for all; the finished workers."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with workers(log_dir) as started:
        for i, args in enumerate(argses):
            started.append(Worker({**args, "barrier": barrier}, log_dir, f"{args['run_id']}-{i}"))
        if barrier:
            deadline = time.monotonic() + startup
            for w in started:
                w.wait_event("ready", deadline - time.monotonic())
            for w in started:
                w.send("go")
        deadline = time.monotonic() + timeout
        for w in started:
            w.finish(deadline - time.monotonic())
        return list(started)


def job_args(
    url: str, endpoint: str, run_id: str, nodes: list[str], processes: int, seed: int, **extra: Any
) -> list[dict[str, Any]]:
    return [
        {
            "url": url,
            "endpoint": endpoint,
            "run_id": run_id,
            "nodes": nodes,
            "local": split_nodes(nodes, rank, processes),
            "seed": seed,
            **extra,
        }
        for rank in range(processes)
    ]


def describe(ws: list[Worker]) -> str:
    return "\n".join(f"{w.name}: rc={w.proc.returncode} events={w.events}\nstderr: {w.stderr[-3000:]}" for w in ws)


async def list_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    config = AioConfig(s3={"addressing_style": "path"}, request_checksum_calculation="when_required")
    async with aioboto3.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config) as s3:
        keys: list[str] = []
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys


async def get_json(endpoint: str, bucket: str, key: str) -> dict[str, Any]:
    config = AioConfig(s3={"addressing_style": "path"}, response_checksum_validation="when_required")
    async with aioboto3.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config) as s3:
        response = await s3.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as body:
            return json.loads(await body.read())


def manifest_keys(keys: list[str]) -> list[str]:
    return sorted(k for k in keys if k.endswith("/manifest.json"))


async def check_epoch(url: str, options: dict[str, Any], nodes: list[str], epoch: int, seed: int) -> None:
    """A fresh single-process manager loads every node of ``epoch`` with the expected values."""
    async with MultiNodeCheckpointManager(url, storage_options=options) as mgr:
        await mgr.init(nodes)
        await mgr.load(epoch)
        for node in nodes:
            assert same_state(mgr.workspace(node), expected_state(seed, node, epoch)), (node, epoch)


NODES8 = [f"n{i}" for i in range(8)]


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "workers"


@pytest.fixture
def url(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/job"


async def test_four_processes_commit_every_epoch_once(
    url: str, s3_bucket: str, s3_endpoint: str, s3_options: dict[str, Any], log_dir: Path
) -> None:
    argses = job_args(url, s3_endpoint, "job-a", NODES8, 4, seed=7, epochs=[0, 1, 2])
    done = await asyncio.to_thread(run_job, log_dir, argses)
    assert [w.proc.returncode for w in done] == [0] * 4, describe(done)
    for w in done:  # every process saw every epoch committed, with its own nodes in its stats
        saved = w.of("saved")
        assert [e["epoch"] for e in saved] == [0, 1, 2], describe([w])
        for event in saved:
            assert event["nodes"] == sorted(w.args["local"])
            assert event["slowest_node"] in w.args["local"]
    assert sorted(node for w in done for node in w.args["local"]) == NODES8
    keys = await list_keys(s3_endpoint, s3_bucket, "job/")
    assert manifest_keys(keys) == [f"job/epochs/{e:012d}/manifest.json" for e in range(3)]
    for epoch in range(3):
        manifest = await get_json(s3_endpoint, s3_bucket, f"job/epochs/{epoch:012d}/manifest.json")
        index = await get_json(s3_endpoint, s3_bucket, f"job/{manifest['index']['key']}")
        assert manifest["nodes"] == len(NODES8) and sorted(index["nodes"]) == NODES8
        assert manifest["writer_id"] == "job-a"  # the processes of one job share one writer
        await check_epoch(url, s3_options, NODES8, epoch, seed=7)


async def test_resume_after_every_process_restarts(
    url: str, s3_bucket: str, s3_endpoint: str, s3_options: dict[str, Any], log_dir: Path
) -> None:
    first = await asyncio.to_thread(
        run_job, log_dir / "first", job_args(url, s3_endpoint, "first", NODES8, 4, seed=3, epochs=[0, 1, 2])
    )
    assert [w.proc.returncode for w in first] == [0] * 4, describe(first)
    second = await asyncio.to_thread(
        run_job,
        log_dir / "second",
        job_args(url, s3_endpoint, "second", NODES8, 4, seed=3, epochs=[3, 4], resume=True),
    )
    assert [w.proc.returncode for w in second] == [0] * 4, describe(second)
    for w in second:
        assert [(e["epoch"], e["ok"]) for e in w.of("resumed")] == [(2, True)], describe([w])
        assert [e["epoch"] for e in w.of("saved")] == [3, 4]
    keys = await list_keys(s3_endpoint, s3_bucket, "job/")
    assert manifest_keys(keys) == [f"job/epochs/{e:012d}/manifest.json" for e in range(5)]
    for epoch in (3, 4):
        manifest = await get_json(s3_endpoint, s3_bucket, f"job/epochs/{epoch:012d}/manifest.json")
        assert manifest["writer_id"] == "second"
        await check_epoch(url, s3_options, NODES8, epoch, seed=3)


async def test_killed_process_makes_the_others_time_out_naming_its_nodes(
    url: str, s3_bucket: str, s3_endpoint: str, s3_options: dict[str, Any], log_dir: Path
) -> None:
    argses = job_args(url, s3_endpoint, "crashy", NODES8, 4, seed=5, epochs=[1, 2], commit_timeout=5.0)
    victim_rank = 2
    victim_nodes = argses[victim_rank]["local"]
    argses[victim_rank]["stop_before"] = 2

    def scenario() -> list[Worker]:
        log_dir.mkdir(parents=True)
        with workers(log_dir) as started:
            for i, args in enumerate(argses):
                started.append(Worker({**args, "barrier": True}, log_dir, f"rank{i}"))
            for w in started:
                w.wait_event("ready", STARTUP_TIMEOUT)
            for w in started:
                w.send("go")
            victim = started[victim_rank]
            victim.wait_event("blocked", RUN_TIMEOUT)  # epoch 1 is committed, epoch 2 not started here
            victim.kill()
            t0 = time.monotonic()
            for w in started:
                if w is not victim:
                    w.finish(RUN_TIMEOUT)
            assert time.monotonic() - t0 < 30, "the survivors did not give up near their deadline"
            return list(started)

    done = await asyncio.to_thread(scenario)
    victim = done[victim_rank]
    assert victim.proc.returncode == -signal.SIGKILL
    assert [e["epoch"] for e in victim.of("saved")] == [1]
    for w in done:
        if w is victim:
            continue
        assert w.proc.returncode == 2, describe([w])
        assert [e["epoch"] for e in w.of("saved")] == [1]
        (error,) = w.of("error")
        assert error["epoch"] == 2 and error["type"] == "CheckpointTimeoutError", error
        # the victim's nodes; on a badly overloaded machine a survivor that was itself
        # later than the deadline is rightly named too
        assert set(victim_nodes) <= set(error["missing_nodes"]), error
        for node in error["missing_nodes"]:
            assert repr(node) in error["message"], error

    async with MultiNodeCheckpointManager(url, storage_options=s3_options) as mgr:
        assert await mgr.get_resume_from_epoch_id() == 1
        assert await mgr.committed_epochs() == [1]
    await check_epoch(url, s3_options, NODES8, 1, seed=5)
    leftovers = await list_keys(s3_endpoint, s3_bucket, "job/epochs/000000000002/")
    survivors = [n for n in NODES8 if n not in victim_nodes]
    # shard + receipt per surviving node and the job's create-only "abort" decision; no manifest
    assert len(leftovers) == 2 * len(survivors) + 1
    assert sum(k.endswith(".decision") for k in leftovers) == 1
    async with MultiNodeCheckpointManager(url, storage_options=s3_options) as mgr:
        report = await mgr.gc(grace_period=0)
    (abort,) = (k for k in leftovers if k.endswith(".decision"))
    expected = {k.removeprefix("job/") for k in leftovers if k != abort}
    assert set(report.deleted) == expected  # the abort decision stays: the job's writer can never commit epoch 2
    assert await list_keys(s3_endpoint, s3_bucket, "job/epochs/000000000002/") == [abort]
    await check_epoch(url, s3_options, NODES8, 1, seed=5)


async def test_straggler_after_the_deadline_does_not_commit_the_abandoned_epoch(
    url: str, s3_bucket: str, s3_endpoint: str, s3_options: dict[str, Any], log_dir: Path
) -> None:
    """The others gave up on epoch 2 ("the epoch stays uncommitted"): a process of the same
    job that arrives after their deadline must not commit it behind their backs."""
    nodes = ["n0", "n1", "n2", "n3"]
    argses = job_args(url, s3_endpoint, "late", nodes, 2, seed=4, epochs=[1, 2], commit_timeout=5.0)
    argses[1]["stop_before"] = 2

    def scenario() -> list[Worker]:
        log_dir.mkdir(parents=True)
        with workers(log_dir) as started:
            for i, args in enumerate(argses):
                started.append(Worker({**args, "barrier": True}, log_dir, f"rank{i}"))
            for w in started:
                w.wait_event("ready", STARTUP_TIMEOUT)
            for w in started:
                w.send("go")
            punctual, straggler = started
            straggler.wait_event("blocked", RUN_TIMEOUT)
            punctual.finish(RUN_TIMEOUT)  # gives up on epoch 2 at its deadline
            straggler.send("continue")  # now the late process saves epoch 2
            straggler.finish(RUN_TIMEOUT)
            return list(started)

    punctual, straggler = await asyncio.to_thread(scenario)
    (error,) = punctual.of("error")
    assert error["type"] == "CheckpointTimeoutError" and error["missing_nodes"] == argses[1]["local"], error
    async with MultiNodeCheckpointManager(url, storage_options=s3_options) as mgr:
        resume = await mgr.get_resume_from_epoch_id()
    assert resume == 1, f"epoch {resume} was committed after the job gave up on it; straggler: {straggler.events}"
    assert straggler.proc.returncode == 2 and straggler.of("error"), describe([straggler])


async def test_two_job_incarnations_racing_on_one_epoch(
    url: str, s3_bucket: str, s3_endpoint: str, s3_options: dict[str, Any], log_dir: Path
) -> None:
    nodes = ["n0", "n1", "n2", "n3"]
    seeds = {"jobA": 11, "jobB": 22}
    argses = [
        args
        for run_id, seed in seeds.items()
        for args in job_args(url, s3_endpoint, run_id, nodes, 2, seed, epochs=[0])
    ]
    done = await asyncio.to_thread(run_job, log_dir, argses)
    outcome: dict[str, set[str]] = {run_id: set() for run_id in seeds}
    for w in done:
        if w.proc.returncode == 0:
            assert [e["epoch"] for e in w.of("saved")] == [0]
            outcome[w.args["run_id"]].add("committed")
        else:
            assert w.proc.returncode == 2, describe([w])
            (error,) = w.of("error")
            assert error["type"] == "CheckpointConflictError", error
            outcome[w.args["run_id"]].add("conflict")
    assert sorted(map(tuple, outcome.values())) == [("committed",), ("conflict",)], describe(done)
    winner = next(run_id for run_id, seen in outcome.items() if seen == {"committed"})
    keys = await list_keys(s3_endpoint, s3_bucket, "job/")
    assert manifest_keys(keys) == ["job/epochs/000000000000/manifest.json"]
    manifest = await get_json(s3_endpoint, s3_bucket, "job/epochs/000000000000/manifest.json")
    assert manifest["writer_id"] == winner
    index = await get_json(s3_endpoint, s3_bucket, f"job/{manifest['index']['key']}")
    for node, record in index["nodes"].items():  # every shard comes from the winning job
        assert record["shard"].split("/")[2] == winner, (node, record)
    await check_epoch(url, s3_options, nodes, 0, seed=seeds[winner])
    async with MultiNodeCheckpointManager(url, storage_options=s3_options) as mgr:
        await mgr.gc(grace_period=0)  # the loser's objects go; the commit (manifest, index, decision) stays
    assert len(await list_keys(s3_endpoint, s3_bucket, "job/")) == 3 + 2 * len(nodes)
    await check_epoch(url, s3_options, nodes, 0, seed=seeds[winner])


async def test_elastic_restart_on_fewer_processes(
    url: str, s3_bucket: str, s3_endpoint: str, s3_options: dict[str, Any], log_dir: Path
) -> None:
    old_nodes = ["n0", "n1", "n2", "n3"]
    first = await asyncio.to_thread(
        run_job, log_dir / "old", job_args(url, s3_endpoint, "big", old_nodes, 4, seed=9, epochs=[0, 1])
    )
    assert [w.proc.returncode for w in first] == [0] * 4, describe(first)
    new_nodes = ["w0", "w1"]
    argses = job_args(url, s3_endpoint, "small", new_nodes, 2, seed=9, epochs=[2])
    for rank, args in enumerate(argses):  # each new process takes over two old nodes
        args["elastic"] = {"old_nodes": split_nodes(old_nodes, rank, 2)}
    second = await asyncio.to_thread(run_job, log_dir / "new", argses)
    assert [w.proc.returncode for w in second] == [0] * 2, describe(second)
    for w in second:
        (event,) = w.of("elastic")
        olds = w.args["elastic"]["old_nodes"]
        assert event["epoch"] == 1 and event["found"] and event["ok"], event
        assert event["nodes"] == sorted(olds)  # the partial-load stats name the old nodes read
        assert set(event["keys"]) >= {f"{old}/{blob}" for old in olds for blob in BLOBS}
    # the new job's epoch 2 holds the old nodes' state under the new layout
    async with MultiNodeCheckpointManager(url, storage_options=s3_options) as mgr:
        await mgr.init(new_nodes)
        await mgr.load(2)
        for rank, new in enumerate(new_nodes):
            ws = mgr.workspace(new)
            for old in split_nodes(old_nodes, rank, 2):
                restored = {blob: ws[f"{old}/{blob}"] for blob in BLOBS}
                assert same_state(restored, expected_state(9, old, 1)), (new, old)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_thirty_two_processes(
    url: str, s3_bucket: str, s3_endpoint: str, s3_options: dict[str, Any], log_dir: Path
) -> None:
    nodes = [f"n{i:02d}" for i in range(32)]
    argses = job_args(url, s3_endpoint, "wide", nodes, 32, seed=1, epochs=[0], commit_timeout=120.0)
    t0, wall0 = time.monotonic(), time.time()
    # 32 interpreters importing numpy and aioboto3 cost ~1 CPU-second each: ~20 s on 2 idle cores
    done = await asyncio.to_thread(run_job, log_dir, argses, startup=300.0, timeout=150.0)
    elapsed = time.monotonic() - t0
    assert [w.proc.returncode for w in done] == [0] * 32, describe(done)
    for w in done:
        (saved,) = w.of("saved")
        assert saved["nodes"] == sorted(w.args["local"])
    keys = await list_keys(s3_endpoint, s3_bucket, "job/")
    assert manifest_keys(keys) == ["job/epochs/000000000000/manifest.json"]
    await check_epoch(url, s3_options, nodes, 0, seed=1)
    ready = max(w.of("ready")[0]["t"] for w in done) - wall0
    committed = max(w.of("saved")[0]["t"] for w in done) - wall0
    print(
        f"32 processes: all ready after {ready:.1f} s, all saw the commit after {committed:.1f} s, "
        f"all exited after {elapsed:.1f} s"
    )


def test_worker_values_are_deterministic() -> None:
    a, b = expected_state(1, "n0", 3), expected_state(1, "n0", 3)
    assert same_state(a, b)
    assert not same_state(a, expected_state(2, "n0", 3))
    assert not same_state(a, expected_state(1, "n1", 3))


@pytest.mark.slow
def test_example_script(s3_bucket: str, s3_endpoint: str, tmp_path: Path) -> None:
    """examples/multiprocess_job.py: commits with plain multiprocessing, restarts, resumes."""
    script = Path(__file__).parents[2] / "examples" / "multiprocess_job.py"
    command = [sys.executable, str(script), "--url", f"s3://{s3_bucket}/example", "--endpoint-url", s3_endpoint]
    command += ["--processes", "2", "--nodes", "4", "--epochs", "2", "--mib-per-node", "0.05", "--timeout", "90"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        out, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, out
    lines = out.splitlines()
    assert lines[-1] == "PASS", out
    committed = [x.split("saved here: ")[1] for x in lines if "saw epoch 1 committed; saved here: " in x]
    assert sorted(node for x in committed for node in x.split(", ")) == ["node-0", "node-1", "node-2", "node-3"], out
    assert sum("resumed from epoch 1" in x for x in lines) == 2, out
