"""Damaged checkpoints: every kind of damage is detected, named precisely, and changes nothing.

Committed three-node epochs are damaged through the storage API, one kind of damage
per epoch (a flipped byte in a blob, a truncated shard, two nodes' shards swapped, a
deleted shard, a hand-edited blob index inside a shard, hand-edited manifests and indexes). Loading one must raise ``CheckpointCorruptedError``
(``CheckpointNotFoundError`` for a missing object) whose message names the node, the
blob where the damage is inside one, and the object, and must leave every workspace
exactly as it was, including the workspaces of nodes whose shards were fine. ``load_blobs_locally`` must behave the same
for its session, ``cp_accessible`` must notice missing and truncated shards, and resume
must skip an epoch whose manifest does not parse.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest

from asyncckpt import MultiNodeCheckpointManager, codec
from asyncckpt.errors import CheckpointCorruptedError, CheckpointNotFoundError
from asyncckpt.layout import manifest_key
from asyncckpt.storage import Storage, storage_for
from tests.support.asserts import assert_same

NODES = ("trainer-0", "trainer-1", "ps-0")
OTHER_EPOCH = 20  # intact; its shards are what a damaged manifest points at


# --------------------------------------------------------------------------- state


def node_state(node: str, tag: int) -> dict[str, Any]:
    """Blobs of one node; the two trainers have the same layout (same sizes), other values."""
    index = NODES.index(node)
    if node.startswith("trainer"):
        return {
            "weights": np.arange(4096, dtype=np.float32) * (tag + 1) + index,
            "bias": bytes([tag % 256, index]) * 64,
            "meta": {"node": node, "tag": tag, "lr": 0.125, "history": [tag, index, 3]},
            "step": tag * 1000 + index,
        }
    return {
        "table": np.full((64, 32), tag * 10 + index, dtype=np.int64),
        "optimizer": {"momentum": [float(tag)] * 10, "name": "sgd"},
        "label": f"ps at tag {tag}",
    }


def job_state(tag: int) -> dict[str, dict[str, Any]]:
    return {node: node_state(node, tag) for node in NODES}


@dataclass
class Frozen:
    """A deep copy of some mappings plus the identity of every value, to prove nothing changed."""

    copies: dict[str, dict[str, Any]]
    ids: dict[str, dict[str, int]]

    @classmethod
    def of(cls, mappings: Mapping[str, Mapping[str, Any]]) -> Frozen:
        return cls(
            {name: copy.deepcopy(dict(m)) for name, m in mappings.items()},
            {name: {k: id(v) for k, v in m.items()} for name, m in mappings.items()},
        )

    def check(self, mappings: Mapping[str, Mapping[str, Any]]) -> None:
        for name, m in mappings.items():
            assert {k: id(v) for k, v in m.items()} == self.ids[name], f"{name}: entries were replaced"
            assert_same(dict(m), self.copies[name], name)


# --------------------------------------------------------------------------- damage


@dataclass(frozen=True)
class Expect:
    """What the error must say: its class, the nodes, the blob, and objects (any of ``urls``)."""

    error: type[Exception]
    nodes: tuple[str, ...]
    blob: str | None
    urls: tuple[str, ...]
    all_urls: bool = False  # every url must be named (else at least one)


@dataclass
class Damaged:
    """A location holding one committed epoch per kind of damage, each damaged, plus an intact one."""

    location: Any
    raw: Storage  # direct access to the stored objects
    manifests: dict[int, dict[str, Any]]  # parsed JSON of the manifests as committed, see read_commit
    epochs: dict[str, int]  # damage name -> its epoch
    expect: dict[str, Expect]  # damage name -> what loading that epoch must raise

    def shard_key(self, node: str, epoch: int) -> str:
        return self.manifests[epoch]["nodes"][node]["shard"]

    def shard_url(self, node: str, epoch: int) -> str:
        return self.raw.url_of(self.shard_key(node, epoch))

    def manifest_url(self, epoch: int) -> str:
        return self.raw.url_of(manifest_key(epoch))

    def index_url(self, epoch: int) -> str:
        return self.raw.url_of(self.manifests[epoch]["index"]["key"])

    def manager(self) -> MultiNodeCheckpointManager:
        return MultiNodeCheckpointManager(self.location.url, storage_options=self.location.options)


async def rewrite(raw: Storage, key: str, change: Callable[[bytes], bytes]) -> None:
    data = await raw.get(key)
    changed = change(data)
    assert changed != data
    await raw.put(key, changed)


async def read_commit(raw: Storage, epoch: int) -> dict[str, Any]:
    """The manifest's JSON, with its index's node records under ``"nodes"`` and, in
    each, the blob index read from the shard's trailer under ``"blobs"``."""
    manifest = json.loads(await raw.get(manifest_key(epoch)))
    index = json.loads(await raw.get(manifest["index"]["key"]))
    for record in index["nodes"].values():
        shard = await raw.get(record["shard"])
        offset, length, _ = codec.parse_trailer(shard[-codec.TRAILER_SIZE :], len(shard), "shard")
        record["blobs"] = msgpack.unpackb(shard[offset : offset + length])
    return {**manifest, "nodes": index["nodes"], "manifest": manifest}


