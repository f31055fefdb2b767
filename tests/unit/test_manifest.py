"""manifest: the public records (EpochManifest, NodeRecord, NodeStats) survive their own JSON,
and anything malformed is refused as CheckpointCorruptedError.

Kept to round trips and refusals through ``to_json``/``from_json`` so that a new format
version only changes the sample and the list of damages. (Random damage: resilience/test_fuzz.py.)
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from asyncckpt import CheckpointCorruptedError, EpochManifest, NodeRecord, NodeStats
from asyncckpt.codec import BlobEntry
from asyncckpt.layout import receipt_key, shard_key

EPOCH = 7
WRITER = "run0.0a1b2c"
WHERE = "memory://unit/epochs/000000000007/manifest.json"


def sample_record(node: str) -> NodeRecord:
    blobs = {
        "weights": BlobEntry(16, 24, "ndarray", 0x1234, "<f8", (3,), "C"),
        "step": BlobEntry(40, 3, "msgpack", 0xFFFFFFFF),
        "raw": BlobEntry(43, 0, "bytes", 0),
    }
    stats = NodeStats(seconds=0.25, bytes=120, objects=2, requests=3, retries=1)
    return NodeRecord(node, shard_key(EPOCH, WRITER, node), receipt_key(EPOCH, WRITER, node), 120, 99, blobs, stats)


def sample_manifest() -> EpochManifest:
    nodes = {node: sample_record(node) for node in ("trainer_0", "trainer_1")}
    return EpochManifest(EPOCH, WRITER, nodes, db_type="msgpack", created_unix=1_700_000_000.5)


def manifest_tree() -> dict[str, Any]:
    return json.loads(sample_manifest().to_json())


# --------------------------------------------------------------------------- round trips


def test_a_manifest_round_trips_through_its_json() -> None:
    manifest = sample_manifest()
    text = manifest.to_json()
    assert EpochManifest.from_json(text, WHERE) == manifest
    assert EpochManifest.from_json(text, WHERE, epoch=EPOCH) == manifest
    assert EpochManifest.from_json(text, WHERE).run_id == "run0"


def test_a_manifest_is_readable_json_with_its_format_version_and_nodes() -> None:
    tree = manifest_tree()
    assert tree["format"] == "asyncckpt/manifest"
    assert isinstance(tree["version"], int)
    assert (tree["epoch"], tree["writer_id"], tree["db_type"]) == (EPOCH, WRITER, "msgpack")
    assert sorted(tree["nodes"]) == ["trainer_0", "trainer_1"]


def test_a_node_record_round_trips_through_its_json() -> None:
    record = sample_record("trainer_0")
    raw = json.loads(json.dumps(record.to_json()))
    assert NodeRecord.from_json("trainer_0", raw, WHERE) == record


def test_node_stats_round_trip_through_their_json() -> None:
    stats = NodeStats(seconds=1.5, bytes=10, objects=2, requests=5, retries=3)
    assert NodeStats.from_json(json.loads(json.dumps(stats.to_json()))) == stats


@pytest.mark.parametrize("raw", [None, "fast", [], {"bytes": "many"}, {"seconds": [1]}])
def test_node_stats_that_do_not_parse_read_as_zero(raw: Any) -> None:
    assert NodeStats.from_json(raw) == NodeStats()


# --------------------------------------------------------------------------- refusals


def damaged(path: tuple[Any, ...], value: Any) -> bytes:
    """The sample manifest's JSON with the field at ``path`` set to ``value`` (``...``: removed)."""
    tree = manifest_tree()
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if value is ...:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return json.dumps(tree).encode()


T0 = ("nodes", "trainer_0")

MALFORMED = {
    "empty": b"",
    "not JSON": b"{not json",
    "truncated": sample_manifest().to_json()[:-20],
    "not UTF-8": b"\xff\xfe{}",
    "a list": b"[]",
    "another format": damaged(("format",), "asyncckpt/receipt"),
    "an unknown version": damaged(("version",), 999),
    "no epoch": damaged(("epoch",), ...),
    "a negative epoch": damaged(("epoch",), -1),
    "a str epoch": damaged(("epoch",), "7"),
    "no writer_id": damaged(("writer_id",), ...),
    "no nodes": damaged(("nodes",), {}),
    "nodes as a list": damaged(("nodes",), []),
    "no created_unix": damaged(("created_unix",), ...),
    "created_unix NaN": damaged(("created_unix",), float("nan")),
    "a bad node name": damaged(("nodes", "a/b"), manifest_tree()["nodes"]["trainer_0"]),
    "a record that is a str": damaged(T0, "shard"),
    "a record without size": damaged((*T0, "size"), ...),
    "a negative size": damaged((*T0, "size"), -1),
    "a bool crc32c": damaged((*T0, "crc32c"), True),
    "a shard key outside its epoch": damaged((*T0, "shard"), shard_key(EPOCH + 1, WRITER, "trainer_0")),
    "an invalid shard key": damaged((*T0, "shard"), "epochs/000000000007/../x.shard"),
    "a receipt that is no key": damaged((*T0, "receipt"), 5),
    "blobs as a list": damaged((*T0, "blobs"), []),
    "a blob outside its shard": damaged((*T0, "blobs", "step", "offset"), 119),
    "a blob of an unknown encoding": damaged((*T0, "blobs", "step", "encoding"), "pickle"),
    "an array blob of the wrong length": damaged((*T0, "blobs", "weights", "length"), 25),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_manifest_is_corrupted_error(data: bytes) -> None:
    with pytest.raises(CheckpointCorruptedError):
        EpochManifest.from_json(data, WHERE)


def test_the_manifest_of_another_epoch_is_corrupted_error_naming_the_epoch_it_holds() -> None:
    with pytest.raises(CheckpointCorruptedError, match=f"{WHERE}.*epoch {EPOCH}"):
        EpochManifest.from_json(sample_manifest().to_json(), WHERE, epoch=EPOCH + 1)


def test_a_malformed_node_record_is_corrupted_error_naming_the_node() -> None:
    raw = sample_record("trainer_0").to_json()
    with pytest.raises(CheckpointCorruptedError, match="trainer_0"):
        NodeRecord.from_json("trainer_0", {**raw, "size": "big"}, WHERE)
    with pytest.raises(CheckpointCorruptedError, match="trainer_0"):
        NodeRecord.from_json("trainer_0", {**raw, "blobs": {"weights": {"offset": 0}}}, WHERE)
