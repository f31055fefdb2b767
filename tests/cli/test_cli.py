"""The ``asyncckpt`` command line: ``demo`` (in one process and in several), ``ls`` and
``gc`` end to end, and their error handling."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from asyncckpt import MultiNodeCheckpointManager
from asyncckpt.cli import EXIT_ERROR, EXIT_OK, main
from asyncckpt.cli._options import Duration
from asyncckpt.cli.demo import compare_workspaces, init_workspace, node_names, train_epoch
from asyncckpt.layout import index_key, shard_key
from asyncckpt.storage import drop_memory_store, storage_for

SMALL_JOB = ["--nodes", "3", "--epochs", "4", "--crash-after", "2", "--mib-per-node", "1"]
TINY_JOB = ["--nodes", "2", "--epochs", "3", "--crash-after", "1", "--mib-per-node", "0.1"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# asyncckpt.storage._s3 hands aiohttp raw bytes bodies; above 1 MiB aiohttp warns
# (ResourceWarning "Sending a large body directly with raw bytes might lock the event
# loop"), which the strict warning filter turns into a failed upload. Remove this mark
# once the S3 backend streams large bodies (e.g. as io.BytesIO).
def test_demo_on_embedded_s3_server_resumes_and_passes():
    result = invoke("demo", *SMALL_JOB)

    assert result.exit_code == EXIT_OK, result.output
    assert "s3://asyncckpt-demo/demo-" in result.output
    assert "(simulated) after epoch 2" in result.output
    assert "resume epoch  2" in result.output
    assert "PASS" in result.output
    assert "FAIL" not in result.output


def test_demo_on_local_directory_commits_every_epoch(tmp_path: Path):
    location = tmp_path / "ckpt"

    result = invoke("demo", "--url", str(location), *SMALL_JOB)

    assert result.exit_code == EXIT_OK, result.output
    assert "PASS" in result.output
    committed = sorted(p.parent.name for p in location.glob("epochs/*/manifest.json"))
    assert committed == [f"{epoch:012d}" for epoch in range(5)]


def test_demo_in_memory_passes():
    name = f"cli-demo-{uuid.uuid4().hex[:8]}"
    try:
        result = invoke("demo", "--url", f"memory://{name}", *SMALL_JOB)
    finally:
        drop_memory_store(name)

    assert result.exit_code == EXIT_OK, result.output
    assert "PASS" in result.output


def test_demo_refuses_location_that_already_holds_checkpoints_with_one_clean_line(tmp_path: Path):
    location = str(tmp_path / "ckpt")
    assert invoke("demo", "--url", location, *SMALL_JOB).exit_code == EXIT_OK

    result = invoke("demo", "--url", location, *SMALL_JOB)

    assert result.exit_code == EXIT_ERROR
    assert "already holds checkpoints" in result.stderr
    assert result.stderr.strip().startswith("error:")
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "s3://"], "has no bucket"),
        (["--url", "s3://Not_A_Bucket/x"], "invalid S3 bucket name"),
        (["--url", "ftp://host/x"], "unsupported location scheme"),
        (["--epochs", "3", "--crash-after", "3"], "must be below --epochs"),
        (["--url", "/tmp/x", "--endpoint-url", "http://127.0.0.1:9"], "s3:// locations only"),
        (["--part-size-mib", "4"], "--part-size-mib"),
        (["--nodes", "2", "--processes", "3"], "must be between 1 and --nodes (2)"),
        (["--processes", "0"], "--processes"),
        (["--url", "memory://x", "--processes", "2"], "lives inside one process"),
    ],
)
def test_demo_rejects_bad_arguments_without_traceback(args: list[str], message: str):
    result = CliRunner().invoke(main, ["demo", *args])

    assert result.exit_code == EXIT_ERROR
    assert message in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_python_dash_m_runs_the_same_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "demo", "--help"], capture_output=True, text=True, timeout=60, check=False
    )

    assert proc.returncode == 0, proc.stderr
    assert "--crash-after" in proc.stdout
    assert "--checksum-mode" in proc.stdout


def test_demo_without_moto_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "moto.server", None)  # makes `from moto.server import ...` fail

    result = CliRunner().invoke(main, ["demo", *SMALL_JOB])

    assert result.exit_code == EXIT_ERROR
    assert "pip install 'asyncckpt[server]'" in result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------- demo --processes


def test_demo_in_two_processes_commits_through_storage_resumes_and_passes():
    result = invoke(
        "demo", "--processes", "2", "--nodes", "4", "--epochs", "3", "--crash-after", "1", "--mib-per-node", "0.5",
        "--timeout", "120",
    )  # fmt: skip

    assert result.exit_code == EXIT_OK, result.output
    out = result.output
    assert "rank 0  pid" in out and "trainer_0, trainer_2" in out and "trainer_1, trainer_3" in out
    committed = [int(m[1]) for m in re.finditer(r"^\s+(\d+)\s+committed, seen by 2/2", out, re.MULTILINE)]
    assert committed == [0, 1, 2, 3], out
    assert "(simulated) after epoch 1: SIGKILL" in out
    assert "resume epoch  1" in out
    assert "restored state = state saved at epoch 1, in every process" in out
    assert "PASS" in out and "FAIL" not in out


# ---------------------------------------------------------------------- ls


def committed_rows(output: str) -> dict[int, str]:
    """The table rows of ``asyncckpt ls``, by epoch."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) > 1 and cells[0].isdigit():
            rows[int(cells[0])] = line
    return rows


