"""examples/dcp_save_load.py runs as written: by default (a temporary directory) and on S3."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

EXAMPLE = Path(__file__).parents[2] / "examples" / "dcp_save_load.py"


def run_example(*arguments: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLE), *arguments], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_example_runs_in_a_temporary_directory_by_default() -> None:
    lines = run_example()
    assert re.fullmatch(r"saved step 3 to /\S+/step-3", lines[0]), lines
    assert lines[1:] == [
        lines[0].replace("step 3", "step 6").replace("step-3", "step-6") + " in the background",
        "loaded step 3 into a fresh model and optimizer",
        "PASS",
    ]


@pytest.mark.parametrize("location_kind", ["s3"])
def test_the_example_runs_on_s3(location: Any) -> None:
    assert run_example(location.url, "--endpoint-url", location.options["endpoint_url"]) == [
        f"saved step 3 to {location.url}/step-3",
        f"saved step 6 to {location.url}/step-6 in the background",
        "loaded step 3 into a fresh model and optimizer",
        "PASS",
    ]