async def edit_manifest(d: Damaged, epoch: int, change: Callable[[dict[str, Any]], None]) -> None:
    body = copy.deepcopy(d.manifests[epoch]["manifest"])
    change(body)
    await d.raw.put(manifest_key(epoch), json.dumps(body, indent=1).encode())


async def edit_index(d: Damaged, epoch: int, change: Callable[[dict[str, Any]], None], *, consistent: bool) -> None:
    """Edit the epoch's index; ``consistent`` also updates its size and CRC32C in the
    manifest (a careful hand edit that only the deeper checks can catch)."""
    key = d.manifests[epoch]["index"]["key"]
    body = json.loads(await d.raw.get(key))
    change(body)
    data = json.dumps(body, indent=1).encode()
    await d.raw.put(key, data)
    if consistent:

        def point_at(manifest: dict[str, Any]) -> None:
            manifest["index"].update(size=len(data), crc32c=codec.checksum(data))

        await edit_manifest(d, epoch, point_at)


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


async def flip_payload_byte(d: Damaged, e: int) -> Expect:
    node, blob = "trainer-1", "weights"
    entry = d.manifests[e]["nodes"][node]["blobs"][blob]
    await rewrite(d.raw, d.shard_key(node, e), lambda b: flip(b, entry["offset"] + entry["length"] // 2))
    return Expect(CheckpointCorruptedError, (node,), blob, (d.shard_url(node, e),))


async def truncate_shard(d: Damaged, e: int) -> Expect:
    node = "trainer-0"
    await rewrite(d.raw, d.shard_key(node, e), lambda b: b[:-17])
    return Expect(CheckpointCorruptedError, (node,), None, (d.shard_url(node, e),))


async def swap_shards(d: Damaged, e: int) -> Expect:
    a, b = "trainer-0", "trainer-1"
    data_a, data_b = await d.raw.get(d.shard_key(a, e)), await d.raw.get(d.shard_key(b, e))
    assert len(data_a) == len(data_b), "the trainers' shards should have the same size (same layout)"
    await d.raw.put(d.shard_key(a, e), data_b)
    await d.raw.put(d.shard_key(b, e), data_a)
    return Expect(CheckpointCorruptedError, (a, b), None, (d.shard_url(a, e), d.shard_url(b, e)), all_urls=True)


async def delete_shard(d: Damaged, e: int) -> Expect:
    node = "ps-0"
    await d.raw.delete([d.shard_key(node, e)])
    return Expect(CheckpointNotFoundError, (node,), None, (d.shard_url(node, e),))


async def shard_index_blob_crc(d: Damaged, e: int) -> Expect:
    """A blob's CRC32C edited in the shard's own blob index, its index checksum kept right:
    the index no longer matches the one the node's record vouches for."""
    node, blob = "trainer-1", "weights"

    def change(data: bytes) -> bytes:
        offset, length, _ = codec.parse_trailer(data[-codec.TRAILER_SIZE :], len(data), "shard")
        raw = msgpack.unpackb(data[offset : offset + length])
        raw[blob]["crc32c"] ^= 0x5A5A
        index = {name: codec.BlobEntry.from_json(entry, name) for name, entry in raw.items()}
        changed = data[:offset] + codec.shard_trailer(index, offset)
        assert len(changed) == len(data)
        return changed

    await rewrite(d.raw, d.shard_key(node, e), change)
    return Expect(CheckpointCorruptedError, (node,), None, (d.shard_url(node, e),))


async def index_size(d: Damaged, e: int) -> Expect:
    node = "trainer-0"

    def change(body: dict[str, Any]) -> None:
        body["nodes"][node]["size"] += 7

    await edit_index(d, e, change, consistent=True)
    return Expect(CheckpointCorruptedError, (node,), None, (d.shard_url(node, e), d.manifest_url(e)))


async def index_other_epochs_shard(d: Damaged, e: int) -> Expect:
    node = "trainer-0"
    other = d.shard_key(node, OTHER_EPOCH)

    def change(body: dict[str, Any]) -> None:
        body["nodes"][node]["shard"] = other

    await edit_index(d, e, change, consistent=True)
    # the message names the offending key (a substring of its URL)
    return Expect(CheckpointCorruptedError, (node,), None, (other,))


async def index_edited_alone(d: Damaged, e: int) -> Expect:
    """The index changed behind its manifest's back: its size or CRC32C no longer match."""

    def change(body: dict[str, Any]) -> None:
        body["nodes"]["ps-0"]["stats"]["seconds"] = 1234.5

    await edit_index(d, e, change, consistent=False)
    return Expect(CheckpointCorruptedError, (), None, (d.index_url(e),))


async def manifest_invalid_json(d: Damaged, e: int) -> Expect:
    await rewrite(d.raw, manifest_key(e), lambda b: b[: len(b) // 2])
    return Expect(CheckpointCorruptedError, (), None, (d.manifest_url(e),))


async def manifest_wrong_epoch(d: Damaged, e: int) -> Expect:
    def change(body: dict[str, Any]) -> None:
        body["epoch"] = OTHER_EPOCH

    await edit_manifest(d, e, change)
    return Expect(CheckpointCorruptedError, (), None, (d.manifest_url(e),))


DAMAGES: dict[str, Callable[[Damaged, int], Awaitable[Expect]]] = {
    "flip_payload_byte": flip_payload_byte,
    "truncate_shard": truncate_shard,
    "swap_shards": swap_shards,
    "delete_shard": delete_shard,
    "shard_index_blob_crc": shard_index_blob_crc,
    "index_size": index_size,
    "index_other_epochs_shard": index_other_epochs_shard,
    "index_edited_alone": index_edited_alone,
    "manifest_invalid_json": manifest_invalid_json,
    "manifest_wrong_epoch": manifest_wrong_epoch,
}


@pytest.fixture
async def damaged(location: Any) -> Any:
    """One committed epoch per damage (epochs 1..9), each damaged; epoch 20 intact.

    One location per test keeps the S3 variant cheap (client start-up dominates); every
    damage is still checked and reported on its own (see :class:`Findings`).
    """
    epochs = {name: i + 1 for i, name in enumerate(DAMAGES)}
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
        await mgr.init({node: {} for node in NODES})
        for epoch in [*epochs.values(), OTHER_EPOCH]:
            for node, blobs in job_state(epoch).items():
                mgr.workspace(node).update(blobs)
            await mgr.save(epoch)
    async with storage_for(location.url, options=location.options) as raw:
        manifests = {e: await read_commit(raw, e) for e in [*epochs.values(), OTHER_EPOCH]}
        d = Damaged(location, raw, manifests, epochs, {})
        for name, damage in DAMAGES.items():
            d.expect[name] = await damage(d, epochs[name])
        yield d


def restarted_workspaces() -> dict[str, dict[str, Any]]:
    """Workspaces of a restarted job: other values, and an entry no checkpoint has."""
    workspaces = job_state(77)
    for node, ws in workspaces.items():
        ws["local-only"] = np.ones(3, dtype=np.int8) * NODES.index(node)
    return workspaces


class Findings:
    """Soft assertions: every damage is checked, and the test fails listing each that misbehaved."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    @contextlib.contextmanager
    def case(self, name: str) -> Iterator[None]:
        try:
            yield
        except AssertionError as exc:
            self.problems.append(f"[{name}] {exc}")
        except Exception as exc:  # an unexpected outcome (wrong exception, or success)
            self.problems.append(f"[{name}] unexpected {type(exc).__name__}: {exc}")

    def check(self) -> None:
        if self.problems:
            raise AssertionError(f"{len(self.problems)} case(s) misbehaved:\n" + "\n".join(self.problems))


def check_raised(exc: BaseException | None, expect: Expect) -> None:
    """The error is of the expected class and names the nodes, the blob and the objects."""
    if exc is None:
        raise AssertionError(f"no error raised, expected {expect.error.__name__}")
    if not isinstance(exc, expect.error):
        raise AssertionError(f"raised {type(exc).__name__}, expected {expect.error.__name__}: {exc}")
    message = str(exc)
    missing = [f"node {node!r}" for node in expect.nodes if repr(node) not in message]
    if expect.blob is not None and repr(expect.blob) not in message:
        missing.append(f"blob {expect.blob!r}")
    named = [url for url in expect.urls if url in message]
    if (expect.all_urls and named != list(expect.urls)) or not named:
        missing.append(("every one of " if expect.all_urls else "one of ") + f"the objects {list(expect.urls)}")
    if missing:
        raise AssertionError(f"{type(exc).__name__} does not name {', '.join(missing)}: {message}")


async def raised(aw: Awaitable[Any]) -> BaseException | None:
    try:
        await aw
    except Exception as exc:
        return exc
    return None


# --------------------------------------------------------------------------- load


async def test_load_of_damaged_epoch_raises_and_changes_no_workspace(damaged: Damaged) -> None:
    workspaces = restarted_workspaces()
    findings = Findings()
    async with damaged.manager() as mgr:
        await mgr.init(workspaces)
        for name, epoch in damaged.epochs.items():
            with findings.case(name):
                before = Frozen.of(workspaces)
                check_raised(await raised(mgr.load(epoch)), damaged.expect[name])
                before.check(workspaces)
                before.check({node: mgr.workspace(node) for node in NODES})
        # the intact epoch next to the damaged ones loads, and other entries stay
        await mgr.load(OTHER_EPOCH)
        for node, blobs in job_state(OTHER_EPOCH).items():
            assert_same({k: workspaces[node][k] for k in blobs}, blobs, node)
            assert "local-only" in workspaces[node]
    findings.check()


async def test_intact_epoch_loads(location: Any) -> None:
    """The control for the damage cases: the same kind of epoch, undamaged, loads every value."""
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
        await mgr.init(job_state(1))
        await mgr.save(1)
    workspaces = restarted_workspaces()
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
        await mgr.init(workspaces)
        assert await mgr.cp_accessible(1)
        await mgr.load(1)
        for node, blobs in job_state(1).items():
            assert_same({k: workspaces[node][k] for k in blobs}, blobs, node)
        session: dict[str, Any] = {}
        assert await mgr.load_blobs_locally(["trainer-0", "ps-0"], ["trainer-0/weights", "table"], 1, session)
        assert_same(
            session, {"trainer-0/weights": job_state(1)["trainer-0"]["weights"], "table": job_state(1)["ps-0"]["table"]}
        )


# --------------------------------------------------------------------------- load_blobs_locally

# For each damage: the nodes and names a partial load asks for (each request touches the damage).
PARTIAL_REQUESTS: dict[str, tuple[list[str], list[str]]] = {
    "flip_payload_byte": (["trainer-1"], ["weights", "bias"]),
    "truncate_shard": (["trainer-0", "ps-0"], ["trainer-0/bias", "table"]),
    "swap_shards": (["trainer-0"], ["weights"]),
    "shard_index_blob_crc": (["trainer-1"], ["weights"]),
    "index_size": (["trainer-0"], ["step"]),
    "index_other_epochs_shard": (["trainer-0"], ["bias"]),
    "index_edited_alone": (["ps-0"], ["table"]),
    "manifest_invalid_json": (["ps-0"], ["table"]),
    "manifest_wrong_epoch": (["ps-0"], ["table"]),
}


async def test_partial_load_of_damaged_epoch_raises_and_leaves_session(damaged: Damaged) -> None:
    workspaces = restarted_workspaces()
    findings = Findings()
    async with damaged.manager() as mgr:
        await mgr.init(workspaces)
        for name, (nodes, names) in PARTIAL_REQUESTS.items():
            epoch = damaged.epochs[name]
            expect = damaged.expect[name]
            if name == "swap_shards":
                # only trainer-0's blob index and weights are fetched: its index is not the recorded one
                expect = Expect(
                    CheckpointCorruptedError, ("trainer-0",), None, (damaged.shard_url("trainer-0", epoch),)
                )
            with findings.case(name):
                session: dict[str, Any] = {"weights": np.zeros(2), "untouched": {"a": [1, 2]}}
                before = Frozen.of({"session": session, **workspaces})
                check_raised(await raised(mgr.load_blobs_locally(nodes, names, epoch, session)), expect)
                before.check({"session": session, **workspaces})
    findings.check()


async def test_partial_loads_and_probes_around_damage(damaged: Damaged) -> None:
    findings = Findings()
    async with damaged.manager() as mgr:
        await mgr.init(list(NODES))

        with findings.case("delete_shard: load_blobs_locally returns False"):
            # DESIGN 2: False, and the session untouched, when a listed node's shard is missing
            session: dict[str, Any] = {"table": "old", "x": 1}
            before = Frozen.of({"session": session})
            epoch = damaged.epochs["delete_shard"]  # ps-0's shard is gone
            found = await mgr.load_blobs_locally(["trainer-0", "ps-0"], ["table", "trainer-0/step"], epoch, session)
            assert found is False, f"load_blobs_locally returned {found!r}"
            before.check({"session": session})

        with findings.case("flip_payload_byte: an undamaged neighbour blob loads"):
            # only the requested blobs' bytes are fetched and verified: the damage is not in them
            epoch = damaged.epochs["flip_payload_byte"]  # trainer-1's weights are damaged
            session = {}
            assert await mgr.load_blobs_locally(["trainer-1"], ["bias", "meta"], epoch, session)
            expected = node_state("trainer-1", epoch)
            assert_same(session, {"bias": expected["bias"], "meta": expected["meta"]})

        for name in (
            "delete_shard",
            "truncate_shard",
            "index_size",
            "index_edited_alone",
            "manifest_invalid_json",
            "manifest_wrong_epoch",
        ):
            with findings.case(f"{name}: cp_accessible is False"):
                assert await mgr.cp_accessible(damaged.epochs[name]) is False
        assert await mgr.cp_accessible(OTHER_EPOCH) is True
        assert await mgr.cp_accessible(None) is True
    findings.check()


# --------------------------------------------------------------------------- resume


async def test_resume_skips_an_epoch_whose_manifest_is_invalid_json(location: Any) -> None:
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
        await mgr.init(job_state(1))
        await mgr.save(1)
        await mgr.save(2)
        async with storage_for(location.url, options=location.options) as raw:
            await rewrite(raw, manifest_key(2), lambda b: b"{ this is not json" + b[:10])
            assert await mgr.get_resume_from_epoch_id() == 1
            assert await mgr.committed_epochs() == [1]
            assert await mgr.cp_accessible(2) is False
            with pytest.raises(CheckpointCorruptedError) as info:
                await mgr.get_resume_from_epoch_id(2)
            assert raw.url_of(manifest_key(2)) in str(info.value)
            # and with no valid manifest left, there is nothing to resume from
            await rewrite(raw, manifest_key(1), lambda b: b[:-40])
            assert await mgr.get_resume_from_epoch_id() is None
