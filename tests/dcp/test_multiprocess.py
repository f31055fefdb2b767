"""The DCP plugin in gloo jobs of 2 and 4 processes, loading on another world size.

Each rank is an OS process (tests/support/dcp_worker.py) in a CPU gloo group that meets
through a file in the test's directory (gloo talks over loopback only); the state is
DTensors sharded on a 1-D CPU mesh, so a load on another world size reshards as DCP plans
it. Memory locations are per process, so these tests run on s3 (the moto server of
conftest.py, reached by URL) and on a shared directory. The ranks fork from one
multiprocessing forkserver that has imported torch and DCP once for the session.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from tests.support import dcp_worker  # noqa: E402

from .conftest import object_keys  # noqa: E402

JOB_TIMEOUT = 120.0
LOADED = ["weight", "bf16", "ids", "replicated", "meta"]


def run_job(location: Any, world: int, action: str, log_dir: Path) -> list[list[str]]:
    """Run ``world`` ranks of ``action`` to their end; what each verified, in rank order."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([dcp_worker.__name__])
    init_file = log_dir / f"rendezvous-{action}-{world}"
    reports = [log_dir / f"{action}-{world}-{rank}.report" for rank in range(world)]
    procs = []
    for rank in range(world):
        args = {"url": location.url, "options": location.options, "rank": rank, "world": world}
        args |= {"init_file": str(init_file), "action": action}
        proc = ctx.Process(target=dcp_worker.run_rank, args=(args, str(reports[rank])), name=f"{action}-{rank}")
        proc.start()
        procs.append(proc)
    try:
        for rank, proc in enumerate(procs):
            proc.join(JOB_TIMEOUT)
            report = reports[rank].read_text() if reports[rank].exists() else "(no report)"
            assert proc.exitcode == 0, f"rank {rank} of {action} on {world} ranks: exit {proc.exitcode}\n{report}"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [json.loads(report.read_text())["checked"] for report in reports]


@pytest.mark.parametrize("location_kind", ["s3"])
def test_four_ranks_save_and_two_ranks_load_resharded(location: Any, tmp_path: Path) -> None:
    assert run_job(location, 4, "save", tmp_path) == [["saved"]] * 4
    tokens = {key.split("/")[1] for key in object_keys(location) if key.startswith("data/")}
    assert len(tokens) == 4  # each rank wrote under an attempt token of its own
    assert run_job(location, 2, "load", tmp_path) == [LOADED] * 2


@pytest.mark.parametrize("location_kind", ["file"])
def test_two_ranks_async_save_and_four_ranks_load_resharded(location: Any, tmp_path: Path) -> None:
    assert run_job(location, 2, "async_save", tmp_path) == [["saved"]] * 2
    assert run_job(location, 4, "load", tmp_path) == [LOADED] * 4
