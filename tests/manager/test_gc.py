"""``MultiNodeCheckpointManager.gc``: what is garbage, what is kept, and dry runs.

Garbage is made the way real jobs make it: an interrupted save (shards and index, no
decision, no manifest), a losing attempt's objects inside a committed epoch, and (on S3)
an unfinished multipart upload. Committed epochs and epochs whose manifest does not parse
must survive any gc; garbage younger than the grace period is kept. gc claims an
interrupted save (an "abandoned" decision, which stays) before it deletes its objects,
and completes a save that decided to commit but never published its manifest.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aioboto3
import numpy as np
import pytest
from aiobotocore.config import AioConfig

from asyncckpt import MultiNodeCheckpointManager
from asyncckpt.layout import manifest_key
from asyncckpt.storage import Storage, storage_for
from tests.support.asserts import assert_same

NODES = ("n0", "n1")
UPLOAD_KEY = "epochs/000000000009/x.y/n.shard"  # an unfinished multipart upload (S3)


def state(tag: int) -> dict[str, dict[str, Any]]:
    return {
        node: {"w": np.full(64, tag * 10 + i, dtype=np.float32), "step": tag, "name": f"{node}@{tag}"}
        for i, node in enumerate(NODES)
    }


@contextlib.asynccontextmanager
async def s3_admin(location: Any) -> AsyncIterator[tuple[Any, str, str]]:
    """An aioboto3 client straight on the test endpoint, the bucket and the key prefix."""
    parts = urlsplit(location.url)
    config = AioConfig(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2})
    async with aioboto3.Session().client(
        "s3", endpoint_url=location.options["endpoint_url"], region_name=location.options["region_name"], config=config
    ) as client:
        yield client, parts.netloc, parts.path.strip("/") + "/"


@dataclass
class Garbage:
    location: Any
    raw: Storage
    admin: Any  # (client, bucket, prefix) on S3, else None
    committed: list[int] = field(default_factory=list)  # epochs that must load after any gc
    garbage: set[str] = field(default_factory=set)  # keys gc(grace_period=0) must delete
    skipped: list[int] = field(default_factory=list)  # epochs with a manifest that does not parse
    upload_ids: list[str] = field(default_factory=list)
    claims: set[str] = field(default_factory=set)  # the decisions gc writes as it claims writers
    # moto reports every multipart upload as initiated in 2010; a real store tells the truth
    upload_looks_old: bool = False

    async def keys(self) -> set[str]:
        return {info.key async for info in self.raw.list("")}

    async def open_uploads(self) -> list[str]:
        if self.admin is None:
            return []
        client, bucket, prefix = self.admin
        response = await client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        return [u["Key"][len(prefix) :] for u in response.get("Uploads", [])]

    def manager(self) -> MultiNodeCheckpointManager:
        return MultiNodeCheckpointManager(self.location.url, storage_options=self.location.options)

    async def check_committed_epochs_load(self) -> None:
        async with self.manager() as mgr:
            await mgr.init({node: {} for node in NODES})
            assert await mgr.committed_epochs() == self.committed
            assert await mgr.get_resume_from_epoch_id() == max(self.committed)
            for epoch in self.committed:
                assert await mgr.cp_accessible(epoch)
                await mgr.load(epoch)
                for node, blobs in state(epoch).items():
                    assert_same(dict(mgr.workspace(node)), blobs, f"epoch {epoch} {node}")


@pytest.fixture
async def garbage(location: Any) -> AsyncIterator[Garbage]:
    async with contextlib.AsyncExitStack() as stack:
        admin = await stack.enter_async_context(s3_admin(location)) if location.kind == "s3" else None
        raw = await stack.enter_async_context(storage_for(location.url, options=location.options))
        g = Garbage(location, raw, admin)
        async with MultiNodeCheckpointManager(location.url, storage_options=location.options, run_id="job") as mgr:
            await mgr.init({node: {} for node in NODES})
            for epoch in (1, 2, 3, 4):
                for node, blobs in state(epoch).items():
                    mgr.workspace(node).update(blobs)
                before = await g.keys()
                await mgr.save(epoch)
                written = await g.keys() - before
                if epoch == 3:  # an interrupted save: shards and index, stopped before its decision
                    decision = next(key for key in written if key.endswith(".decision"))
                    await raw.delete([manifest_key(3), decision])
                    g.garbage |= written - {manifest_key(3), decision}
                    g.claims.add(decision)
                elif epoch == 4:  # a manifest that does not parse: gc must leave the epoch alone
                    await raw.put(manifest_key(4), b'{"format": "asyncckpt/manifest", "epoch": 4, "nodes": ')
                    g.skipped.append(4)
                else:
                    g.committed.append(epoch)
        # a losing attempt's objects next to a committed epoch, and next to the skipped one
        for epoch in (1, 4):
            for node in NODES:
                for suffix in (".shard", ".receipt.json"):
                    key = f"epochs/{epoch:012d}/loser.0123456789ab/{node}{suffix}"
                    await raw.put(key, b"left over by a job that lost the commit")
                    if epoch == 1:
                        g.garbage.add(key)
        if admin is not None:
            client, bucket, prefix = admin
            response = await client.create_multipart_upload(Bucket=bucket, Key=prefix + UPLOAD_KEY)
            g.upload_ids.append(response["UploadId"])
            assert await g.open_uploads() == [UPLOAD_KEY]
            listed = await client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
            g.upload_looks_old = listed["Uploads"][0]["Initiated"].timestamp() < time.time() - 86400
        assert len(g.garbage) == 7 and g.committed == [1, 2] and g.skipped == [4]
        yield g


async def test_gc_deletes_old_garbage_and_keeps_committed_and_unparsable_epochs(garbage: Garbage) -> None:
    before = await garbage.keys()
    async with garbage.manager() as mgr:
        report = await mgr.gc(grace_period=0)
    assert report.dry_run is False
    assert sorted(report.deleted) == sorted(garbage.garbage)
    assert report.skipped_epochs == [4]
    assert report.kept_recent == 0
    assert report.aborted_uploads == ([UPLOAD_KEY] if garbage.admin else [])
    assert len(report.abandoned) == 1 and report.completed_epochs == []
    assert await garbage.keys() == (before - garbage.garbage) | garbage.claims
    assert await garbage.open_uploads() == []
    await garbage.check_committed_epochs_load()
    # the unparsable epoch kept every object, its stray attempt included
    assert {k for k in before if k.startswith("epochs/000000000004/")} <= await garbage.keys()
    # a second gc finds nothing more
    async with garbage.manager() as mgr:
        again = await mgr.gc(grace_period=0)
    assert again.deleted == [] and again.aborted_uploads == [] and again.skipped_epochs == [4]


async def test_gc_keeps_garbage_younger_than_the_grace_period(garbage: Garbage) -> None:
    before = await garbage.keys()
    async with garbage.manager() as mgr:
        report = await mgr.gc(grace_period=3600)
    # an upload the endpoint reports as years old is stale whatever the grace period
    stale_upload = [UPLOAD_KEY] if garbage.admin and garbage.upload_looks_old else []
    assert report.deleted == []
    assert report.aborted_uploads == stale_upload
    assert report.kept_recent == len(garbage.garbage)
    assert report.skipped_epochs == [4]
    assert await garbage.keys() == before
    assert await garbage.open_uploads() == ([UPLOAD_KEY] if garbage.admin and not stale_upload else [])
    await garbage.check_committed_epochs_load()


async def test_gc_dry_run_deletes_nothing_and_lists_what_gc_deletes(garbage: Garbage) -> None:
    before = await garbage.keys()
    async with garbage.manager() as mgr:
        dry = await mgr.gc(grace_period=0, dry_run=True)
        assert dry.dry_run is True
        assert await garbage.keys() == before
        assert await garbage.open_uploads() == ([UPLOAD_KEY] if garbage.admin else [])
        real = await mgr.gc(grace_period=0)
    assert sorted(dry.deleted) == sorted(real.deleted) == sorted(garbage.garbage)
    assert dry.aborted_uploads == real.aborted_uploads
    assert dry.skipped_epochs == real.skipped_epochs == [4]
    assert dry.abandoned == real.abandoned
    assert await garbage.keys() == (before - garbage.garbage) | garbage.claims
    await garbage.check_committed_epochs_load()


async def test_gc_after_a_concurrent_loser_removes_nothing_the_winner_needs(location: Any) -> None:
    """The objects of a conflict loser that its own clean-up missed are garbage; the
    winner's epoch loads after gc."""
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options, run_id="winner") as win:
        await win.init(state(5))
        await win.save(5)
    async with storage_for(location.url, options=location.options) as raw:
        stray = [f"epochs/000000000005/zombie.aaaaaaaaaaaa/{node}.shard" for node in NODES]
        for key in stray:
            await raw.put(key, b"a zombie's shard")
        async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
            await mgr.init({node: {} for node in NODES})
            report = await mgr.gc(grace_period=0)
            assert sorted(report.deleted) == sorted(stray)
            await mgr.load(5)
            for node, blobs in state(5).items():
                assert_same(dict(mgr.workspace(node)), blobs, node)
        left = [info.key async for info in raw.list("")]
        assert manifest_key(5) in left
        assert not [key for key in left if "zombie" in key]


