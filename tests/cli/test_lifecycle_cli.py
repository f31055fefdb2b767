"""The lifecycle commands, ``show``, ``verify``, ``rm`` and ``prune``, and the ``--json``
of every command that reads a location, on small states (a directory, and one S3 case)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from click.testing import CliRunner, Result

from asyncckpt import MultiNodeCheckpointManager
from asyncckpt.cli import EXIT_ERROR, EXIT_FAILED, EXIT_OK, main
from asyncckpt.layout import manifest_key

NODES = ("trainer_0", "trainer_1")
LOSS = {0: 0.9, 1: 0.5, 2: 0.7, 3: 0.3, 4: 0.6, 5: 0.8}  # best by min: 3, 1; by max: 0, 5


def invoke(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def invoke_json(*args: str) -> dict[str, Any]:
    """Run a command with --json: exit 0, and stdout is exactly one JSON document."""
    result = invoke(*args, "--json")
    assert result.exit_code == EXIT_OK, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def weights(epoch: int, node: int) -> np.ndarray:
    return np.arange(256, dtype=np.float32) + 1000 * epoch + node


def save_epochs(location: str, epochs: range, options: dict[str, Any] | None = None) -> None:
    """Save ``epochs`` of a two-node job: an array, an int and bytes per node, and
    the epoch's loss and accuracy as metrics."""

    async def run() -> None:
        async with MultiNodeCheckpointManager(location, storage_options=options) as mgr:
            await mgr.init(list(NODES))
            for epoch in epochs:
                for i, node in enumerate(NODES):
                    workspace = mgr.workspace(node)
                    workspace["weights"] = weights(epoch, i)
                    workspace["step"] = epoch * 100
                    workspace["tag"] = f"epoch-{epoch}".encode()
                await mgr.save(epoch, metrics={"loss": LOSS[epoch], "acc": 1 - LOSS[epoch]})

    asyncio.run(run())


def committed(location: str, options: dict[str, Any] | None = None) -> list[int]:
    async def run() -> list[int]:
        async with MultiNodeCheckpointManager(location, storage_options=options) as mgr:
            return await mgr.committed_epochs()

    return asyncio.run(run())


@pytest.fixture
def location(tmp_path: Path) -> str:
    """A directory holding committed epochs 0 to 5."""
    url = str(tmp_path / "ckpt")
    save_epochs(url, range(6))
    return url


def shard_path(location: str, epoch: int, node: str) -> Path:
    """The file of ``node``'s shard of ``epoch``, from `show --json`."""
    shards = {s["node"]: s["object"] for s in invoke_json("show", location, str(epoch))["shards"]}
    return Path(urlsplit(shards[node]).path)


def flip_a_byte_of(path: Path, payload: bytes) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(payload)
    assert at >= 0
    data[at + 10] ^= 0x01
    path.write_bytes(bytes(data))


