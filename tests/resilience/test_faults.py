"""The manager against a misbehaving network: a fault-injecting proxy in front of moto.

Every test talks to moto THROUGH :class:`faultproxy.FaultProxy`; what the manager
wrote is checked either through the proxy or with a client/manager straight on moto.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aioboto3
import pytest
from aiobotocore.config import AioConfig

from asyncckpt import MiB, MultiNodeCheckpointManager, StorageError, TransferConfig
from tests.support.crash_child import NODES, assert_state_equal, make_state
from tests.support.faultproxy import FaultProxy, ForwardThenReset, Hold, Request, Respond, Truncate

SEED = 20261126
SECRET = "supersecret-DO-NOT-PRINT"


@pytest.fixture
def make_proxy(s3_endpoint: str) -> Iterator[Callable[..., FaultProxy]]:
    """Start fault proxies in front of the test endpoint; all are stopped at the end,
    and none may have failed internally."""
    proxies: list[FaultProxy] = []

    def make(**kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(s3_endpoint, **kwargs).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
    for proxy in proxies:
        assert not proxy.errors, f"fault proxy failed internally: {proxy.errors!r}"


@pytest.fixture
async def s3_direct(s3_endpoint: str) -> AsyncIterator[Any]:
    """A plain aioboto3 client straight on moto (no proxy), to inspect the bucket."""
    config = AioConfig(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2})
    async with aioboto3.Session().client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", config=config) as c:
        yield c


def through(proxy: FaultProxy, s3_options: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**s3_options, "endpoint_url": proxy.url, **extra}


def fill(mgr: MultiNodeCheckpointManager, state: dict[str, dict[str, Any]]) -> None:
    for node, blobs in state.items():
        mgr.workspace(node).clear()
        mgr.workspace(node).update(blobs)


async def load_and_check(mgr: MultiNodeCheckpointManager, epoch: int, seed: int, **state_kw: Any) -> None:
    for node in mgr.nodes:
        mgr.workspace(node).clear()
    await mgr.load(epoch)
    want = make_state(seed, epoch, **state_kw)
    for node in mgr.nodes:
        assert_state_equal(dict(mgr.workspace(node)), want[node], f"epoch {epoch} node {node}")


def node_retries(report: dict[str, Any]) -> int:
    return sum(n["retries"] for n in report["nodes"].values())


async def keys_under(client: Any, bucket: str, prefix: str) -> list[str]:
    response = await client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for item in response.get("Contents", [])]


def is_shard_write(epoch: int) -> Callable[[Request], bool]:
    return lambda r: r.method == "PUT" and f"/epochs/{epoch:012d}/" in r.path and r.path.endswith(".shard")


# ---------------------------------------------------------------------------- the proxy itself


async def test_fault_proxy_is_seeded_kind_filtered_and_capped(
    make_proxy: Callable[..., FaultProxy], s3_bucket: str
) -> None:
    """Same seed, same sequential requests: same faults; only enabled kinds; at most
    ``max_faults`` of them; HEAD answers keep the object's Content-Length."""
    outcomes = []
    for _ in range(2):
        proxy = make_proxy(seed=5, rate=0.5, kinds=("500", "503"), max_faults=4)
        config = AioConfig(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 0})
        async with aioboto3.Session().client("s3", endpoint_url=proxy.url, region_name="us-east-1", config=config) as c:
            seen = []
            for i in range(12):
                try:
                    await c.put_object(Bucket=s3_bucket, Key=f"k{i}", Body=b"x" * (i + 1))
                    seen.append((await c.head_object(Bucket=s3_bucket, Key=f"k{i}"))["ContentLength"])
                except c.exceptions.ClientError as exc:
                    seen.append(exc.response["Error"]["Code"])
        assert set(proxy.faults) <= {"500", "503"} and sum(proxy.faults.values()) == 4, proxy.summary()
        assert all(isinstance(x, int) or x in ("InternalError", "SlowDown", "500", "503") for x in seen), seen
        assert all(x == i + 1 for i, x in enumerate(seen) if isinstance(x, int)), seen  # HEAD sizes
        outcomes.append(seen)
    assert outcomes[0] == outcomes[1]


# ---------------------------------------------------------------------------- a regression


