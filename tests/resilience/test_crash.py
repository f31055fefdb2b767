"""Crash consistency with real processes: a child saves through the fault proxy and is
SIGKILLed at a chosen moment of its second save; a fresh manager in the parent must
then see exactly the committed epochs, load them intact, and gc the leftovers.

The moments are pinned with the proxy's ``Hold`` rules (a held request has reached
the proxy, in full, and goes no further), so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aioboto3
import pytest
from aiobotocore.config import AioConfig

from asyncckpt import MiB, MultiNodeCheckpointManager, TransferConfig
from tests.support import crash_child
from tests.support.crash_child import NODES, assert_state_equal, crash_state
from tests.support.faultproxy import Exchange, FaultProxy, Hold, Request

CHILD = Path(crash_child.__file__)
SEED = 7
WAIT = 30.0  # bound of every wait
ROOT = "job"
EPOCH2 = f"/{ROOT}/epochs/000000000002/"


class Child:
    """The child job: started, read line by line (bounded waits), killed by its PID."""

    def __init__(self, args: list[str], stderr_path: Path, script: Path = CHILD):
        self._stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def expect(self, wanted: str, timeout: float = WAIT) -> None:
        """Wait for the line ``wanted``; fail with the child's stderr otherwise."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                line = "<timeout>"
            if line == wanted:
                return
            if line is None or line == "<timeout>":
                pytest.fail(f"child never printed {wanted!r} ({line or 'exited'}); stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        self._stderr.flush()
        return self._stderr_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=WAIT)

    def close(self) -> None:
        try:
            self.kill()
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self._reader.join(WAIT)
            self._stderr.close()


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_endpoint).start()
    try:
        yield proxy
    finally:
        proxy.stop()
    assert not proxy.errors, f"fault proxy failed internally: {proxy.errors!r}"


@pytest.fixture
async def s3_direct(s3_endpoint: str) -> AsyncIterator[Any]:
    config = AioConfig(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2})
    async with aioboto3.Session().client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", config=config) as c:
        yield c


async def bucket_view(client: Any, bucket: str, prefix: str) -> tuple[list[str], list[str]]:
    """(object keys, keys of unfinished multipart uploads) under ``prefix``, root-relative."""
    objects = await client.list_objects_v2(Bucket=bucket, Prefix=f"{ROOT}/{prefix}")
    uploads = await client.list_multipart_uploads(Bucket=bucket, Prefix=f"{ROOT}/{prefix}")
    strip = len(ROOT) + 1
    return (
        sorted(o["Key"][strip:] for o in objects.get("Contents", [])),
        sorted(u["Key"][strip:] for u in uploads.get("Uploads", [])),
    )


# -- where to stop the child's save of epoch 2 --------------------------------------


def _shard_upload_start(r: Request) -> bool:
    """A small node's shard PUT, or the big node's CreateMultipartUpload."""
    if EPOCH2 not in r.path or not r.path.endswith(".shard"):
        return False
    return (r.method == "PUT" and "uploadId=" not in r.query) or (r.method == "POST" and r.query == "uploads")


def _part(n: int) -> Callable[[Request], bool]:
    pattern = re.compile(rf"(^|&)partNumber={n}(&|$)")
    return lambda r: r.method == "PUT" and EPOCH2 in r.path and bool(pattern.search(r.query))


def _manifest_put(r: Request) -> bool:
    return r.method == "PUT" and r.path.endswith(EPOCH2 + "manifest.json")


def _decision_put(r: Request) -> bool:
    return r.method == "PUT" and EPOCH2 in r.path and r.path.endswith(".decision")


def _part_done(n: int) -> Callable[[list[Exchange]], bool]:
    is_part = _part(n)
    return lambda log: any(e.status == 200 and is_part(Request(e.method, e.path, e.query, {})) for e in log)