def test_ls_lists_every_committed_epoch_and_marks_the_latest(tmp_path: Path):
    location = str(tmp_path / "ckpt")
    assert invoke("demo", "--url", location, *TINY_JOB).exit_code == EXIT_OK

    result = invoke("ls", location)

    assert result.exit_code == EXIT_OK, result.output
    rows = committed_rows(result.output)
    assert sorted(rows) == [0, 1, 2, 3], result.output
    assert [epoch for epoch, row in rows.items() if "latest" in row] == [3]
    for row in rows.values():
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells[1] == "2"  # nodes
        assert cells[2].endswith("kB")  # 2 x 0.1 MiB of shards
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[3])
    assert "4 committed epochs" in result.output
    assert "resumes from epoch 3" in result.output


def test_ls_of_an_empty_location_says_so(tmp_path: Path):
    (tmp_path / "nothing-here").mkdir()

    result = invoke("ls", str(tmp_path / "nothing-here"))

    assert result.exit_code == EXIT_OK
    assert "no committed epoch" in result.output


# ---------------------------------------------------------------------- gc

TWO_HOURS = 2 * 3600


async def put_objects(location: str, keys: list[str]) -> None:
    async with storage_for(location) as storage:
        for key in keys:
            await storage.put(key, b"left over by a save that never committed")


def make_garbage(location: Path) -> tuple[list[str], str]:
    """Leftovers as real jobs leave them: an interrupted save of epoch 7 and a losing
    attempt inside committed epoch 1, both two hours old, and a save of epoch 8 that may
    still be running (fresh). Returns (old keys, fresh key)."""
    old = [
        shard_key(7, "crashed.0123456789ab", "trainer_0"),
        index_key(7, "crashed.0123456789ab"),
        shard_key(1, "loser.ba9876543210", "trainer_1"),
    ]
    fresh = shard_key(8, "running.00112233aabb", "trainer_0")
    asyncio.run(put_objects(str(location), [*old, fresh]))
    then = time.time() - TWO_HOURS
    for key in old:
        os.utime(location / key, (then, then))
    return old, fresh


@pytest.fixture
def location_with_garbage(tmp_path: Path) -> tuple[Path, list[str], str]:
    location = tmp_path / "ckpt"
    assert invoke("demo", "--url", str(location), *TINY_JOB).exit_code == EXIT_OK  # commits epochs 0 to 3
    return (location, *make_garbage(location))


def state_after(epochs: int, nodes: int, mib_per_node: float) -> dict[str, dict]:
    """What the demo's nodes hold after ``epochs`` epochs (its training is deterministic)."""
    state = {}
    for i, name in enumerate(node_names(nodes)):
        state[name] = init_workspace(i, mib_per_node)
        for _ in range(epochs):
            train_epoch(state[name])
    return state