async def test_large_upload_raises_no_resource_warning(s3_bucket: str, s3_options: dict[str, Any]) -> None:
    """A 2 MiB shard straight to moto (no proxy, no faults) saves under the project's
    warnings-are-errors filter. (It used to fail: S3Storage.put/_upload_part passed the
    body as raw bytes/bytearray, aiohttp warned "Sending a large body directly with raw
    bytes...", aiobotocore wrapped the raised warning as HTTPClientError, botocore
    retried it, and the save failed with StorageError.)"""
    config = TransferConfig(max_attempts=1)
    async with MultiNodeCheckpointManager(f"s3://{s3_bucket}/big", storage_options=s3_options, config=config) as mgr:
        await mgr.init({"n": {"a": make_state(SEED, 1, big_bytes=2 * MiB)["trainer_0"]["weights"]}})
        await mgr.save(1)
        assert await mgr.cp_accessible(1)


# ---------------------------------------------------------------------------- random faults


# a shard of 22 MiB goes up in 4 parts, one of 6 MiB in one PUT
@pytest.mark.parametrize(("retry_mode", "epochs", "big_mib"), [("standard", 3, 22), ("adaptive", 1, 6)])
async def test_saves_and_loads_survive_random_faults(
    retry_mode: str,
    epochs: int,
    big_mib: int,
    make_proxy: Callable[..., FaultProxy],
    s3_bucket: str,
    s3_options: dict[str, Any],
) -> None:
    """10% of requests fail (reset, 500, 503 SlowDown, truncated GET body) or are
    delayed; every save and load still succeeds with identical bytes. On top of the
    random faults, one shard write and one shard read fail for sure, so that the
    reported retries are deterministic."""
    proxy = make_proxy(seed=SEED, rate=0.10, max_delay=0.05)
    proxy.add_rule(lambda r: r.method == "PUT" and "/trainer_0.shard" in r.path, Respond(500, "InternalError"), times=1)
    config = TransferConfig(part_size=5 * MiB, range_size=5 * MiB, retry_mode=retry_mode, max_attempts=8)
    size = {"big_bytes": big_mib * MiB}
    url = f"s3://{s3_bucket}/faulty"
    save_retries: dict[int, int] = {}
    load_retries: dict[int, int] = {}
    async with MultiNodeCheckpointManager(url, storage_options=through(proxy, s3_options), config=config) as mgr:
        await mgr.init(list(NODES))
        for epoch in range(1, epochs + 1):
            fill(mgr, make_state(SEED, epoch, **size))
            await mgr.save(epoch)
            save_retries[epoch] = node_retries(await mgr.report_checkpoint_stats("checkpoint_save"))
        # the sure read faults, for the loads (an incremental save reads shard tails too)
        # (not a reset: aiohttp itself silently retries an idempotent request whose reused
        # keep-alive connection was reset, so botocore would not count that retry)
        proxy.add_rule(
            lambda r: r.method == "GET" and r.path.endswith("/ps_0.shard"), Respond(500, "InternalError"), times=1
        )
        # a body that breaks off mid-stream: asyncckpt re-requests the rest itself
        truncated = proxy.add_rule(
            lambda r: r.method == "GET" and r.path.endswith("/trainer_0.shard"), Truncate(), times=1
        )
        assert await mgr.get_resume_from_epoch_id() == epochs
        for epoch in range(1, epochs + 1):
            await load_and_check(mgr, epoch, SEED, **size)
            load_retries[epoch] = node_retries(await mgr.report_checkpoint_stats("checkpoint_load"))
            assert await mgr.cp_accessible(epoch)

    assert sum(proxy.faults[k] for k in ("reset", "500", "503", "truncate")) > 0, proxy.summary()
    assert save_retries[1] >= 1 and load_retries[1] >= 2, (save_retries, load_retries, proxy.summary())
    assert truncated.hits == 1 and proxy.faults["truncate"] >= 1

    # what is stored is exactly what was saved, read without the proxy
    async with MultiNodeCheckpointManager(url, storage_options=s3_options, config=config) as fresh:
        await fresh.init(list(NODES))
        assert await fresh.get_resume_from_epoch_id() == epochs
        for epoch in range(1, epochs + 1):
            await load_and_check(fresh, epoch, SEED, **size)


# ---------------------------------------------------------------------------- the commit


