"""collect_request_stats: collectors nest, and an outer one counts every request made inside
it, those of the library's own per-node collectors included (checked against the requests
an S3 server logs)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from asyncckpt import MultiNodeCheckpointManager
from asyncckpt.storage import MemoryStorage, collect_request_stats, drop_memory_store
from asyncckpt.testing.s3_server import BODY_LOG_PREFIX, SubprocessS3Server, new_bucket_name


async def test_nested_collectors_each_count_every_request_made_inside_them() -> None:
    name = f"stats-{uuid.uuid4().hex[:8]}"
    try:
        async with MemoryStorage(name) as storage:
            with collect_request_stats() as outer:
                await storage.put("before", b"x" * 10)
                with collect_request_stats() as inner:
                    async with asyncio.TaskGroup() as tg:  # tasks inherit both collectors
                        for i in range(3):
                            tg.create_task(storage.put(f"inner/{i}", b"y" * 5))
                    with collect_request_stats() as innermost:
                        await storage.get("before")
                await storage.head("before")
            await storage.head("after")  # outside every collector
    finally:
        drop_memory_store(name)
    assert (innermost.requests, innermost.bytes_received) == (1, 10)
    assert (inner.requests, inner.bytes_sent, inner.objects_written, inner.bytes_received) == (4, 15, 3, 10)
    assert (outer.requests, outer.bytes_sent, outer.objects_written, outer.bytes_received) == (6, 25, 4, 10)


def server_requests(server: SubprocessS3Server) -> int:
    """The requests the server has answered so far (one log line each)."""
    lines = server.log_path.read_text(errors="replace").splitlines()
    return sum(1 for line in lines if line.startswith(BODY_LOG_PREFIX))


@pytest.fixture(scope="module")
def logging_s3_server(aws_environment: None) -> Iterator[SubprocessS3Server]:
    """An S3 server of this module's own that logs every request it answers."""
    with SubprocessS3Server() as server:
        yield server


async def test_an_outer_collector_counts_every_request_of_a_four_node_save(
    logging_s3_server: SubprocessS3Server, tmp_path: Path
) -> None:
    server = logging_s3_server
    bucket = new_bucket_name()
    async with server.admin_client() as admin:
        await admin.create_bucket(Bucket=bucket)
    workspaces = {f"trainer_{i}": {"weights": np.full(1000, i, dtype=np.float32), "step": i} for i in range(4)}
    async with MultiNodeCheckpointManager(f"s3://{bucket}/ckpt", storage_options=server.storage_options) as mgr:
        await mgr.init(workspaces)
        before = server_requests(server)
        with collect_request_stats() as stats:
            await mgr.save(1)
        made = server_requests(server) - before
    assert made >= 4 + 2  # a shard per node, and the commit's objects
    assert stats.requests == made
    assert stats.objects_written >= 4
