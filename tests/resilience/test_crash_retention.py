"""SIGKILL during a retention delete of an incremental job never leaves an unloadable
committed epoch.

The child (tests/support/retention_child.py) saves three epochs with keep_last=1; every
epoch points at epoch 1's shard of its frozen node. A first run counts the requests of the
retention delete that follows the commit of epoch 3; then, for a few points drawn from
that range (seeded), the child is killed while the fault proxy holds that request (which
is then dropped or forwarded after the death). A fresh manager must load every committed
epoch bit-exact, before and after gc.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncckpt import MultiNodeCheckpointManager
from tests.resilience.test_crash import WAIT, Child
from tests.support import retention_child
from tests.support.asserts import assert_same
from tests.support.faultproxy import FaultProxy, Hold, Request
from tests.support.retention_child import retention_state

CHILD = Path(retention_child.__file__)
KILLS = 4
EPOCH3_MANIFEST = "/epochs/000000000003/manifest.json"


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_endpoint).start()
    try:
        yield proxy
    finally:
        proxy.stop()
    assert not proxy.errors, f"fault proxy failed internally: {proxy.errors!r}"


class AfterCommitOfEpoch3:
    """Matches the ``n``-th request after the PUT of epoch 3's manifest (the retention
    delete of epochs 1 and 2 follows it), counting requests as the proxy sees them."""

    def __init__(self, n: int):
        self.n, self.seen, self.after = n, False, 0

    def __call__(self, r: Request) -> bool:
        if not self.seen:
            self.seen = r.method == "PUT" and r.path.endswith(EPOCH3_MANIFEST)
            return False
        self.after += 1
        return self.after == self.n


async def check_every_committed_epoch_loads(url: str, options: dict[str, Any], where: str) -> list[int]:
    async with MultiNodeCheckpointManager(url, storage_options=options) as mgr:
        await mgr.init({node: {} for node in ("frozen", "trained")})
        committed = await mgr.committed_epochs()
        assert committed, f"{where}: no committed epoch"
        for _ in range(2):  # as the child left it, and after gc
            for epoch in committed:
                assert await mgr.cp_accessible(epoch), f"{where}: epoch {epoch} is not intact"
                await mgr.load(epoch)
                for node, blobs in retention_state(epoch).items():
                    assert_same(dict(mgr.workspace(node)), blobs, f"{where}: epoch {epoch} {node}")
            await mgr.gc(grace_period=0)
            assert await mgr.committed_epochs() == committed
        return committed


async def test_sigkill_at_random_points_of_a_retention_delete_leaves_every_committed_epoch_loadable(
    proxy: FaultProxy, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    # a run to its end: how many requests the delete after epoch 3's commit makes
    url = f"s3://{s3_bucket}/measure"
    child = Child([proxy.url, url, "3"], tmp_path / "measure.stderr", CHILD)
    try:
        child.expect("DONE")
    finally:
        child.close()
    log = list(proxy.log)
    start = next(i for i, e in enumerate(log) if e.method == "PUT" and e.path.endswith(EPOCH3_MANIFEST))
    span = len(log) - start - 1
    assert span >= 5, f"the retention delete made only {span} requests"
    assert await check_every_committed_epoch_loads(url, s3_options, "no kill") == [3]

    points = sorted(random.Random(13).sample(range(1, span + 1), min(KILLS, span)))
    for n, point in enumerate(points):
        url = f"s3://{s3_bucket}/kill-{point}"
        hold = Hold(timeout=2 * WAIT)
        proxy.clear_rules()
        proxy.add_rule(AfterCommitOfEpoch3(point), hold, times=1)
        child = Child([proxy.url, url, "3"], tmp_path / f"kill-{point}.stderr", CHILD)
        try:
            child.expect("SAVED 2")
            assert await asyncio.to_thread(hold.arrived.wait, WAIT), f"request {point} never came: {child.stderr()}"
            child.kill()
        finally:
            hold.release(forward=n % 2 == 1)  # dropped, or landing after the death
            child.close()
        assert await asyncio.to_thread(proxy.wait_idle, WAIT), "requests of the dead child still in the proxy"
        committed = await check_every_committed_epoch_loads(url, s3_options, f"killed at request {point}")
        assert committed[-1] == 3 and set(committed) <= {1, 2, 3}
