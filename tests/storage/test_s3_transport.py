"""The S3 backend's transport: what it sets up per client and how it sends bodies."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asyncckpt.config import MiB, TransferConfig
from asyncckpt.storage import ByteBudget, ObjectInfo, S3Storage, collect_request_stats
from asyncckpt.storage._s3_upload import BufferBody, single_put_max
from asyncckpt.testing.s3_server import REGION, admin_client, delete_bucket, new_bucket_name
from asyncckpt.testing.storage_suite import payload
from tests.support.faultproxy import CutBody, FaultProxy, Truncate

#: The smallest legal parts, so that a one-PUT object and a multipart one stay small.
PARTS = TransferConfig(part_size=5 * MiB, max_bytes_in_flight=20 * MiB, max_attempts=3)


@pytest.fixture
def ca_bundle_loads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every CA bundle an SSL context loads (what building one for a client costs)."""
    loads: list[object] = []
    original = ssl.SSLContext.load_verify_locations

    def spy(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(args or kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", spy)
    return loads


@pytest.mark.parametrize(("verify", "builds_tls"), [(None, False), (True, True)])
async def test_an_http_endpoint_builds_no_tls_context_unless_asked(
    s3_endpoint: str, s3_admin_session: Any, ca_bundle_loads: list[object], verify: bool | None, builds_tls: bool
) -> None:
    assert s3_endpoint.startswith("http://")
    options: dict[str, Any] = {"endpoint_url": s3_endpoint, "region_name": REGION, "addressing_style": "path"}
    if verify is not None:
        options["verify"] = verify
    async with admin_client(s3_admin_session, s3_endpoint) as client:
        bucket = new_bucket_name()
        await client.create_bucket(Bucket=bucket)
        try:
            ca_bundle_loads.clear()
            async with S3Storage(bucket, options=options) as storage:
                await storage.put("k", b"v")
                assert await storage.get("k") == b"v"
            assert bool(ca_bundle_loads) is builds_tls
        finally:
            await delete_bucket(client, bucket)


def test_a_buffer_body_reads_seeks_and_streams_across_its_pieces() -> None:
    pieces = [b"abc", bytearray(b""), memoryview(b"0123456789")[2:7], b"x" * 600_000]
    whole = b"".join(bytes(p) for p in pieces)
    body = BufferBody(*pieces)
    assert len(body) == len(whole)
    assert body.read(4) == whole[:4]
    assert (body.tell(), len(body)) == (4, len(whole) - 4)
    assert body.read() == whole[4:]
    body.seek(2)

    async def streamed() -> bytes:
        return b"".join([bytes(chunk) async for chunk in body])

    assert asyncio.run(streamed()) == whole[2:]
    assert asyncio.run(streamed()) == whole[2:]  # an async iteration consumes nothing: a retry resends
    assert body.seek(0, 2) == len(whole) and body.read() == b""


@pytest.fixture
async def s3(s3_bucket: str, s3_options: dict[str, Any]) -> AsyncIterator[S3Storage]:
    async with S3Storage(s3_bucket, "p", options=s3_options, config=PARTS) as storage:
        yield storage


async def write_lent(storage: S3Storage, key: str, data: bytes, budget: ByteBudget, hint: int | None) -> ObjectInfo:
    """``data`` as node.py writes a shard: a small copied header, lent arrays, a small copied trailer."""
    view = memoryview(data)
    async with storage.writer(key, budget=budget, size_hint=hint) as writer:
        await writer.write(view[:100])
        for start in range(100, len(data) - 100, 3 * MiB):
            await writer.write_borrowed(view[start : min(start + 3 * MiB, len(data) - 100)])
        await writer.write(view[len(data) - 100 :])
        return await writer.commit()


async def test_a_hinted_object_up_to_the_single_put_size_is_one_put_of_lent_memory(s3: S3Storage) -> None:
    data = payload(single_put_max(PARTS), seed=1)
    budget = WatchedBudget(PARTS.max_bytes_in_flight)
    with collect_request_stats() as stats:
        await write_lent(s3, "one", data, budget, len(data))
    assert (stats.requests, stats.bytes_sent) == (1, len(data))
    assert budget.most_leased == 0  # the header and trailer are small copies, the rest is lent
    info = await s3.head("one")
    assert info is not None and info.etag is not None and "-" not in info.etag  # not multipart
    assert await s3.get("one") == data


async def test_a_larger_hinted_object_goes_up_in_parts_cut_from_lent_memory(s3: S3Storage) -> None:
    data = payload(single_put_max(PARTS) + 1, seed=2)
    budget = WatchedBudget(PARTS.max_bytes_in_flight)
    with collect_request_stats() as stats:
        await write_lent(s3, "parts", data, budget, len(data))
    parts = len(data) // PARTS.part_size  # 4 parts: the byte over joins the last one
    assert (stats.requests, stats.bytes_sent) == (parts + 2, len(data))  # create, parts, complete
    assert budget.most_leased == 0
    info = await s3.head("parts")
    assert info is not None and info.etag is not None and info.etag.strip('"').endswith(f"-{parts}")
    assert await s3.get("parts") == data
    assert await s3.list_pending_uploads() == []


async def test_an_object_that_outgrows_its_one_put_hint_is_multipart_and_whole(s3: S3Storage) -> None:
    data = payload(3 * PARTS.part_size, seed=3)
    budget = ByteBudget(PARTS.max_bytes_in_flight)
    for copied in (False, True):
        async with s3.writer("grown", budget=budget, size_hint=MiB) as writer:
            for start in range(0, len(data), MiB):
                piece = memoryview(data)[start : start + MiB]
                await (writer.write(piece) if copied else writer.write_borrowed(piece))
            await writer.commit()
        info = await s3.head("grown")
        assert info is not None and info.etag is not None and info.etag.strip('"').endswith("-3")
        assert await s3.get("grown") == data
        assert budget.in_use == 0


@pytest.mark.parametrize("hint", [None, 100, MiB, 3 * PARTS.part_size])
async def test_a_budget_of_one_part_never_deadlocks_a_writer(s3: S3Storage, hint: int | None) -> None:
    # the budget fits one buffer and nothing else: the writer must never wait for a
    # buffer while it holds one (a small copy first, a hint outgrown, a one-PUT object)
    data = payload(3 * PARTS.part_size, seed=5)
    budget = ByteBudget(PARTS.part_size)
    async with s3.writer("tight", budget=budget, size_hint=hint) as writer:
        await asyncio.wait_for(writer.write(data[:100]), 60)  # (a bound, not a timing: a deadlock fails)
        for start in range(100, len(data), 2 * MiB):
            await asyncio.wait_for(writer.write(data[start : start + 2 * MiB]), 60)
        await asyncio.wait_for(writer.commit(), 60)
    assert budget.in_use == 0
    assert await s3.get("tight") == data


@pytest.mark.parametrize("size", [PARTS.part_size, single_put_max(PARTS) + 1])
async def test_a_connection_cut_mid_upload_is_retried_from_the_lent_memory(
    s3_endpoint: str, s3_bucket: str, size: int
) -> None:
    data = payload(size, seed=4)
    options = {"endpoint_url": "", "region_name": REGION, "addressing_style": "path"}
    with FaultProxy(s3_endpoint) as proxy:
        options["endpoint_url"] = proxy.url
        # the first PUT with a body (the one PUT, or the first part) is cut after 1 MiB
        proxy.add_rule(lambda r: r.method == "PUT", CutBody(MiB), times=1)
        async with S3Storage(s3_bucket, "p", options=options, config=PARTS) as storage:
            with collect_request_stats() as stats:
                await write_lent(storage, "cut", data, ByteBudget(PARTS.max_bytes_in_flight), size)
            assert [e.outcome for e in proxy.log].count("cut-body") == 1
            assert stats.retries == 1
            assert await storage.get("cut") == data
            assert await storage.list_pending_uploads() == []


class WatchedBudget(ByteBudget):
    """A budget that remembers the most bytes it had leased out at once."""

    most_leased = 0

    async def lease(self, size: int) -> Any:
        buf = await super().lease(size)
        self.most_leased = max(self.most_leased, self.in_use)
        return buf


async def test_a_scatter_read_is_one_ranged_get(s3: S3Storage) -> None:
    data = payload(3 * MiB, seed=6)
    await s3.put("scatter", data)
    buffers = [bytearray(size) for size in (100, 0, MiB + 1, 7, MiB)]
    with collect_request_stats() as stats:
        await s3.read_scatter("scatter", [memoryview(b) for b in buffers], 10)
    assert (stats.requests, stats.bytes_received) == (1, sum(map(len, buffers)))
    assert b"".join(buffers) == data[10 : 10 + sum(map(len, buffers))]


async def test_a_scatter_read_cut_mid_body_goes_on_into_the_right_view(s3_endpoint: str, s3_bucket: str) -> None:
    data = payload(2 * MiB + 333, seed=7)
    options = {"endpoint_url": "", "region_name": REGION, "addressing_style": "path"}
    sizes = [1, 1000, 0, 64 * 1024 + 3, MiB - 5, 12345]
    sizes.append(len(data) - 2 - sum(sizes))
    with FaultProxy(s3_endpoint, seed=11) as proxy:
        options["endpoint_url"] = proxy.url
        async with S3Storage(s3_bucket, "p", options=options, config=PARTS) as storage:
            await storage.put("cut", data)
            for _ in range(5):  # five cuts, each at another byte: a resume into each kind of place
                proxy.add_rule(lambda r: r.method == "GET", Truncate(), times=1)
                buffers = [bytearray(size) for size in sizes]
                with collect_request_stats() as stats:
                    await storage.read_scatter("cut", [memoryview(b) for b in buffers], 2)
                assert (stats.requests, stats.retries) == (2, 1)  # the cut one, and the rest
                assert b"".join(buffers) == data[2:]
        assert [e.outcome for e in proxy.log].count("truncate") == 5
