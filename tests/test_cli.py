"""The ``asyncckpt`` command line: ``asyncckpt demo`` end to end, and its error handling."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from asyncckpt.cli import EXIT_ERROR, EXIT_OK, main
from asyncckpt.storage import drop_memory_store

SMALL_JOB = ["--nodes", "3", "--epochs", "4", "--crash-after", "2", "--mib-per-node", "1"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# asyncckpt.storage.s3 hands aiohttp raw bytes bodies; above 1 MiB aiohttp warns
# (ResourceWarning "Sending a large body directly with raw bytes might lock the event
# loop"), which the strict warning filter turns into a failed upload. Remove this mark
# once the S3 backend streams large bodies (e.g. as io.BytesIO).
@pytest.mark.filterwarnings("ignore:Sending a large body directly with raw bytes:ResourceWarning")
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