async def load_every_epoch(location: str) -> list[int]:
    """Load every committed epoch with a fresh manager; the last must be the demo's final state."""
    async with MultiNodeCheckpointManager(location) as mgr:
        epochs = await mgr.committed_epochs()
        workspaces: dict[str, dict] = {name: {} for name in node_names(2)}
        await mgr.init(workspaces)
        for epoch in epochs:
            await mgr.load(epoch)
    _, diff = compare_workspaces(state_after(3, nodes=2, mib_per_node=0.1), workspaces)
    assert diff == []
    return epochs


def test_gc_dry_run_lists_the_old_garbage_and_deletes_nothing(location_with_garbage: tuple[Path, list[str], str]):
    location, old, fresh = location_with_garbage

    result = invoke("gc", str(location), "--dry-run")

    assert result.exit_code == EXIT_OK, result.output
    assert "would delete 3 objects:" in result.output
    listed = {line.strip() for line in result.output.splitlines()}
    assert set(old) <= listed and fresh not in listed
    assert "kept 1 object younger than 1h" in result.output
    assert all((location / key).exists() for key in [*old, fresh])


def test_gc_deletes_old_garbage_keeps_recent_and_committed_epochs_still_load(
    location_with_garbage: tuple[Path, list[str], str],
):
    location, old, fresh = location_with_garbage

    result = invoke("gc", str(location), "--grace", "90m")

    assert result.exit_code == EXIT_OK, result.output
    assert "deleted 3 objects:" in result.output and "removed 3 objects" in result.output
    assert not any((location / key).exists() for key in old)
    assert (location / fresh).exists()
    assert "claimed 1 unfinished save as abandoned" in result.output
    # of the interrupted save only gc's claim stays: it can never commit now
    assert [p.name for p in (location / "epochs" / "000000000007").iterdir()] == ["crashed.0123456789ab.decision"]
    assert asyncio.run(load_every_epoch(str(location))) == [0, 1, 2, 3]

    result = invoke("gc", str(location), "--grace", "0")

    assert result.exit_code == EXIT_OK, result.output
    assert "deleted 1 object:" in result.output and fresh in result.output
    assert asyncio.run(load_every_epoch(str(location))) == [0, 1, 2, 3]
    assert "nothing to delete" in invoke("gc", str(location), "--grace", "0").output


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("45", 45), ("0", 0), ("1.5H", 5400), (" 2 m ", 120)],
)
def test_grace_accepts_seconds_or_a_unit(text: str, seconds: float):
    assert Duration().convert(text, None, None) == seconds


@pytest.mark.parametrize("text", ["5x", "-1", "h", "", "1h30m", "1e3"])
def test_grace_rejects_anything_else(text: str):
    with pytest.raises(click.BadParameter, match="not a duration"):
        Duration().convert(text, None, None)


@pytest.mark.parametrize("command", ["ls", "gc"])
@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("s3://", "has no bucket"),
        ("ftp://host/x", "unsupported location scheme"),
        ("memory://x", "lives inside one process"),
    ],
)
def test_ls_and_gc_refuse_bad_locations_in_one_red_line(command: str, location: str, message: str):
    result = CliRunner().invoke(main, [command, location])

    assert result.exit_code == EXIT_ERROR
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["ls", "gc"])
def test_ls_and_gc_on_a_missing_bucket_exit_2_in_one_red_line(command: str, s3_endpoint: str):
    bucket = f"missing-{uuid.uuid4().hex[:12]}"

    result = CliRunner().invoke(main, [command, f"s3://{bucket}/run", "--endpoint-url", s3_endpoint])

    assert result.exit_code == EXIT_ERROR, result.output
    assert "NoSuchBucket" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert "Traceback" not in result.output


def test_gc_rejects_a_bad_grace_as_a_usage_error(tmp_path: Path):
    result = CliRunner().invoke(main, ["gc", str(tmp_path), "--grace", "soon"])

    assert result.exit_code == EXIT_ERROR
    assert "not a duration" in result.output
