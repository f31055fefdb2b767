"""manifest: the records of the bucket format survive their own JSON, anything malformed is
refused as CheckpointCorruptedError, and format 1 manifests still parse.

Kept to round trips and refusals through ``to_json``/``from_json`` so that a new format
version only changes the samples and the list of damages. (Random damage:
resilience/test_fuzz.py; a format 1 epoch loading end to end: manager/test_save_load.py.)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from asyncckpt import CheckpointCorruptedError, EpochManifest, NodeRecord, NodeStats, codec
from asyncckpt.layout import index_key, receipt_key, shard_key
from asyncckpt.manifest import Decision, EpochIndex, EpochRef, ObjectRef

EPOCH = 7
WRITER = "run0.0a1b2c"
WHERE = "memory://unit/epochs/000000000007/manifest.json"


def sample_record(node: str, *, receipt: bool = False) -> NodeRecord:
    stats = NodeStats(seconds=0.25, bytes=120, objects=2, requests=3, retries=1)
    key = receipt_key(EPOCH, WRITER, "tok", node) if receipt else None
    return NodeRecord(node, shard_key(EPOCH, WRITER, node), 120, 99, stats, key, 0xABCDEF)


def sample_index() -> EpochIndex:
    return EpochIndex(EPOCH, WRITER, {node: sample_record(node) for node in ("trainer_0", "trainer_1")})


def sample_manifest() -> EpochManifest:
    index = sample_index()
    manifest = EpochManifest.for_index(index, index_key(EPOCH, WRITER), index.to_json(), "msgpack", {"loss": 0.25})
    return dataclasses.replace(manifest, created_unix=1_700_000_000.5)


def manifest_tree() -> dict[str, Any]:
    return json.loads(sample_manifest().to_json())


def parse_index(data: bytes) -> EpochIndex:
    return EpochIndex.from_json(data, WHERE, epoch=EPOCH, writer_id=WRITER)


# --------------------------------------------------------------------------- round trips


def test_a_manifest_round_trips_through_its_json() -> None:
    manifest = sample_manifest()
    text = manifest.to_json()
    assert EpochManifest.from_json(text, WHERE) == manifest
    assert EpochManifest.from_json(text, WHERE, epoch=EPOCH) == manifest
    assert EpochManifest.from_json(text, WHERE).run_id == "run0"


def test_a_manifest_is_small_readable_json_pointing_at_its_index() -> None:
    tree = manifest_tree()
    assert tree["format"] == "asyncckpt/manifest" and tree["version"] == 2
    assert (tree["epoch"], tree["writer_id"], tree["db_type"]) == (EPOCH, WRITER, "msgpack")
    assert (tree["nodes"], tree["bytes"], tree["metrics"]) == (2, 240, {"loss": 0.25})
    data = sample_index().to_json()
    assert tree["index"] == {"key": index_key(EPOCH, WRITER), "size": len(data), "crc32c": codec.checksum(data)}


def test_the_manifest_does_not_grow_with_the_nodes() -> None:
    few = EpochIndex(EPOCH, WRITER, {f"n{i}": sample_record(f"n{i}") for i in range(2)})
    many = EpochIndex(EPOCH, WRITER, {f"n{i}": sample_record(f"n{i}") for i in range(2000)})
    sizes = [len(EpochManifest.for_index(i, "k", i.to_json(), "msgpack").to_json()) for i in (few, many)]
    assert sizes[1] - sizes[0] < 16  # only the digits of a few numbers (totals, index size)


def test_an_index_round_trips_through_its_json() -> None:
    index = dataclasses.replace(sample_index(), nodes={"n": sample_record("n", receipt=True)})
    assert parse_index(index.to_json()) == index
    assert index.keys == {shard_key(EPOCH, WRITER, "n"), receipt_key(EPOCH, WRITER, "tok", "n")}


def test_an_index_of_another_writer_or_epoch_is_refused() -> None:
    data = sample_index().to_json()
    with pytest.raises(CheckpointCorruptedError, match="another commit"):
        EpochIndex.from_json(data, WHERE, epoch=EPOCH, writer_id="run1.ffffff")
    with pytest.raises(CheckpointCorruptedError, match="another commit"):
        EpochIndex.from_json(data, WHERE, epoch=EPOCH + 1, writer_id=WRITER)


@pytest.mark.parametrize("verdict", ["commit", "abort", "abandoned"])
def test_a_decision_round_trips_through_its_json(verdict: str) -> None:
    manifest = sample_manifest() if verdict == "commit" else None
    reason, missing = ("late", ("trainer_1",)) if verdict == "abort" else ("", ())
    decision = Decision(EPOCH, WRITER, verdict, manifest, reason, missing)
    assert Decision.from_json(decision.to_json(), WHERE, epoch=EPOCH, writer_id=WRITER) == decision


def test_a_commit_decision_must_carry_its_own_writers_manifest() -> None:
    tree = json.loads(Decision(EPOCH, WRITER, "commit", sample_manifest()).to_json())
    del tree["manifest"]
    with pytest.raises(CheckpointCorruptedError, match="without its manifest"):
        Decision.from_json(json.dumps(tree).encode(), WHERE, epoch=EPOCH, writer_id=WRITER)
    other = dataclasses.replace(sample_manifest(), writer_id="run1.ffffff")
    with pytest.raises(CheckpointCorruptedError, match="another writer"):
        Decision.from_json(Decision(EPOCH, WRITER, "commit", other).to_json(), WHERE, epoch=EPOCH, writer_id=WRITER)


def test_a_node_record_round_trips_through_its_json_and_as_a_receipt() -> None:
    record = sample_record("trainer_0", receipt=True)
    assert NodeRecord.from_json("trainer_0", json.loads(json.dumps(record.to_json())), WHERE) == record
    assert NodeRecord.from_receipt(record.receipt_json(EPOCH, WRITER), WHERE) == (EPOCH, WRITER, record)


def test_node_stats_round_trip_through_their_json() -> None:
    stats = NodeStats(seconds=1.5, bytes=10, objects=2, requests=5, retries=3)
    assert NodeStats.from_json(json.loads(json.dumps(stats.to_json()))) == stats


@pytest.mark.parametrize("raw", [None, "fast", [], {"bytes": "many"}, {"seconds": [1]}])
def test_node_stats_that_do_not_parse_read_as_zero(raw: Any) -> None:
    assert NodeStats.from_json(raw) == NodeStats()


def test_a_format_1_manifest_still_parses_with_its_index_inline() -> None:
    """Format 1 kept every node's record, blob index included, in the manifest itself."""
    blobs = {
        "w": {
            "offset": 16,
            "length": 24,
            "encoding": "ndarray",
            "crc32c": 5,
            "dtype": "<f8",
            "shape": [3],
            "order": "C",
        }
    }
    tree = {
        "format": "asyncckpt/manifest",
        "version": 1,
        "epoch": EPOCH,
        "writer_id": WRITER,
        "db_type": "msgpack",
        "created": "2026-12-01T00:00:00.000+00:00",
        "created_unix": 1_764_547_200.0,
        "nodes": {
            node: {
                "shard": shard_key(EPOCH, WRITER, node),
                "receipt": f"epochs/{EPOCH:012d}/{WRITER}/{node}.receipt.json",
                "size": 120,
                "crc32c": 99,
                "blobs": blobs,
                "stats": {"seconds": 0.5, "bytes": 120, "objects": 2, "requests": 2, "retries": 0},
            }
            for node in ("a", "b")
        },
    }
    manifest = EpochManifest.from_json(json.dumps(tree).encode(), WHERE, epoch=EPOCH)
    assert (manifest.version, manifest.node_count, manifest.total_bytes, manifest.metrics) == (1, 2, 240, {})
    assert manifest.inline_index is not None and sorted(manifest.inline_index.nodes) == ["a", "b"]
    record = manifest.inline_index.nodes["a"]
    assert (record.shard, record.size, record.crc32c, record.index_crc32c) == (
        shard_key(EPOCH, WRITER, "a"),
        120,
        99,
        None,
    )
    assert record.receipt is not None and record.receipt in manifest.inline_index.keys


