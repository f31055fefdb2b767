"""MultiNodeCheckpointManager against DESIGN.md section 2, on memory, file and s3 locations.

Every test takes the ``location`` fixture of ``conftest.py``, so it runs once per
storage kind. What a test asserts about the stored objects is read around the
library where that is cheap (aioboto3 for S3, the directory for files) and through
the storage API otherwise; the manifest is read as the JSON of DESIGN.md section 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aioboto3
import msgpack
import numpy as np
import pytest
from aiobotocore.config import AioConfig

from asyncckpt import (
    CheckpointConflictError,
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointStateError,
    MultiNodeCheckpointManager,
    StorageError,
    codec,
)
from asyncckpt.storage import Storage, drop_memory_store, storage_for

TWO_NODES = ("trainer_0", "trainer_1")
THREE_NODES = ("trainer_0", "trainer_1", "trainer_2")


# --------------------------------------------------------------------------- helpers


def manager(location: Any, **kwargs: Any) -> MultiNodeCheckpointManager:
    return MultiNodeCheckpointManager(location.url, storage_options=location.options, **kwargs)


class RawStorages:
    """Raw byte stores of the locations a test touches, each opened once (an S3 client
    costs about 0.1 s of CPU to create) and closed when the test ends."""

    def __init__(self) -> None:
        self.by_url: dict[str, Storage] = {}

    async def get(self, location: Any) -> Storage:
        if location.url not in self.by_url:
            storage = storage_for(location.url, options=location.options)
            await storage.open()
            self.by_url[location.url] = storage
        return self.by_url[location.url]

    async def close(self) -> None:
        for storage in self.by_url.values():
            await storage.close()


_raw_storages: RawStorages | None = None


@pytest.fixture(autouse=True)
async def raw_storages() -> AsyncIterator[RawStorages]:
    global _raw_storages
    _raw_storages = RawStorages()
    try:
        yield _raw_storages
    finally:
        await _raw_storages.close()
        _raw_storages = None


@contextlib.asynccontextmanager
async def open_storage(location: Any) -> AsyncIterator[Storage]:
    """The raw byte store at ``location``, for reading and damaging objects behind the manager."""
    assert _raw_storages is not None
    yield await _raw_storages.get(location)


def file_root(location: Any) -> Path:
    return Path(unquote(urlsplit(location.url).path))


_admin_session: aioboto3.Session | None = None


def admin_session() -> aioboto3.Session:
    """One boto session for the module: a new one costs 0.1 s of CPU to load its models."""
    global _admin_session
    if _admin_session is None:
        _admin_session = aioboto3.Session()
    return _admin_session


async def stored_keys(location: Any) -> list[str]:
    """Every object below the location's root, listed without the manager (for S3: every
    object in the bucket, which belongs to this one test)."""
    if location.kind == "s3":
        bucket = urlsplit(location.url).netloc
        config = AioConfig(s3={"addressing_style": "path"})
        options = location.options
        keys: list[str] = []
        async with admin_session().client(
            "s3", endpoint_url=options["endpoint_url"], region_name=options["region_name"], config=config
        ) as client:
            async for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)
    if location.kind == "file":
        root = file_root(location)
        if not root.exists():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    async with open_storage(location) as storage:
        return [info.key async for info in storage.list()]


async def read_manifest(location: Any, epoch: int) -> dict[str, Any]:
    """The committed manifest of ``epoch`` as plain JSON (DESIGN.md, "Layout"), with the
    records of its index under ``"nodes"`` and, in each, the blob index of its shard."""
    async with open_storage(location) as storage:
        manifest = json.loads(await storage.get(f"epochs/{epoch:012d}/manifest.json"))
        index = json.loads(await storage.get(manifest["index"]["key"]))
        for node, record in index["nodes"].items():
            shard = await storage.get(record["shard"])
            offset, length, _ = codec.parse_trailer(shard[-codec.TRAILER_SIZE :], len(shard), node)
            blobs = msgpack.unpackb(shard[offset : offset + length])
            record["blobs"] = blobs
        return {**manifest, "nodes": index["nodes"]}


def key_below(location: Any, url: str) -> str:
    """The key of an object URL below ``location``."""
    root = location.url.rstrip("/") + "/"
    assert url.startswith(root), f"{url} is not below {root}"
    return url[len(root) :]


async def delete_object(location: Any, url: str) -> None:
    async with open_storage(location) as storage:
        await storage.delete([key_below(location, url)])


async def stored_keys_below(location: Any) -> list[str]:
    async with open_storage(location) as storage:
        return [info.key async for info in storage.list()]


async def copy_every_object(source: Any, target: Any) -> int:
    async with open_storage(source) as src, open_storage(target) as dst:
        keys = [info.key async for info in src.list()]
        for key in keys:
            await dst.put(key, await src.get(key))
    return len(keys)


def plain(value: Any) -> Any:
    """A comparable form of a blob that keeps types, dtypes and shapes apart."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return ("scalar", value.dtype.str, value.tobytes())
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, tuple):
        return ("tuple", tuple(plain(item) for item in value))
    return (type(value).__name__, value)