# point: (hold predicate or None, what happens to the held request,
#         is epoch 2 committed before gc, and after gc)
CRASH_POINTS: dict[str, tuple[Callable[[Request], bool] | None, bool, bool, bool]] = {
    "before-shard-uploads": (_shard_upload_start, False, False, False),
    "during-shard-uploads": (_part(2), False, False, False),
    "before-decision": (_decision_put, False, False, False),
    "decision-lands-after-death": (_decision_put, True, False, True),  # gc completes the commit
    "before-manifest": (_manifest_put, False, False, True),  # gc completes the commit
    "commit-lands-after-death": (_manifest_put, True, True, True),
    "after-commit": (None, False, True, True),
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
async def test_sigkill_during_save_leaves_a_consistent_checkpoint(
    point: str,
    proxy: FaultProxy,
    s3_bucket: str,
    s3_options: dict[str, Any],
    s3_direct: Any,
    tmp_path: Path,
) -> None:
    predicate, forward_held, committed, committed_after_gc = CRASH_POINTS[point]
    hold = Hold(timeout=2 * WAIT)
    if predicate is not None:
        proxy.add_rule(predicate, hold)
    url = f"s3://{s3_bucket}/{ROOT}"
    child = Child([proxy.url, url, str(SEED), "1", "2"], tmp_path / "child.stderr")
    try:
        child.expect("SAVED 1")
        if predicate is None:
            child.expect("SAVED 2")  # save returned: the commit is durable
        else:
            assert await asyncio.to_thread(hold.arrived.wait, WAIT), f"no held request; stderr:\n{child.stderr()}"
            if point == "during-shard-uploads":  # part 1 went through, part 2 is held
                assert await asyncio.to_thread(proxy.wait_for, _part_done(1), WAIT)
        child.kill()
    finally:
        hold.release(forward=forward_held)
        child.close()
    assert await asyncio.to_thread(proxy.wait_idle, WAIT), "requests of the dead child still in the proxy"

    epoch2_before, uploads_before = await bucket_view(s3_direct, s3_bucket, "epochs/000000000002/")
    if point == "during-shard-uploads":
        assert uploads_before and all(k.endswith("/trainer_0.shard") for k in uploads_before), uploads_before
    if point == "before-shard-uploads":
        assert epoch2_before == [] and uploads_before == []
    if point == "before-decision":  # the shards and the index, no verdict
        assert len(epoch2_before) == len(NODES) + 1 and not any(k.endswith(".decision") for k in epoch2_before)
    if point == "before-manifest":  # the shards, the index and the commit decision, no manifest
        assert len(epoch2_before) == len(NODES) + 2 and not any(k.endswith("manifest.json") for k in epoch2_before)

    config = TransferConfig(part_size=5 * MiB, range_size=5 * MiB)
    async with MultiNodeCheckpointManager(url, storage_options=s3_options, config=config) as mgr:
        await mgr.init(list(NODES))

        async def check_committed() -> None:
            last = 2 if committed else 1
            assert await mgr.get_resume_from_epoch_id() == last
            assert await mgr.committed_epochs() == list(range(1, last + 1))
            assert await mgr.cp_accessible(1)
            assert await mgr.cp_accessible(2) is committed
            for epoch in range(1, last + 1):
                for node in NODES:
                    mgr.workspace(node).clear()
                await mgr.load(epoch)
                want = crash_state(SEED, epoch)
                for node in NODES:
                    assert_state_equal(dict(mgr.workspace(node)), want[node], f"{point}: epoch {epoch} {node}")

        await check_committed()
        epoch1_before, _ = await bucket_view(s3_direct, s3_bucket, "epochs/000000000001/")

        report = await mgr.gc(grace_period=0)
        epoch2_after, uploads_after = await bucket_view(s3_direct, s3_bucket, "epochs/000000000002/")
        assert uploads_after == []
        assert sorted(report.aborted_uploads) == uploads_before
        if committed:  # gc keeps what the manifest names (the dead child's own attempt)
            assert epoch2_after == epoch2_before and report.deleted == []
        elif committed_after_gc:  # the child had decided to commit: gc published its manifest
            assert report.completed_epochs == [2] and report.deleted == []
            assert set(epoch2_after) == {*epoch2_before, "epochs/000000000002/manifest.json"}
        else:  # every object of the killed save is garbage; gc's claim on it stays
            claims = [k for k in epoch2_after if k.endswith(".decision")]
            assert sorted(report.deleted) == sorted(set(epoch2_before) - set(claims))
            assert len(claims) == (1 if epoch2_before else 0) and set(epoch2_after) == set(claims)
        assert (await bucket_view(s3_direct, s3_bucket, "epochs/000000000001/"))[0] == epoch1_before
        committed = committed_after_gc
        await check_committed()