async def test_lost_response_to_manifest_put_is_success(
    make_proxy: Callable[..., FaultProxy], s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    """The manifest PUT takes effect but its response is lost; botocore retries, the
    create-only retry gets 412, and the manager recognises its own manifest."""
    proxy = make_proxy()
    is_manifest_put = lambda r: r.method == "PUT" and r.path.endswith("/manifest.json")  # noqa: E731
    rule = proxy.add_rule(is_manifest_put, ForwardThenReset(), times=1)
    config = TransferConfig(part_size=5 * MiB, max_attempts=4)
    url = f"s3://{s3_bucket}/lost-response"
    async with MultiNodeCheckpointManager(url, storage_options=through(proxy, s3_options), config=config) as mgr:
        await mgr.init(list(NODES))
        fill(mgr, make_state(SEED, 1, big_bytes=MiB // 2))
        await mgr.save(1)
        assert await mgr.cp_accessible(1)

    assert rule.hits == 1
    puts = [(e.status, e.outcome) for e in proxy.log if e.method == "PUT" and e.path.endswith("/manifest.json")]
    assert puts == [(None, "forward-reset"), (412, "forwarded")], puts
    async with MultiNodeCheckpointManager(url, storage_options=s3_options) as fresh:
        await fresh.init(list(NODES))
        assert await fresh.get_resume_from_epoch_id() == 1
        await load_and_check(fresh, 1, SEED, big_bytes=MiB // 2)


async def test_lost_responses_of_shard_writes(
    make_proxy: Callable[..., FaultProxy], s3_bucket: str, s3_options: dict[str, Any], s3_direct: Any
) -> None:
    """Each kind of shard write takes effect once but its response is lost (then the
    retry goes through): PUT, CreateMultipartUpload, UploadPart, CompleteMultipartUpload
    and the index and create-only decision PUTs. The save succeeds; the orphaned upload of the lost
    CreateMultipartUpload is gc's job; the epoch loads before and after gc."""
    proxy = make_proxy()
    lost = {
        "put": lambda r: r.method == "PUT" and r.path.endswith("/ps_0.shard"),
        "create": lambda r: r.method == "POST" and r.query == "uploads",
        "part": lambda r: r.method == "PUT" and "partNumber=1&" in r.query + "&",
        "complete": lambda r: r.method == "POST" and "uploadId=" in r.query,
        "index": lambda r: r.method == "PUT" and r.path.endswith("/index.json"),
        "decision": lambda r: r.method == "PUT" and r.path.endswith(".decision"),
    }
    rules = {name: proxy.add_rule(predicate, ForwardThenReset(), times=1) for name, predicate in lost.items()}
    config = TransferConfig(part_size=5 * MiB, range_size=5 * MiB, max_attempts=4)
    url = f"s3://{s3_bucket}/lost-writes"
    size = {"big_bytes": 22 * MiB}  # past one PUT's 4 parts: 4 parts (a rest of up to a quarter part joins the last)
    async with MultiNodeCheckpointManager(url, storage_options=through(proxy, s3_options), config=config) as mgr:
        await mgr.init(list(NODES))
        fill(mgr, make_state(SEED, 1, **size))
        await mgr.save(1)
        assert {name: rule.hits for name, rule in rules.items()} == dict.fromkeys(lost, 1)
        await load_and_check(mgr, 1, SEED, **size)

        orphans = (await s3_direct.list_multipart_uploads(Bucket=s3_bucket)).get("Uploads", [])
        assert [u["Key"].rsplit("/", 1)[1] for u in orphans] == ["trainer_0.shard"], orphans
        report = await mgr.gc(grace_period=0)
        assert report.deleted == [] and len(report.aborted_uploads) == 1, report
        assert not (await s3_direct.list_multipart_uploads(Bucket=s3_bucket)).get("Uploads")
        await load_and_check(mgr, 1, SEED, **size)


# ---------------------------------------------------------------------------- credentials


@pytest.mark.parametrize("scope", ["all", "writes"])
@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch"])
async def test_wrong_credentials_never_leak_the_secret(
    code: str,
    scope: str,
    make_proxy: Callable[..., FaultProxy],
    s3_bucket: str,
    s3_options: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A save whose requests are refused for their credentials fails with a StorageError
    naming the failure, and the secret key appears in no error, traceback, repr or log.

    ``all``: every request is signed with a key the server does not know. ``writes``: the
    keys are valid, so reads pass on any server (a real one checks them on reads too), and
    every write is refused as if its key were bad: the probe reads, each node's upload fails.
    """
    if scope == "all":
        key_id, secret = "BADKEY", SECRET
    else:
        key_id, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    proxy = make_proxy()
    proxy.add_rule(
        lambda r: (r.access_key_id == "BADKEY") if scope == "all" else (r.method in ("PUT", "POST")),
        Respond(403, code, "The credentials you provided are not valid."),
    )
    options = through(proxy, s3_options, aws_access_key_id=key_id, aws_secret_access_key=secret)
    caplog.set_level(logging.DEBUG, logger="asyncckpt")
    async with MultiNodeCheckpointManager(f"s3://{s3_bucket}/denied", storage_options=options) as mgr:
        await mgr.init(list(NODES))
        fill(mgr, make_state(SEED, 1, big_bytes=64 * 1024))
        with pytest.raises(StorageError) as info:
            await mgr.save(1)
        exc = info.value
        assert isinstance(exc, OSError)
        if scope == "all":
            assert not await mgr.cp_accessible()
            assert exc.code in (code, "AccessDenied"), (
                exc.code,
                str(exc),
            )  # a HEAD's bare 403 is reported as AccessDenied
        else:  # the probe may read; every node's upload is denied
            assert set(exc.failures) == set(NODES), exc.failures
            for node, cause in exc.failures.items():
                assert isinstance(cause, StorageError) and cause.code == code, (node, cause)
                assert node in str(exc)
            assert await mgr.get_resume_from_epoch_id() is None
        assert not await mgr.cp_accessible(1)
        texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc)), repr(mgr)]
        for cause in exc.failures.values():
            texts += [str(cause), repr(cause), "".join(traceback.format_exception(cause))]
        texts += [record.getMessage() for record in caplog.records]
        for text in texts:
            assert secret not in text
    assert proxy.requests > 0 and not any(e.status == 200 and e.method == "PUT" for e in proxy.log)


# ---------------------------------------------------------------------------- timeouts


async def test_request_past_read_timeout_is_retried(
    make_proxy: Callable[..., FaultProxy], s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    """One shard PUT never gets an answer within ``read_timeout``: botocore gives up on
    it and retries; the save succeeds. The held request is dropped afterwards."""
    proxy = make_proxy()
    hold = Hold(timeout=30)
    rule = proxy.add_rule(is_shard_write(1), hold, times=1)
    config = TransferConfig(part_size=5 * MiB, read_timeout=1.0, max_attempts=5)
    url = f"s3://{s3_bucket}/timeouts"
    try:
        async with MultiNodeCheckpointManager(url, storage_options=through(proxy, s3_options), config=config) as mgr:
            await mgr.init(list(NODES))
            fill(mgr, make_state(SEED, 1, big_bytes=MiB // 2))
            await mgr.save(1)
            report = await mgr.report_checkpoint_stats("checkpoint_save")
    finally:
        hold.release(forward=False)
    assert hold.arrived.is_set() and rule.hits == 1 and hold.held == 1
    assert node_retries(report) >= 1, report
    async with MultiNodeCheckpointManager(url, storage_options=s3_options) as fresh:
        await fresh.init(list(NODES))
        await load_and_check(fresh, 1, SEED, big_bytes=MiB // 2)


# ---------------------------------------------------------------------------- retry exhaustion


async def test_retry_exhaustion_fails_the_save_cleanly(
    make_proxy: Callable[..., FaultProxy], s3_bucket: str, s3_options: dict[str, Any], s3_direct: Any
) -> None:
    proxy = make_proxy()
    config = TransferConfig(part_size=5 * MiB, range_size=5 * MiB, max_attempts=2)
    url = f"s3://{s3_bucket}/exhausted"
    async with MultiNodeCheckpointManager(url, storage_options=through(proxy, s3_options), config=config) as mgr:
        await mgr.init(list(NODES))
        fill(mgr, make_state(SEED, 1, big_bytes=MiB // 2))
        await mgr.save(1)

        rule = proxy.add_rule(is_shard_write(2), Respond(503, "SlowDown", "Please reduce your request rate."))
        fill(mgr, make_state(SEED, 2, big_bytes=6 * MiB))
        with pytest.raises(StorageError) as info:
            await mgr.save(2)
        exc = info.value
        assert set(exc.failures) == set(NODES), (str(exc), exc.failures)
        for node, cause in exc.failures.items():
            assert isinstance(cause, StorageError), (node, cause)
            assert cause.code == "SlowDown", (node, cause.code, str(cause))
            assert node in str(exc)
        assert rule.hits >= len(NODES) * config.max_attempts

        assert await mgr.get_resume_from_epoch_id() == 1
        assert not await mgr.cp_accessible(2)
        await load_and_check(mgr, 1, SEED, big_bytes=MiB // 2)

    uploads = await s3_direct.list_multipart_uploads(Bucket=s3_bucket)
    assert not uploads.get("Uploads"), uploads.get("Uploads")
    assert await keys_under(s3_direct, s3_bucket, "exhausted/epochs/000000000002/") == []