# --------------------------------------------------------------------------- refusals


def damaged(tree: dict[str, Any], path: tuple[Any, ...], value: Any) -> bytes:
    """``tree``'s JSON with the field at ``path`` set to ``value`` (``...``: removed)."""
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if value is ...:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return json.dumps(tree).encode()


def bad_manifest(path: tuple[Any, ...], value: Any) -> bytes:
    return damaged(manifest_tree(), path, value)


def bad_index(path: tuple[Any, ...], value: Any) -> bytes:
    return damaged(json.loads(sample_index().to_json()), path, value)


T0 = ("nodes", "trainer_0")

MALFORMED_MANIFESTS = {
    "empty": b"",
    "not JSON": b"{not json",
    "truncated": sample_manifest().to_json()[:-20],
    "not UTF-8": b"\xff\xfe{}",
    "a list": b"[]",
    "another format": bad_manifest(("format",), "asyncckpt/receipt"),
    "an unknown version": bad_manifest(("version",), 999),
    "no epoch": bad_manifest(("epoch",), ...),
    "a negative epoch": bad_manifest(("epoch",), -1),
    "a str epoch": bad_manifest(("epoch",), "7"),
    "no writer_id": bad_manifest(("writer_id",), ...),
    "no index": bad_manifest(("index",), ...),
    "an index key outside its epoch": bad_manifest(("index", "key"), index_key(EPOCH + 1, WRITER)),
    "an invalid index key": bad_manifest(("index", "key"), "epochs/000000000007/../index.json"),
    "a negative index size": bad_manifest(("index", "size"), -1),
    "a bool node count": bad_manifest(("nodes",), True),
    "no created_unix": bad_manifest(("created_unix",), ...),
    "created_unix NaN": bad_manifest(("created_unix",), float("nan")),
    "a metric that is no number": bad_manifest(("metrics", "loss"), "low"),
    "metrics as a list": bad_manifest(("metrics",), [1.0]),
}
MALFORMED_INDEXES = {
    "not JSON": b"{not json",
    "another format": bad_index(("format",), "asyncckpt/manifest"),
    "no nodes": bad_index(("nodes",), {}),
    "nodes as a list": bad_index(("nodes",), []),
    "a bad node name": bad_index(("nodes", "a/b"), json.loads(sample_index().to_json())["nodes"]["trainer_0"]),
    "a record that is a str": bad_index(T0, "shard"),
    "a record without size": bad_index((*T0, "size"), ...),
    "a negative size": bad_index((*T0, "size"), -1),
    "a bool crc32c": bad_index((*T0, "crc32c"), True),
    "a crc32c of 33 bits": bad_index((*T0, "index_crc32c"), 1 << 32),
    "a shard key outside its epoch": bad_index((*T0, "shard"), shard_key(EPOCH + 1, WRITER, "trainer_0")),
    "an invalid shard key": bad_index((*T0, "shard"), "epochs/000000000007/../x.shard"),
    "a receipt that is no key": bad_index((*T0, "receipt"), 5),
}