def assert_one_red_line(result: Result) -> None:
    assert result.stderr.startswith("error:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------- every command


COMMANDS_ON_A_LOCATION = [
    ["ls"],
    ["show", "{}", "1"],
    ["verify"],
    ["verify", "{}", "1"],
    ["rm", "{}", "1", "--yes"],
    ["prune", "{}", "--keep-last", "1"],
    ["gc"],
]


def command_line(template: list[str], location: str) -> list[str]:
    if "{}" not in template:
        return [template[0], location, *template[1:]]
    return [part.replace("{}", location) for part in template]


@pytest.mark.parametrize("template", COMMANDS_ON_A_LOCATION, ids=" ".join)
def test_every_command_on_a_missing_directory_exits_2_in_one_red_line(template: list[str], tmp_path: Path):
    missing = tmp_path / "no-such-dir"

    result = CliRunner().invoke(main, command_line(template, str(missing)))

    assert result.exit_code == EXIT_ERROR, result.output
    assert "no such directory" in result.stderr
    assert_one_red_line(result)
    assert not missing.exists()


@pytest.mark.parametrize("template", COMMANDS_ON_A_LOCATION, ids=" ".join)
def test_every_command_on_a_missing_bucket_exits_2_in_one_red_line(template: list[str], s3_endpoint: str):
    location = f"s3://missing-{uuid.uuid4().hex[:12]}/run"

    result = CliRunner().invoke(main, [*command_line(template, location), "--endpoint-url", s3_endpoint])

    assert result.exit_code == EXIT_ERROR, result.output
    assert "NoSuchBucket" in result.stderr
    assert_one_red_line(result)


@pytest.mark.parametrize("command", ["ls", "show", "verify", "rm", "prune", "gc"])
def test_every_command_has_help_with_examples_and_json(command: str):
    result = invoke(command, "--help")

    assert result.exit_code == EXIT_OK
    assert "Examples:" in result.output
    assert f"asyncckpt {command} " in result.output
    assert "--json" in result.output


def test_every_command_works_on_s3_with_json(s3_endpoint: str, s3_bucket: str):
    location = f"s3://{s3_bucket}/run"
    save_epochs(location, range(4), {"endpoint_url": s3_endpoint})
    endpoint = ("--endpoint-url", s3_endpoint)

    assert [e["epoch"] for e in invoke_json("ls", location, *endpoint)["epochs"]] == [0, 1, 2, 3]
    shards = invoke_json("show", location, "2", *endpoint)["shards"]
    assert [s["node"] for s in shards] == list(NODES)
    assert all(s["object"].startswith(f"{location}/epochs/000000000002/") for s in shards)
    checked = invoke_json("verify", location, *endpoint)
    assert checked["ok"] is True and [e["epoch"] for e in checked["epochs"]] == [0, 1, 2, 3]
    assert invoke_json("rm", location, "0", "--yes", *endpoint)["deleted"] == [0]
    assert invoke_json("prune", location, "--keep-last", "2", *endpoint)["deleted"] == [1]
    assert invoke_json("gc", location, "--grace", "0", *endpoint)["deleted"] == []
    assert committed(location, {"endpoint_url": s3_endpoint}) == [2, 3]


# ---------------------------------------------------------------------- ls


def test_ls_shows_metrics_and_the_latest(location: str):
    result = invoke("ls", location)

    assert result.exit_code == EXIT_OK, result.output
    assert "metrics" in result.output
    assert "acc=0.7" in result.output and "loss=0.3" in result.output  # epoch 3, one metric a line when narrow
    assert "6 committed epochs" in result.output and "resumes from epoch 5" in result.output


def test_ls_json_lists_epochs_with_nodes_size_created_metrics_and_latest(location: str):
    listing = invoke_json("ls", location)

    assert listing["location"] == location
    assert listing["latest"] == 5
    epochs = listing["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3, 4, 5]
    assert [e["latest"] for e in epochs] == [False] * 5 + [True]
    assert all(e["nodes"] == 2 and e["bytes"] > 2 * 1024 for e in epochs)
    assert epochs[3]["metrics"] == {"loss": 0.3, "acc": pytest.approx(0.7)}
    assert all(e["created"].endswith("+00:00") and e["created_unix"] > 0 for e in epochs)
    assert listing["total_bytes"] == sum(e["bytes"] for e in epochs)


def test_ls_json_of_an_empty_directory(tmp_path: Path):
    listing = invoke_json("ls", str(tmp_path))

    assert listing == {"location": str(tmp_path), "epochs": [], "latest": None, "total_bytes": 0}


# ---------------------------------------------------------------------- show


def test_show_lists_each_node_and_its_blobs(location: str):
    result = invoke("show", location, "3")

    assert result.exit_code == EXIT_OK, result.output
    assert "epoch 3" in result.output and "2 nodes" in result.output
    assert "acc=0.7 loss=0.3" in result.output
    rows = [line for line in result.output.splitlines() if "weights" in line]
    assert len(rows) == 2
    assert all("ndarray" in row and "float32" in row and "(256,)" in row and "1.0 kB" in row for row in rows)
    assert "trainer_0" in result.output and "trainer_1" in result.output
    assert all("bytes" in line for line in result.output.splitlines() if "tag" in line)
    assert all("msgpack" in line for line in result.output.splitlines() if "step" in line)


def test_show_json_gives_kind_dtype_shape_and_bytes_of_every_blob(location: str):
    shown = invoke_json("show", location, "3")

    assert shown["epoch"] == 3 and shown["nodes"] == 2 and shown["metrics"]["loss"] == 0.3
    assert [s["node"] for s in shown["shards"]] == list(NODES)
    for shard in shown["shards"]:
        assert Path(urlsplit(shard["object"]).path).stat().st_size == shard["bytes"]
        blobs = {b["name"]: b for b in shard["blobs"]}
        assert blobs["weights"] == {
            "name": "weights",
            "kind": "ndarray",
            "dtype": "float32",
            "shape": [256],
            "bytes": 1024,
            "reused_bytes": 0,
            "object": None,  # in this shard (small blobs are never reused)
        }
        assert blobs["tag"] == {
            "name": "tag", "kind": "bytes", "dtype": None, "shape": None, "bytes": len(b"epoch-3"), "reused_bytes": 0,
            "object": None,
        }  # fmt: skip
        assert blobs["step"]["kind"] == "msgpack" and blobs["step"]["dtype"] is None
    assert sum(s["bytes"] for s in shown["shards"]) == shown["bytes"]


def test_show_of_an_epoch_that_is_not_committed_exits_2(location: str):
    result = CliRunner().invoke(main, ["show", location, "9"])

    assert result.exit_code == EXIT_ERROR
    assert "epoch 9 is not committed" in result.stderr
    assert_one_red_line(result)


# ---------------------------------------------------------------------- verify


def test_verify_reads_every_epoch_and_passes_when_clean(location: str):
    result = invoke("verify", location)

    assert result.exit_code == EXIT_OK, result.output
    assert "6 epochs intact" in result.output and "every CRC32C matches" in result.output
    assert "━" not in result.output + result.stderr  # no progress bar off a terminal


def test_verify_draws_a_progress_bar_on_stderr_when_it_is_a_terminal(location: str):
    result = CliRunner().invoke(main, ["verify", location, "--json"], env={"FORCE_COLOR": "1"})

    assert result.exit_code == EXIT_OK, result.output
    total = sum(e["bytes"] for e in json.loads(result.stdout)["epochs"])  # stdout: the JSON alone
    assert "verifying 6 epochs" in result.stderr and "━" in result.stderr
    assert f"{total / 1000:.1f}/{total / 1000:.1f} kB" in result.stderr


def test_verify_json_when_clean_counts_every_byte(location: str):
    checked = invoke_json("verify", location)

    assert checked["ok"] is True and checked["damage"] is None
    assert [e["epoch"] for e in checked["epochs"]] == [0, 1, 2, 3, 4, 5]
    assert checked["bytes_checked"] == sum(e["bytes"] for e in checked["epochs"])
    assert [e["epoch"] for e in invoke_json("verify", location, "4")["epochs"]] == [4]


def test_verify_finds_a_flipped_byte_and_names_node_blob_and_object(location: str):
    shard = shard_path(location, 2, "trainer_1")
    flip_a_byte_of(shard, weights(2, 1).tobytes())

    result = invoke("verify", location)

    assert result.exit_code == EXIT_FAILED, result.output
    assert "epoch 2 is damaged" in result.output
    lines = [line.split() for line in result.output.splitlines()]
    assert ["node", "trainer_1"] in lines and ["blob", "weights"] in lines
    assert ["object", shard.as_uri()] in lines
    assert "CRC32C mismatch" in result.output


def test_verify_json_reports_the_damage_and_exits_1(location: str):
    shard = shard_path(location, 4, "trainer_0")
    flip_a_byte_of(shard, weights(4, 0).tobytes())

    result = invoke("verify", location, "--json")

    assert result.exit_code == EXIT_FAILED
    report = json.loads(result.stdout)
    assert report["ok"] is False
    damage = report["damage"]
    assert (damage["epoch"], damage["node"], damage["blob"]) == (4, "trainer_0", "weights")
    assert damage["object"] == shard.as_uri()
    assert "CRC32C mismatch" in damage["message"]


def test_verify_of_one_epoch_checks_only_that_one(location: str):
    flip_a_byte_of(shard_path(location, 2, "trainer_1"), weights(2, 1).tobytes())

    assert invoke("verify", location, "3").exit_code == EXIT_OK
    assert invoke("verify", location, "2").exit_code == EXIT_FAILED


def test_verify_finds_a_missing_shard(location: str):
    shard = shard_path(location, 1, "trainer_0")
    shard.unlink()

    report = json.loads(invoke("verify", location, "--json").stdout)

    assert report["damage"]["node"] == "trainer_0" and report["damage"]["object"] == shard.as_uri()
    assert "missing" in report["damage"]["message"]


def test_verify_counts_a_manifest_that_does_not_parse_as_damage(location: str):
    manifest = Path(location) / manifest_key(3)
    manifest.write_text(manifest.read_text().replace('"epoch"', '"epoc"'))

    result = invoke("verify", location)

    assert result.exit_code == EXIT_FAILED, result.output
    assert "epoch 3 is damaged" in result.output
    assert manifest.as_uri() in result.output


def test_verify_of_an_epoch_that_is_not_committed_exits_2(location: str):
    result = CliRunner().invoke(main, ["verify", location, "9"])

    assert result.exit_code == EXIT_ERROR
    assert "epoch 9 is not committed" in result.stderr
    assert_one_red_line(result)


def test_verify_of_an_empty_directory_has_nothing_to_check(tmp_path: Path):
    result = invoke("verify", str(tmp_path))

    assert result.exit_code == EXIT_OK
    assert "nothing to verify" in result.output


# ---------------------------------------------------------------------- rm


def test_rm_asks_and_no_keeps_the_epoch(location: str):
    result = invoke("rm", location, "2", input="n\n")

    assert result.exit_code == EXIT_FAILED
    assert "Delete epoch 2 of" in result.stderr and "nothing deleted" in result.stderr
    assert result.stdout == ""
    assert committed(location) == [0, 1, 2, 3, 4, 5]


def test_rm_asks_and_yes_deletes(location: str):
    result = invoke("rm", location, "2", "3", input="y\n")

    assert result.exit_code == EXIT_OK, result.output
    assert "deleted epochs 2, 3" in result.stdout
    assert committed(location) == [0, 1, 4, 5]


def test_rm_warns_before_deleting_the_latest(location: str):
    result = invoke("rm", location, "5", input="n\n")

    assert "Epoch 5 is the latest: a resuming job would start from epoch 4" in result.stderr
    assert committed(location) == [0, 1, 2, 3, 4, 5]


def test_rm_yes_json_deletes_without_asking(location: str):
    assert invoke_json("rm", location, "0", "4", "--yes") == {"location": location, "deleted": [0, 4]}
    assert committed(location) == [1, 2, 3, 5]
    assert not (Path(location) / "epochs" / "000000000000").exists()


def test_rm_of_an_epoch_that_is_not_committed_deletes_nothing(location: str):
    result = CliRunner().invoke(main, ["rm", location, "1", "7", "9", "--yes"])

    assert result.exit_code == EXIT_ERROR
    assert "epochs 7, 9 not committed" in result.stderr and "nothing deleted" in result.stderr
    assert_one_red_line(result)
    assert committed(location) == [0, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------------- prune


def test_prune_dry_run_lists_and_deletes_nothing_then_the_real_run_deletes(location: str):
    dry = invoke("prune", location, "--keep-last", "2", "--keep-every", "3", "--dry-run")

    assert dry.exit_code == EXIT_OK, dry.output
    assert "kept epochs 0, 3, 4, 5" in dry.output and "epochs 1, 2 would go" in dry.output
    assert committed(location) == [0, 1, 2, 3, 4, 5]

    real = invoke("prune", location, "--keep-last", "2", "--keep-every", "3")

    assert real.exit_code == EXIT_OK, real.output
    assert "deleted epochs 1, 2" in real.output
    assert committed(location) == [0, 3, 4, 5]
    assert "nothing to delete" in invoke("prune", location, "--keep-last", "2", "--keep-every", "3").output


def test_prune_json_dry_run_and_real(location: str):
    args = ("prune", location, "--keep-best", "2", "--metric", "loss")

    dry = invoke_json(*args, "--dry-run")

    assert dry["dry_run"] is True and dry["deleted"] == [0, 2, 4] and dry["kept"] == [1, 3, 5]
    assert dry["retention"] == {"keep_last": None, "keep_every": None, "keep_best": 2, "metric": "loss", "mode": "min"}
    assert committed(location) == [0, 1, 2, 3, 4, 5]
    real = invoke_json(*args)
    assert real["dry_run"] is False and real["deleted"] == [0, 2, 4]
    assert committed(location) == [1, 3, 5]


def test_prune_keep_best_by_max(location: str):
    assert invoke_json("prune", location, "--keep-best", "1", "--metric", "loss", "--mode", "max")["kept"] == [0, 5]
    assert committed(location) == [0, 5]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give at least one rule"),
        (["--dry-run"], "give at least one rule"),
        (["--metric", "loss"], "give at least one rule"),
        (["--keep-last", "2", "--metric", "loss"], "--keep-best and --metric go together"),
        (["--keep-best", "2"], "--keep-best and --metric go together"),
        (["--keep-last", "0"], "--keep-last"),
        (["--keep-best", "2", "--metric", "los"], "no committed epoch has metric 'los' (metrics recorded: acc, loss)"),
        (["--keep-best", "2", "--metric", "loss", "--mode", "median"], "--mode"),
    ],
)
def test_prune_refuses_bad_rules_and_deletes_nothing(location: str, args: list[str], message: str):
    result = CliRunner().invoke(main, ["prune", location, *args])

    assert result.exit_code == EXIT_ERROR, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert committed(location) == [0, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------------- gc


def test_gc_json_reports_what_it_deleted(location: str):
    leftover = Path(location) / "epochs" / "000000000009" / "crashed.0123456789ab" / "trainer_0.shard"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"left over by a save that never committed")

    dry = invoke_json("gc", location, "--grace", "0", "--dry-run")

    assert dry["dry_run"] is True and dry["grace_seconds"] == 0
    assert dry["deleted"] == ["epochs/000000000009/crashed.0123456789ab/trainer_0.shard"]
    assert dry["abandoned"] == ["crashed.0123456789ab"]
    assert set(dry) == {
        "location", "grace_seconds", "deleted", "aborted_uploads", "kept_recent", "skipped_epochs", "dry_run",
        "abandoned", "completed_epochs", "kept_referenced",
    }  # fmt: skip
    assert leftover.exists()
    assert invoke_json("gc", location, "--grace", "0")["deleted"] == dry["deleted"]
    assert not leftover.exists()
    assert committed(location) == [0, 1, 2, 3, 4, 5]
