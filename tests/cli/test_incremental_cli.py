"""ls, show and verify on epochs of incremental saves: bytes uploaded vs reused, where a
reused blob lives, and verify reading (and checking) the reused bytes too."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from click.testing import CliRunner, Result

from asyncckpt import MultiNodeCheckpointManager
from asyncckpt.cli import EXIT_FAILED, EXIT_OK, main

FROZEN = {f"w{i}": np.arange(1 << 15, dtype=np.float64) * (i + 1) for i in range(4)}  # 4 x 256 KiB
FROZEN_BYTES = 4 * (1 << 15) * 8


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def invoke_json(*args: str) -> dict[str, Any]:
    result = invoke(*args, "--json")
    assert result.exit_code == EXIT_OK, (result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.fixture
def location(tmp_path: Path) -> str:
    """Epochs 1 and 2 of one node whose four big arrays never change; epoch 1 deleted."""
    url = str(tmp_path / "ckpt")

    async def run() -> None:
        async with MultiNodeCheckpointManager(url) as mgr:
            await mgr.init({"n0": dict(FROZEN)})
            for epoch in (1, 2, 3):
                mgr.workspace("n0")["step"] = epoch
                await mgr.save(epoch)
            await mgr.delete_epoch(1)

    asyncio.run(run())
    return url


def test_ls_and_show_say_what_each_epoch_uploaded_and_reused(location: str) -> None:
    listed = invoke_json("ls", location)
    assert [(e["epoch"], e["reused_bytes"]) for e in listed["epochs"]] == [(2, FROZEN_BYTES), (3, FROZEN_BYTES)]
    assert all(e["bytes"] < FROZEN_BYTES // 10 for e in listed["epochs"])
    table = invoke("ls", location)
    assert "reused" in table.stdout and "1.0 MB" in table.stdout

    shown = invoke_json("show", location, "3")
    assert shown["reused_bytes"] == FROZEN_BYTES
    (shard,) = shown["shards"]
    assert shard["reused_bytes"] == FROZEN_BYTES
    objects = {blob["name"]: blob["object"] for blob in shard["blobs"]}
    assert objects["step"] is None  # small: always in the epoch's own shard
    assert {objects[f"w{i}"] for i in range(4)} == {objects["w0"]} and "/epochs/000000000001/" in objects["w0"]
    assert "epoch 1" in invoke("show", location, "3").stdout


def test_verify_reads_the_reused_bytes_and_names_the_object_they_are_damaged_in(location: str) -> None:
    checked = invoke_json("verify", location)
    assert checked["ok"] and checked["bytes_checked"] > 2 * FROZEN_BYTES
    blobs = {blob["name"]: blob for blob in invoke_json("show", location, "3")["shards"][0]["blobs"]}
    holder = Path(urlsplit(blobs["w2"]["object"]).path)
    data = bytearray(holder.read_bytes())
    data[data.index(FROZEN["w2"].tobytes()[:64]) + 100] ^= 0x01
    holder.write_bytes(bytes(data))
    result = invoke("verify", location, "--json")
    assert result.exit_code == EXIT_FAILED, result.stdout
    damage = json.loads(result.stdout)["damage"]
    assert damage["epoch"] in (2, 3) and damage["node"] == "n0" and damage["blob"] == "w2"  # both reuse it
    assert urlsplit(damage["object"]).path == str(holder), damage  # epoch 1's shard, not the epoch's own


def test_show_and_verify_follow_the_leaves_of_a_tree_stored_in_an_earlier_epoch(tmp_path: Path) -> None:
    url = str(tmp_path / "tree")

    async def run() -> None:
        async with MultiNodeCheckpointManager(url) as mgr:
            await mgr.init({"n0": {"tree": {**FROZEN, "step": 1}}})
            await mgr.save(1)
            mgr.workspace("n0")["tree"] = {**FROZEN, "step": 2}  # the skeleton changed, the leaves did not
            await mgr.save(2)
            await mgr.delete_epoch(1)  # its shard stays: epoch 2's leaves point at it

    asyncio.run(run())
    (shard,) = invoke_json("show", url, "2")["shards"]
    (blob,) = shard["blobs"]
    assert blob["bytes"] > FROZEN_BYTES and blob["reused_bytes"] == shard["reused_bytes"] == FROZEN_BYTES
    assert blob["object"] is None and "leaves in epoch 1" in invoke("show", url, "2").stdout
    assert invoke_json("verify", url)["bytes_checked"] > FROZEN_BYTES  # the leaves in epoch 1's shard too
    holder = next((tmp_path / "tree" / "epochs" / "000000000001").rglob("*.shard"))
    data = bytearray(holder.read_bytes())
    data[data.index(FROZEN["w3"].tobytes()[:64]) + 100] ^= 0x01
    holder.write_bytes(bytes(data))
    result = invoke("verify", url, "--json")
    assert result.exit_code == EXIT_FAILED, result.stdout
    damage = json.loads(result.stdout)["damage"]
    assert damage["epoch"] == 2 and damage["node"] == "n0" and damage["blob"] == "tree"
    assert "leaf 3" in damage["message"]
    assert urlsplit(damage["object"]).path == str(holder), damage