@pytest.mark.parametrize("data", MALFORMED_MANIFESTS.values(), ids=MALFORMED_MANIFESTS.keys())
def test_a_malformed_manifest_is_corrupted_error(data: bytes) -> None:
    with pytest.raises(CheckpointCorruptedError):
        EpochManifest.from_json(data, WHERE)


@pytest.mark.parametrize("data", MALFORMED_INDEXES.values(), ids=MALFORMED_INDEXES.keys())
def test_a_malformed_index_is_corrupted_error(data: bytes) -> None:
    with pytest.raises(CheckpointCorruptedError):
        parse_index(data)


def test_the_manifest_of_another_epoch_is_corrupted_error_naming_the_epoch_it_holds() -> None:
    with pytest.raises(CheckpointCorruptedError, match=f"{WHERE}.*epoch {EPOCH}"):
        EpochManifest.from_json(sample_manifest().to_json(), WHERE, epoch=EPOCH + 1)


def test_a_malformed_node_record_is_corrupted_error_naming_the_node() -> None:
    raw = sample_record("trainer_0").to_json()
    with pytest.raises(CheckpointCorruptedError, match="trainer_0"):
        NodeRecord.from_json("trainer_0", {**raw, "size": "big"}, WHERE)
    with pytest.raises(CheckpointCorruptedError, match="trainer_0"):
        NodeRecord.from_json("trainer_0", {**raw, "shard": None}, WHERE)


# --------------------------------------------------------------------------- format 3: pointers