def snapshot(workspaces: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {node: plain(dict(ws)) for node, ws in workspaces.items()}


def sample_blobs(seed: int) -> dict[str, Any]:
    """One node's workspace with every kind of supported blob."""
    rng = np.random.default_rng(seed)
    return {
        "weights": rng.standard_normal((4, 3)).astype(np.float32),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3) * (seed + 1)),
        "empty": np.zeros((0, 2), dtype=np.float64),
        "step": np.int64(seed),
        "total": np.array([100 + seed], dtype=np.int64),
        "raw": bytes([seed]) * 5,
        "name": f"node-{seed}",
        "count": 2**70 + seed,
        "lr": 0.25,
        "done": False,
        "nothing": None,
        "history": [1, 2.5, "three", [4]],
        "pair": (seed, "x"),
        "config": {"layers": [64, 32], "nested": {"dropout": 0.1}},
    }


def sample_workspaces(nodes: tuple[str, ...] = TWO_NODES) -> dict[str, dict[str, Any]]:
    return {node: sample_blobs(i) for i, node in enumerate(nodes)}


@pytest.fixture
def sibling(location: Any, tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """Makes more empty locations of the same kind as ``location`` (``make(name)``)."""
    stores: list[str] = []

    def make(name: str) -> Any:
        if location.kind == "memory":
            store = f"{urlsplit(location.url).netloc}-{name}"
            stores.append(store)
            return dataclasses.replace(location, url=f"memory://{store}")
        if location.kind == "file":
            return dataclasses.replace(location, url=(tmp_path / name).as_uri())
        return dataclasses.replace(location, url=f"s3://{urlsplit(location.url).netloc}/{name}")

    yield make
    for store in stores:
        drop_memory_store(store)


def plain_form(location: Any) -> str:
    """The location written without a scheme (what ``path_type`` is for)."""
    parts = urlsplit(location.url)
    if location.kind == "file":
        return unquote(parts.path)
    return f"{parts.netloc}{parts.path}"


# --------------------------------------------------------------------------- init

INVALID_NODE_LISTS: list[tuple[str, Any, type[Exception]]] = [
    ("an empty name", ["trainer_0", ""], ValueError),
    ("a slash", ["trainer_0", "a/b"], ValueError),
    ("'..'", ["trainer_0", ".."], ValueError),
    ("'..' inside", ["trainer_0", "x..y"], ValueError),
    ("a leading dot", ["trainer_0", ".hidden"], ValueError),
    ("a name that is not a str", ["trainer_0", 7], TypeError),
    ("a duplicate", ["trainer_0", "trainer_0"], ValueError),
    ("no nodes", [], ValueError),
    ("a mapping with a slash", {"trainer_0": {"w": 1}, "a/b": {"w": 2}}, ValueError),
]


async def test_init_rejects_an_invalid_node_list_before_writing_anything(location: Any) -> None:
    for case, nodes, error in INVALID_NODE_LISTS:
        mgr = manager(location)
        try:
            with pytest.raises(error):
                await mgr.init(nodes)
            with pytest.raises(CheckpointStateError):
                await mgr.save(0)  # the failed init declared no nodes
        except BaseException as exc:
            exc.add_note(f"node list with {case}: {nodes!r}")
            raise
        finally:
            await mgr.close()
    assert await stored_keys(location) == []
    async with manager(location) as fresh:
        assert await fresh.get_resume_from_epoch_id() is None


async def test_second_init_is_a_no_op_with_the_same_nodes_and_an_error_with_others(location: Any) -> None:
    workspaces = {"trainer_0": {"w": 1}, "trainer_1": {"w": 2}}
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.init(list(workspaces))
        await mgr.init(workspaces)
        assert mgr.nodes == list(workspaces)
        assert mgr.workspace("trainer_0") is workspaces["trainer_0"]
        for other_nodes in (["trainer_0"], ["trainer_0", "trainer_1", "trainer_2"], ["ps_0", "ps_1"]):
            with pytest.raises(CheckpointStateError):
                await mgr.init(other_nodes)
        assert mgr.nodes == list(workspaces)
        assert dict(mgr.workspace("trainer_1")) == {"w": 2}
        await mgr.save(0)  # still usable with its own nodes
    assert sorted((await read_manifest(location, 0))["nodes"]) == list(workspaces)


async def test_init_retrieving_a_missing_epoch_or_node_raises_not_found(location: Any) -> None:
    async with manager(location) as mgr:
        with pytest.raises(CheckpointNotFoundError) as info:
            await mgr.init(list(TWO_NODES), retrieve_from_epoch=3)
        assert isinstance(info.value, FileNotFoundError)
    async with manager(location) as writer:
        await writer.init({"trainer_0": {"w": 1}})
        await writer.save(2)
    async with manager(location) as mgr:
        with pytest.raises(CheckpointNotFoundError, match="trainer_1"):
            await mgr.init(list(TWO_NODES), retrieve_from_epoch=2)


# --------------------------------------------------------------------------- save / load


async def test_load_restores_saved_values_into_the_callers_workspace_objects(location: Any) -> None:
    workspaces = sample_workspaces(THREE_NODES)
    saved = snapshot(workspaces)
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(3)
        for ws in workspaces.values():
            ws["weights"] = np.ones(1)
            ws["history"].append("changed after save")
            del ws["name"]
        await mgr.load(3)
        assert mgr.workspace("trainer_0") is workspaces["trainer_0"]
    assert snapshot(workspaces) == saved

    fresh: dict[str, dict[str, Any]] = {node: {} for node in THREE_NODES}
    async with manager(location) as reader:
        await reader.init(fresh, retrieve_from_epoch=3)
        await reader.load(3)
    assert snapshot(fresh) == saved


async def test_load_replaces_same_named_entries_and_leaves_the_others_alone(location: Any) -> None:
    workspaces = {"trainer_0": {"total": 1, "lr": 0.5}, "trainer_1": {"total": 2}}
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(0)
        workspaces["trainer_0"].update(total=99, lr=0.1, created_later="keep me")
        del workspaces["trainer_1"]["total"]
        await mgr.save(1)  # what is in the workspace at the time of the call
        await mgr.load(0)
        assert workspaces == {
            "trainer_0": {"total": 1, "lr": 0.5, "created_later": "keep me"},
            "trainer_1": {"total": 2},
        }
        workspaces["trainer_1"]["total"] = 7
        await mgr.load(1)
        assert workspaces == {
            "trainer_0": {"total": 99, "lr": 0.1, "created_later": "keep me"},
            "trainer_1": {"total": 7},  # epoch 1 has no trainer_1/total: left alone
        }


async def test_saving_a_committed_epoch_again_raises_conflict_and_keeps_the_original(location: Any) -> None:
    workspaces = {"trainer_0": {"total": 1}}
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(2)
        workspaces["trainer_0"]["total"] = 999
        with pytest.raises(CheckpointConflictError) as info:
            await mgr.save(2)
        assert isinstance(info.value, FileExistsError)
    async with manager(location) as zombie:  # another writer of the same location
        await zombie.init({"trainer_0": {"total": -1}})
        with pytest.raises(CheckpointConflictError):
            await zombie.save(2)
    restored: dict[str, Any] = {}
    async with manager(location) as reader:
        await reader.init({"trainer_0": restored}, retrieve_from_epoch=2)
        await reader.load(2)
    assert restored == {"total": 1}


async def test_save_and_load_before_init_raise_state_error_and_write_nothing(location: Any) -> None:
    async with manager(location) as mgr:
        with pytest.raises(CheckpointStateError):
            await mgr.save(0)
        with pytest.raises(CheckpointStateError):
            await mgr.load(0)
        with pytest.raises(CheckpointStateError):
            mgr.workspace("trainer_0")
    assert await stored_keys(location) == []


BAD_EPOCHS: list[tuple[Any, type[Exception]]] = [
    (-1, ValueError),
    (1.5, TypeError),
    ("3", TypeError),
    (True, TypeError),
    (None, TypeError),
    (10**12, ValueError),
]


async def test_a_bad_epoch_is_refused_before_anything_is_written(location: Any) -> None:
    async with manager(location) as mgr:
        await mgr.init({"trainer_0": {"total": 1}})
        for epoch, error in BAD_EPOCHS:
            calls: list[Callable[[], Any]] = [
                lambda epoch=epoch: mgr.save(epoch),
                lambda epoch=epoch: mgr.load(epoch),
                lambda epoch=epoch: mgr.load_blobs_locally(["trainer_0"], ["total"], epoch, {}),
                lambda epoch=epoch: mgr.get_ckpt_db_name("trainer_0", epoch),
            ]
            if epoch is not None:  # None means "no particular epoch" for these two
                calls += [
                    lambda epoch=epoch: mgr.cp_accessible(epoch),
                    lambda epoch=epoch: mgr.get_resume_from_epoch_id(epoch),
                ]
            for call in calls:
                try:
                    with pytest.raises(error):
                        result = call()
                        if inspect.isawaitable(result):
                            await result
                except BaseException as exc:
                    exc.add_note(f"epoch {epoch!r}")
                    raise
    assert await stored_keys(location) == []


UNSUPPORTED_BLOBS: list[Any] = [object(), {1, 2}, {1: "a"}, [1, 2, object()]]


async def test_an_unsupported_blob_raises_type_error_naming_node_and_blob_and_writes_nothing(location: Any) -> None:
    workspaces = sample_workspaces()
    epoch0 = snapshot(workspaces)
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(0)
        keys_after_epoch0 = await stored_keys(location)
        for bad_value in UNSUPPORTED_BLOBS:
            workspaces["trainer_1"]["bad_blob"] = bad_value
            with pytest.raises(TypeError) as info:
                await mgr.save(1)
            assert "trainer_1" in str(info.value), bad_value
            assert "bad_blob" in str(info.value), bad_value
        assert await stored_keys(location) == keys_after_epoch0
        assert await mgr.get_resume_from_epoch_id() == 0
        del workspaces["trainer_1"]["bad_blob"]
        await mgr.save(1)  # the failed attempts did not poison the epoch
    fresh: dict[str, dict[str, Any]] = {node: {} for node in TWO_NODES}
    async with manager(location) as reader:
        await reader.init(fresh)
        await reader.load(0)
    assert snapshot(fresh) == epoch0


async def test_load_after_deleted_shard_leaves_every_workspace_unchanged(location: Any) -> None:
    workspaces = sample_workspaces(THREE_NODES)
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(1)
        shard_url = mgr.get_ckpt_db_name("trainer_1", 1)
        assert shard_url is not None
        for i, ws in enumerate(workspaces.values()):
            ws["total"] = np.array([-i])
            ws["created_later"] = "keep me"
            del ws["name"]
        before = snapshot(workspaces)
        await delete_object(location, shard_url)
        with pytest.raises(CheckpointError) as info:
            await mgr.load(1)
        assert "trainer_1" in str(info.value)
        assert snapshot(workspaces) == before

    fresh = {node: {"marker": node} for node in THREE_NODES}
    async with manager(location) as reader:
        await reader.init(fresh, retrieve_from_epoch=1)  # the manifest is still there
        with pytest.raises(CheckpointError):
            await reader.load(1)
    assert fresh == {node: {"marker": node} for node in THREE_NODES}


async def test_load_of_a_corrupted_blob_raises_corrupted_naming_it_and_leaves_every_workspace_unchanged(
    location: Any,
) -> None:
    workspaces = sample_workspaces(THREE_NODES)
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(1)
        shard_url = mgr.get_ckpt_db_name("trainer_2", 1)
        assert shard_url is not None
        for ws in workspaces.values():
            ws["weights"] = np.zeros(1)
        before = snapshot(workspaces)

        entry = (await read_manifest(location, 1))["nodes"]["trainer_2"]["blobs"]["weights"]
        async with open_storage(location) as storage:
            key = key_below(location, shard_url)
            data = bytearray(await storage.get(key))
            data[entry["offset"] + entry["length"] // 2] ^= 0xFF  # same size, one flipped byte
            await storage.put(key, bytes(data))

        with pytest.raises(CheckpointCorruptedError) as info:
            await mgr.load(1)
        message = str(info.value)
        assert "trainer_2" in message and "weights" in message
        assert isinstance(info.value, ValueError)
        assert snapshot(workspaces) == before


# --------------------------------------------------------------------------- load_blobs_locally


async def save_totals(location: Any, epoch: int, totals: dict[str, Any], **extra: Any) -> None:
    """Commit ``epoch`` with one ``total`` blob per node (plus ``extra`` blobs on every node)."""
    async with manager(location) as writer:
        await writer.init({node: {"total": total, **extra} for node, total in totals.items()})
        await writer.save(epoch)


async def test_partial_load_returns_false_and_leaves_the_session_untouched_for_a_missing_epoch_or_node(
    location: Any,
) -> None:
    await save_totals(location, 1, {"trainer_0": 10, "trainer_1": 11})
    session = {"keep": "me"}
    async with manager(location) as mgr:  # no init needed, as in caffe2
        assert await mgr.load_blobs_locally(["trainer_0"], ["total"], 2, session) is False
        assert (
            await mgr.load_blobs_locally(["trainer_0", "trainer_9"], ["trainer_0/total", "total"], 1, session) is False
        )
    assert session == {"keep": "me"}


async def test_partial_load_returns_false_when_a_listed_nodes_shard_object_is_missing(location: Any) -> None:
    await save_totals(location, 1, {"trainer_0": 10, "trainer_1": 11})
    session = {"keep": "me"}
    async with manager(location) as mgr:
        await mgr.init(list(TWO_NODES), retrieve_from_epoch=1)
        shard_url = mgr.get_ckpt_db_name("trainer_1", 1)
        assert shard_url is not None
        await delete_object(location, shard_url)
        # like caffe2's check_db_exists, for every listed node, whether or not a name asked for is its own
        assert (
            await mgr.load_blobs_locally(list(TWO_NODES), ["trainer_0/total", "trainer_1/total"], 1, session) is False
        )
        assert await mgr.load_blobs_locally(list(TWO_NODES), ["trainer_0/total"], 1, session) is False
    assert session == {"keep": "me"}


async def test_partial_load_skips_names_that_no_listed_shard_holds(location: Any) -> None:
    await save_totals(location, 4, {"trainer_0": 10, "trainer_1": 11}, lr=0.5)
    session: dict[str, Any] = {}
    async with manager(location) as mgr:
        loaded = await mgr.load_blobs_locally(["trainer_0"], ["total", "no_such_blob", "trainer_1/total"], 4, session)
    assert loaded is True
    assert session == {"total": 10}


async def test_partial_load_takes_node_qualified_names_as_session_keys(location: Any) -> None:
    await save_totals(location, 4, {"trainer_0": 10, "trainer_1": 11})
    async with manager(location) as writer:  # a blob only trainer_1 holds, in another epoch
        await writer.init({"trainer_0": {"total": 20}, "trainer_1": {"total": 21, "only_here": "t1"}})
        await writer.save(5)
    session: dict[str, Any] = {"keep": "me"}
    async with manager(location) as mgr:
        assert await mgr.load_blobs_locally(list(TWO_NODES), ["trainer_0/total", "trainer_1/total"], 4, session)
        assert session == {"keep": "me", "trainer_0/total": 10, "trainer_1/total": 11}
        assert await mgr.load_blobs_locally(list(TWO_NODES), ["only_here", "trainer_0/total"], 5, session)
    assert session == {"keep": "me", "trainer_0/total": 20, "trainer_1/total": 11, "only_here": "t1"}


async def test_partial_load_of_a_plain_name_held_by_two_nodes_raises_value_error(location: Any) -> None:
    await save_totals(location, 1, {"trainer_0": 10, "trainer_1": 11})
    session = {"keep": "me"}
    async with manager(location) as mgr:
        with pytest.raises(ValueError, match="total"):
            await mgr.load_blobs_locally(list(TWO_NODES), ["total"], 1, session)
    assert session == {"keep": "me"}


async def test_partial_load_fetches_only_the_requested_blobs_bytes(location: Any) -> None:
    big = np.arange(64 * 1024, dtype=np.float64)  # 512 KiB per node that must not be fetched
    workspaces = {node: {"weights": big + i, "total": np.array([100 + i])} for i, node in enumerate(TWO_NODES)}
    async with manager(location) as writer:
        await writer.init(workspaces)
        await writer.save(1)
    manifest = await read_manifest(location, 1)
    wanted = {node: manifest["nodes"][node]["blobs"]["total"]["length"] for node in TWO_NODES}
    shard_sizes = sum(manifest["nodes"][node]["size"] for node in TWO_NODES)

    session: dict[str, Any] = {}
    async with manager(location) as mgr:
        assert await mgr.load_blobs_locally(list(TWO_NODES), ["trainer_0/total", "trainer_1/total"], 1, session)
        report = await mgr.report_checkpoint_stats("checkpoint_partial_load")

    assert [int(session[f"{node}/total"][0]) for node in TWO_NODES] == [100, 101]
    assert report["bytes"] == sum(wanted.values())
    assert {node: stats["bytes"] for node, stats in report["nodes"].items()} == wanted
    assert report["bytes"] * 100 < shard_sizes


# --------------------------------------------------------------------------- get_resume_from_epoch_id


async def test_resume_epoch_is_none_when_empty_else_the_latest_or_the_committed_one_asked_for(
    location: Any,
) -> None:
    async with manager(location) as mgr:
        assert await mgr.get_resume_from_epoch_id() is None
        await mgr.init({"trainer_0": {"total": 0}})
        for epoch in (0, 1, 12, 3):
            await mgr.save(epoch)
        assert await mgr.get_resume_from_epoch_id() == 12
        assert await mgr.get_resume_from_epoch_id(1) == 1
        with pytest.raises(CheckpointNotFoundError):
            await mgr.get_resume_from_epoch_id(4)
    async with manager(location) as fresh:
        assert await fresh.get_resume_from_epoch_id() == 12
        assert await fresh.get_resume_from_epoch_id(3) == 3


async def test_an_epoch_with_shards_but_no_manifest_is_ignored(location: Any) -> None:
    async with manager(location) as mgr:
        await mgr.init({"trainer_0": {"total": 0}})
        await mgr.save(5)
    async with open_storage(location) as storage:  # leftovers of a save that never committed
        await storage.put("epochs/000000000007/x/y.shard", b"half a shard")
    async with manager(location) as mgr:
        assert await mgr.get_resume_from_epoch_id() == 5
        with pytest.raises(CheckpointNotFoundError):
            await mgr.get_resume_from_epoch_id(7)
        assert await mgr.cp_accessible(7) is False
        await mgr.init({"trainer_0": {}})
        with pytest.raises(CheckpointNotFoundError):
            await mgr.load(7)


async def test_resume_skips_a_latest_epoch_whose_manifest_does_not_parse(location: Any) -> None:
    async with manager(location) as mgr:
        await mgr.init({"trainer_0": {"total": 0}})
        await mgr.save(1)
        await mgr.save(2)
    async with open_storage(location) as storage:
        await storage.put("epochs/000000000002/manifest.json", b'{"format": "asyncckpt/manif')
    async with manager(location) as mgr:
        assert await mgr.get_resume_from_epoch_id() == 1


# --------------------------------------------------------------------------- cp_accessible


async def test_cp_accessible_is_true_for_a_good_location_and_for_committed_complete_epochs_only(
    location: Any,
) -> None:
    async with manager(location) as mgr:
        assert await mgr.cp_accessible() is True  # nothing written yet
        assert await mgr.cp_accessible(None) is True
        assert await stored_keys(location) == []
        await mgr.init({node: {"total": i} for i, node in enumerate(TWO_NODES)})
        await mgr.save(1)
        await mgr.save(2)
        assert await mgr.cp_accessible(1) is True
        assert await mgr.cp_accessible(3) is False
        shard_url = mgr.get_ckpt_db_name("trainer_1", 1)
        assert shard_url is not None
        await delete_object(location, shard_url)
        assert await mgr.cp_accessible(1) is False
        assert await mgr.cp_accessible(2) is True
        assert await mgr.cp_accessible() is True


async def test_missing_s3_bucket_is_not_accessible_and_save_names_the_bucket(s3_options: dict[str, Any]) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    async with MultiNodeCheckpointManager(f"s3://{bucket}/run", storage_options=s3_options) as mgr:
        assert await mgr.cp_accessible() is False
        assert await mgr.cp_accessible(1) is False
        await mgr.init({node: {"total": 1} for node in TWO_NODES})
        with pytest.raises(StorageError) as info:
            await mgr.save(1)
    assert bucket in str(info.value)
    assert isinstance(info.value, OSError)


async def test_file_location_below_a_regular_file_is_not_accessible_and_save_raises_storage_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "a_file").write_bytes(b"not a directory")
    root = tmp_path / "a_file" / "ckpt"
    async with MultiNodeCheckpointManager(root.as_uri()) as mgr:
        assert await mgr.cp_accessible() is False
        assert await mgr.cp_accessible(0) is False
        await mgr.init({"trainer_0": {"total": 1}})
        with pytest.raises(StorageError):
            await mgr.save(0)


# --------------------------------------------------------------------------- get_ckpt_db_name


async def test_ckpt_db_name_names_the_committed_shard_object_and_none_for_unknown_nodes(location: Any) -> None:
    async with manager(location) as mgr:
        assert mgr.get_ckpt_db_name("trainer_0", 5) is None  # before init no node is known
        await mgr.init({node: {"total": i} for i, node in enumerate(THREE_NODES)})
        assert mgr.get_ckpt_db_name("trainer_9", 5) is None
        predicted = {node: mgr.get_ckpt_db_name(node, 5) for node in THREE_NODES}
        await mgr.save(5)
        written = {node: mgr.get_ckpt_db_name(node, 5) for node in THREE_NODES}
        assert mgr.get_ckpt_db_name("trainer_9", 5) is None
    manifest = await read_manifest(location, 5)
    committed = {node: f"{location.url}/{manifest['nodes'][node]['shard']}" for node in THREE_NODES}
    assert written == committed
    assert predicted == committed  # the name before save is the object save then writes
    async with open_storage(location) as storage:
        for url in written.values():
            assert url is not None and url.startswith(f"{location.url}/epochs/000000000005/")
            assert await storage.exists(key_below(location, url))
    async with manager(location) as reader:
        await reader.init({node: {} for node in THREE_NODES}, retrieve_from_epoch=5)
        assert {node: reader.get_ckpt_db_name(node, 5) for node in THREE_NODES} == committed
        await reader.load(5)
        assert {node: reader.get_ckpt_db_name(node, 5) for node in THREE_NODES} == committed


# --------------------------------------------------------------------------- report_checkpoint_stats


def assert_node_stats(report: dict[str, Any], nodes: tuple[str, ...], sizes: dict[str, int]) -> None:
    assert set(report["nodes"]) == set(nodes)
    for node, stats in report["nodes"].items():
        assert isinstance(stats["seconds"], float) and stats["seconds"] >= 0
        assert stats["bytes"] == sizes[node]
        assert isinstance(stats["objects"], int) and stats["objects"] >= 1
        assert isinstance(stats["requests"], int) and stats["requests"] >= stats["objects"]
        assert isinstance(stats["retries"], int) and stats["retries"] >= 0
    slowest = report["slowest_node"]
    assert slowest in nodes
    assert report["nodes"][slowest]["seconds"] == max(s["seconds"] for s in report["nodes"].values())


async def test_report_after_save_and_load_gives_per_node_stats_and_the_slowest_node(location: Any) -> None:
    workspaces = sample_workspaces(THREE_NODES)
    workspaces["trainer_2"]["big"] = np.zeros(100_000)
    async with manager(location) as mgr:
        for action in ("save", "checkpoint_saved", "", "CHECKPOINT_SAVE"):
            with pytest.raises(ValueError):
                await mgr.report_checkpoint_stats(action)
        await mgr.init(workspaces)
        await mgr.save(4)
        manifest = await read_manifest(location, 4)
        sizes = {node: manifest["nodes"][node]["size"] for node in THREE_NODES}

        saved = await mgr.report_checkpoint_stats("checkpoint_save")
        assert saved["action"] == "checkpoint_save" and saved["epoch"] == 4
        assert_node_stats(saved, THREE_NODES, sizes)

        await mgr.load(4)
        loaded = await mgr.report_checkpoint_stats("checkpoint_load")
        assert loaded["action"] == "checkpoint_load" and loaded["epoch"] == 4
        assert_node_stats(loaded, THREE_NODES, sizes)
        assert await mgr.report_checkpoint_stats("checkpoint_save") == saved  # each action keeps its own


# --------------------------------------------------------------------------- set_params and path_prefix


async def test_path_prefix_re_roots_reads_while_saves_stay_under_db_prefix(
    location: Any, sibling: Callable[[str], Any]
) -> None:
    workspaces = sample_workspaces()
    saved = snapshot(workspaces)
    async with manager(location) as writer:
        await writer.init(workspaces)
        await writer.save(3)
    upload = sibling("uploaded")
    assert await copy_every_object(location, upload) > 0
    elsewhere = sibling("elsewhere")  # empty: only path_prefix can make epoch 3 loadable

    fresh: dict[str, dict[str, Any]] = {node: {} for node in TWO_NODES}
    async with manager(elsewhere) as mgr:
        await mgr.init(fresh)
        with pytest.raises(CheckpointNotFoundError):
            await mgr.load(3)
        await mgr.load(3, path_prefix=upload.url)
        assert snapshot(fresh) == saved
        shard_url = mgr.get_ckpt_db_name("trainer_0", 3)  # the object it read
        assert shard_url is not None and shard_url.startswith(upload.url + "/epochs/000000000003/")
        await mgr.save(4)
    assert "epochs/000000000004/manifest.json" in await stored_keys_below(elsewhere)
    assert not any(key.startswith("epochs/000000000004/") for key in await stored_keys_below(upload))

    again: dict[str, dict[str, Any]] = {node: {} for node in TWO_NODES}
    async with manager(sibling("third")) as mgr:
        await mgr.init(again, retrieve_from_epoch=3, path_prefix=upload.url)
        await mgr.load(3)
    assert snapshot(again) == saved


async def test_set_params_overwrites_path_prefix_and_path_type_only_with_truthy_values(
    location: Any, sibling: Callable[[str], Any]
) -> None:
    async with manager(location) as writer:
        await writer.init({"trainer_0": {"total": 42}})
        await writer.save(1)
    upload = sibling("uploaded")
    await copy_every_object(location, upload)
    empty = sibling("empty")

    workspace: dict[str, Any] = {}
    async with manager(sibling("own")) as mgr:
        mgr.set_params(["trainer_0"], path_prefix=plain_form(upload), path_type=location.kind)
        assert mgr.nodes == ["trainer_0"]
        mgr.set_params(["trainer_0"])
        mgr.set_params(["trainer_0"], path_prefix="", path_type="")
        await mgr.init({"trainer_0": workspace})
        await mgr.load(1)  # still reads the upload: falsy values changed nothing
        assert workspace == {"total": 42}

        mgr.set_params(["trainer_0"], path_prefix=empty.url)
        with pytest.raises(CheckpointNotFoundError):
            await mgr.load(1)  # a truthy prefix did replace it


# --------------------------------------------------------------------------- metadata handler


class RecordingHandler:
    """A metadata handler (async methods) that records every call it gets."""

    def __init__(self, location: Any, last_epoch: Any = "ask the user", accessible: bool = True):
        self.location = location
        self.calls: list[tuple[str, Any]] = []
        self.last_epoch_answer = last_epoch
        self.accessible = accessible
        self.committed_when_written: dict[int, bool] = {}

    async def set_params(
        self, db_prefix: str, db_type: str, node_names: list[str], path_prefix: str | None, path_type: str | None
    ) -> None:
        self.calls.append(
            (
                "set_params",
                {
                    "db_prefix": db_prefix,
                    "db_type": db_type,
                    "node_names": list(node_names),
                    "path_prefix": path_prefix,
                    "path_type": path_type,
                },
            )
        )

    async def write(self, epoch: int) -> None:
        self.calls.append(("write", epoch))
        async with open_storage(self.location) as storage:
            self.committed_when_written[epoch] = await storage.exists(f"epochs/{epoch:012d}/manifest.json")

    async def last_epoch(self, user_epoch: int | None = None) -> int | None:
        self.calls.append(("last_epoch", user_epoch))
        return user_epoch if self.last_epoch_answer == "ask the user" else self.last_epoch_answer

    async def cp_accessible(self, epoch: int | None = None) -> bool:
        self.calls.append(("cp_accessible", epoch))
        return self.accessible

    async def report(self, action_name: str, stats: dict[str, Any]) -> None:
        self.calls.append(("report", (action_name, stats)))

    def called(self, method: str) -> list[Any]:
        return [args for name, args in self.calls if name == method]


async def test_metadata_handler_gets_set_params_then_write_after_each_commit_and_reports(
    location: Any, sibling: Callable[[str], Any]
) -> None:
    handler = RecordingHandler(location)
    upload = sibling("uploaded")
    async with manager(location, metadata_handler=handler) as mgr:
        await mgr.init(list(TWO_NODES), path_prefix=upload.url)
        for ws in (mgr.workspace(node) for node in TWO_NODES):
            ws["total"] = 1
        await mgr.save(0)
        await mgr.save(1)
        report = await mgr.report_checkpoint_stats("checkpoint_save")

    assert handler.calls[0][0] == "set_params"
    assert handler.called("set_params")[0] == {
        "db_prefix": location.url,
        "db_type": "msgpack",
        "node_names": list(TWO_NODES),
        "path_prefix": upload.url,
        "path_type": None,
    }
    assert handler.called("write") == [0, 1]
    assert handler.committed_when_written == {0: True, 1: True}
    assert handler.called("report") == [("checkpoint_save", report)]


async def test_metadata_handler_last_epoch_answer_is_used_and_verified(location: Any) -> None:
    async with manager(location) as writer:
        await writer.init({"trainer_0": {"total": 1}})
        for epoch in (0, 1, 2):
            await writer.save(epoch)

    handler = RecordingHandler(location, last_epoch=1)
    async with manager(location, metadata_handler=handler) as mgr:
        assert await mgr.get_resume_from_epoch_id() == 1
        assert await mgr.get_resume_from_epoch_id(2) == 1
    assert handler.called("last_epoch") == [None, 2]

    handler = RecordingHandler(location, last_epoch=None)  # the handler says: start fresh
    async with manager(location, metadata_handler=handler) as mgr:
        assert await mgr.get_resume_from_epoch_id() is None

    handler = RecordingHandler(location, last_epoch=7)  # an epoch that is not committed
    async with manager(location, metadata_handler=handler) as mgr:
        with pytest.raises(CheckpointNotFoundError):
            await mgr.get_resume_from_epoch_id()


async def test_metadata_handler_cp_accessible_answer_is_used(location: Any) -> None:
    handler = RecordingHandler(location, accessible=False)
    async with manager(location, metadata_handler=handler) as mgr:
        assert await mgr.cp_accessible() is False
        handler.accessible = True
        assert await mgr.cp_accessible() is True
    assert handler.called("cp_accessible") == [None, None]


HANDLER_METHODS = ("set_params", "write", "last_epoch", "cp_accessible", "report")


async def test_a_metadata_handler_missing_a_method_is_refused_at_construction(location: Any) -> None:
    for missing in HANDLER_METHODS:
        methods = {name: getattr(RecordingHandler, name) for name in HANDLER_METHODS if name != missing}
        incomplete = type("IncompleteHandler", (), methods)()
        with pytest.raises(TypeError, match=missing):
            MultiNodeCheckpointManager(location.url, metadata_handler=incomplete, storage_options=location.options)
        not_callable = type("NotCallableHandler", (), {**methods, missing: "not a method"})()
        with pytest.raises(TypeError, match=missing):
            MultiNodeCheckpointManager(location.url, metadata_handler=not_callable, storage_options=location.options)


# --------------------------------------------------------------------------- lifecycle


async def test_a_manager_is_unusable_after_its_async_with_block(location: Any) -> None:
    workspaces = {"trainer_0": {"total": 1}}
    async with manager(location) as mgr:
        await mgr.init(workspaces)
        await mgr.save(0)
    operations: list[Callable[[], Any]] = [
        lambda: mgr.save(1),
        lambda: mgr.load(0),
        lambda: mgr.init(workspaces, retrieve_from_epoch=0),
        lambda: mgr.cp_accessible(),
        lambda: mgr.cp_accessible(0),
        lambda: mgr.get_resume_from_epoch_id(),
        lambda: mgr.load_blobs_locally(["trainer_0"], ["total"], 0, {}),
    ]
    for operation in operations:
        with pytest.raises(CheckpointStateError):
            await operation()
    await mgr.close()  # closing twice is harmless
    assert workspaces == {"trainer_0": {"total": 1}}


async def test_a_process_holding_some_nodes_loads_them_from_a_path_prefix(tmp_path: Path) -> None:
    # one process of a two-process job re-roots its reads; set_params must see all the
    # job's nodes, not only the ones this process holds
    nodes = ["trainer_0", "trainer_1"]
    saved = tmp_path / "saved"
    async with MultiNodeCheckpointManager(saved.as_uri()) as writer:
        await writer.init({"trainer_0": {"total": 7}, "trainer_1": {"total": 9}})
        await writer.save(3)
    async with MultiNodeCheckpointManager((tmp_path / "other").as_uri(), run_id="job") as mgr:
        await mgr.init(nodes, local_nodes=["trainer_1"])
        await mgr.load(3, path_prefix=saved.as_uri())
        assert dict(mgr.workspace("trainer_1")) == {"total": 9}