@pytest.mark.parametrize("location_kind", ["file"])
async def test_gc_on_disk_deletes_only_the_objects_older_than_the_grace_period(garbage: Garbage) -> None:
    """On a local directory the age of an object is its mtime: age some of everything.

    In a committed epoch each object it does not name goes once it is old; an unfinished
    save is judged by its newest object (one young object keeps the whole attempt)."""
    root = Path(unquote(urlsplit(garbage.location.url).path))
    old = time.time() - 7200
    aged = {key for key in await garbage.keys() if key.endswith(("n0.shard", "n0.receipt.json", "manifest.json"))}
    for key in aged:
        os.utime(root / key, (old, old))
    before = await garbage.keys()
    async with garbage.manager() as mgr:
        report = await mgr.gc(grace_period=3600)
    unfinished = {key for key in garbage.garbage if key.startswith("epochs/000000000003/")}
    expected = (garbage.garbage & aged) - unfinished
    assert expected and unfinished & aged
    assert sorted(report.deleted) == sorted(expected)
    assert report.kept_recent == len(garbage.garbage - expected)
    assert report.abandoned == []
    assert await garbage.keys() == before - expected
    await garbage.check_committed_epochs_load()

    for key in unfinished:  # once every object of the unfinished save is old, it is claimed whole
        os.utime(root / key, (old, old))
    async with garbage.manager() as mgr:
        report = await mgr.gc(grace_period=3600)
    assert sorted(report.deleted) == sorted(unfinished) and len(report.abandoned) == 1
    await garbage.check_committed_epochs_load()


async def test_gc_completes_a_save_that_decided_to_commit_but_never_published(location: Any) -> None:
    """A save that died between its commit decision and its manifest: gc must not delete
    what the decision names; it publishes the manifest, and the epoch loads."""
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
        await mgr.init(state(6))
        await mgr.save(6)
    async with storage_for(location.url, options=location.options) as raw:
        await raw.delete([manifest_key(6)])  # as if the process died right after deciding
        async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
            await mgr.init({node: {} for node in NODES})
            assert await mgr.committed_epochs() == []
            report = await mgr.gc(grace_period=0)
            assert report.completed_epochs == [6] and report.deleted == [] and report.abandoned == []
            assert await mgr.committed_epochs() == [6]
            await mgr.load(6)
            for node, blobs in state(6).items():
                assert_same(dict(mgr.workspace(node)), blobs, node)


async def test_gc_rejects_a_bad_grace_period(location: Any) -> None:
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
        for bad in (-1, "1h", None, True):
            with pytest.raises(ValueError):
                await mgr.gc(grace_period=bad)  # type: ignore[arg-type]