def shared_record(node: str = "trainer_0") -> NodeRecord:
    stats = NodeStats(seconds=0.25, bytes=120, objects=1, requests=1, reused_bytes=4096)
    refs = (ObjectRef(shard_key(3, "run0.000001", node), 5000), ObjectRef(shard_key(1, "run0.000002", node), 7000))
    return dataclasses.replace(sample_record(node), stats=stats, refs=refs, base=EpochRef(6, "run0.000003"))


def test_records_with_pointers_round_trip_as_format_3_and_others_stay_format_2() -> None:
    shared = EpochIndex(EPOCH, WRITER, {"trainer_0": shared_record(), "trainer_1": sample_record("trainer_1")})
    assert shared.version == 3 and sample_index().version == 2
    assert parse_index(shared.to_json()) == shared
    assert shared.referenced == {ref.key for ref in shared_record().refs} and shared.reused_bytes == 4096
    manifest = EpochManifest.for_index(shared, index_key(EPOCH, WRITER), shared.to_json(), "msgpack")
    raw = json.loads(manifest.to_json())
    assert raw["version"] == 3 and raw["reused_bytes"] == 4096
    assert EpochManifest.from_json(manifest.to_json(), WHERE) == manifest
    assert json.loads(sample_manifest().to_json())["version"] == 2
    decision = Decision(EPOCH, WRITER, "commit", manifest)
    assert json.loads(decision.to_json())["version"] == 3
    assert Decision.from_json(decision.to_json(), WHERE, epoch=EPOCH, writer_id=WRITER) == decision
    record = shared_record()
    assert NodeRecord.from_receipt(record.receipt_json(EPOCH, WRITER), WHERE) == (EPOCH, WRITER, record)


@pytest.mark.parametrize(
    "refs",
    [
        [{"key": "epochs/000000000007/run0.1/trainer_0.shard", "size": 1}],  # its own epoch
        [{"key": "epochs/000000000003/run0.1/index.json", "size": 1}],  # not a shard
        [{"key": "elsewhere/trainer_0.shard", "size": 1}],  # outside every epoch
        [{"key": "epochs/000000000003/run0.1/trainer_0.shard", "size": -1}],
        [{"key": "epochs/000000000003/run0.1/trainer_0.shard"}],
        {"key": "epochs/000000000003/run0.1/trainer_0.shard", "size": 1},
    ],
)
def test_a_record_pointing_at_what_is_not_a_shard_of_another_epoch_is_refused(refs: Any) -> None:
    body = json.loads(EpochIndex(EPOCH, WRITER, {"trainer_0": shared_record()}).to_json())
    body["nodes"]["trainer_0"]["refs"] = refs
    with pytest.raises(CheckpointCorruptedError, match="trainer_0"):
        parse_index(json.dumps(body).encode())


def test_records_whose_leaves_point_elsewhere_round_trip_as_format_4() -> None:
    record = dataclasses.replace(shared_record(), leaf_refs=True)
    index = EpochIndex(EPOCH, WRITER, {"trainer_0": record, "trainer_1": shared_record("trainer_1")})
    assert index.version == 4 and parse_index(index.to_json()) == index
    manifest = EpochManifest.for_index(index, index_key(EPOCH, WRITER), index.to_json(), "msgpack")
    assert (
        json.loads(manifest.to_json())["version"] == 4
        and EpochManifest.from_json(manifest.to_json(), WHERE) == manifest
    )
    decision = Decision(EPOCH, WRITER, "commit", manifest)
    assert json.loads(decision.to_json())["version"] == 4
    assert Decision.from_json(decision.to_json(), WHERE, epoch=EPOCH, writer_id=WRITER) == decision
    assert json.loads(record.receipt_json(EPOCH, WRITER))["version"] == 4
    assert NodeRecord.from_receipt(record.receipt_json(EPOCH, WRITER), WHERE) == (EPOCH, WRITER, record)
    body = json.loads(EpochIndex(EPOCH, WRITER, {"trainer_0": sample_record("trainer_0")}).to_json())
    body["nodes"]["trainer_0"]["leaf_refs"] = True  # pointers without the objects they point into
    with pytest.raises(CheckpointCorruptedError, match="leaf_refs"):
        parse_index(json.dumps(body).encode())


def test_a_version_this_reader_does_not_know_is_refused_by_its_version() -> None:
    body = manifest_tree()
    body["version"] = 5
    with pytest.raises(CheckpointCorruptedError, match="version 5"):
        EpochManifest.from_json(json.dumps(body).encode(), WHERE)
