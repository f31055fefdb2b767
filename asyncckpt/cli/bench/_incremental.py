"""``asyncckpt bench --incremental``: what an incremental save saves (issue 13's targets).

On moto's S3 server (a subprocess on 127.0.0.1, as the other benchmarks), a one-node
state of 10 float32 arrays of equal size where 9 are frozen (90% of the bytes) is saved
twice by one manager, one array changed between the saves; per repetition, on a fresh
prefix:

``first``
    the first save (nothing to compare with: every byte is uploaded, every blob hashed);
``second``
    the second save (only the changed array is uploaded; the others are hashed and point
    at the first epoch's shard);
``full_second``
    the second save with ``TransferConfig(incremental=False)`` (what a save costs without
    the feature: no hash pass, every byte uploaded);
``changed_second``
    the second save when every array changed (the hash pass is pure overhead here).

Bytes uploaded are counted by the storage layer (request stats: bodies sent), the wall
time around ``save``. Both epochs are loaded back and compared bit-exact after the
measurements. Targets: the second save uploads at most 12% of the first's bytes and
takes at most 0.25x its wall time. The measurements run in this process, one after
another (medians over the repetitions).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from asyncckpt import MultiNodeCheckpointManager, TransferConfig
from asyncckpt.storage import collect_request_stats
from asyncckpt.testing.s3_server import SubprocessS3Server, create_bucket

from ._run import SERVER_MALLOC_ENV, clean_env

__all__ = ["run_incremental"]

BUCKET = "asyncckpt-bench-incremental"
ARRAYS = 10
CASES = ("first", "second", "full_second", "changed_second")
TARGET_BYTES = 0.12
TARGET_WALL = 0.25


def _state(state_mib: float, seed: int) -> dict[str, np.ndarray[Any, Any]]:
    per_array = max(1, int(state_mib * (1 << 20) / ARRAYS / 4))
    rng = np.random.default_rng(seed)
    return {f"a{i}": rng.standard_normal(per_array, dtype=np.float32) for i in range(ARRAYS)}


async def _save(mgr: MultiNodeCheckpointManager, epoch: int) -> dict[str, float]:
    with collect_request_stats() as counted:
        started = time.perf_counter()
        await mgr.save(epoch)
        wall = time.perf_counter() - started
    report = await mgr.report_checkpoint_stats("checkpoint_save")
    return {"wall_s": wall, "bytes_sent": counted.bytes_sent, "requests": counted.requests, **_reused(report)}


def _reused(report: dict[str, Any]) -> dict[str, float]:
    return {"shard_bytes": report["bytes"], "reused_bytes": report["reused_bytes"]}


async def _one_rep(s3: SubprocessS3Server, state_mib: float, rep: int) -> dict[str, dict[str, float]]:
    options = s3.storage_options
    out: dict[str, dict[str, float]] = {}
    base = f"s3://{BUCKET}/rep{rep}"
    state = _state(state_mib, rep)
    changed = {name: value + 1 for name, value in state.items()}
    for case, incremental, second in (
        ("second", True, {**state, "a0": changed["a0"]}),
        ("full_second", False, {**state, "a0": changed["a0"]}),
        ("changed_second", True, changed),
    ):
        config = TransferConfig(incremental=incremental)
        async with MultiNodeCheckpointManager(f"{base}/{case}", storage_options=options, config=config) as mgr:
            await mgr.init({"n0": dict(state)})
            first = await _save(mgr, 1)
            if case == "second":
                out["first"] = first
            mgr.workspace("n0").update(second)
            out[case] = await _save(mgr, 2)
            if case == "second":  # both epochs come back bit-exact
                for epoch, want in ((1, state), (2, second)):
                    mgr.workspace("n0").clear()
                    await mgr.load(epoch)
                    got = mgr.workspace("n0")
                    if any(got[n].tobytes() != want[n].tobytes() for n in want):
                        raise RuntimeError(f"epoch {epoch} did not load bit-exact")
    return out


async def run_incremental(
    *, state_mib: float, reps: int, out_json: Path | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Run the benchmark (module docstring); print its table; return (and write to
    ``out_json``) every measurement, the medians, ratios and targets."""
    console = console or Console()
    workdir = Path(tempfile.mkdtemp(prefix="asyncckpt-bench-incremental-"))
    server_tmp = workdir / "moto-tmp"
    server_tmp.mkdir()
    s3 = SubprocessS3Server(
        workdir / "moto_server.log", env=clean_env({**SERVER_MALLOC_ENV, "TMPDIR": str(server_tmp)})
    )
    runs: list[dict[str, dict[str, float]]] = []
    try:
        await asyncio.to_thread(s3.start)
        async with s3.admin_client() as admin:
            await create_bucket(admin, BUCKET)
        for rep in range(reps):
            runs.append(await _one_rep(s3, state_mib, rep))
            console.print(f"[dim]repetition {rep + 1}/{reps} done[/]", highlight=False)
    finally:
        await asyncio.to_thread(s3.stop)
        await asyncio.to_thread(shutil.rmtree, workdir, True)
    medians = {case: {k: median(run[case][k] for run in runs) for k in runs[0][case]} for case in CASES}
    first, second = medians["first"], medians["second"]
    ratios = {
        "second_bytes": second["bytes_sent"] / first["bytes_sent"],
        "second_wall": second["wall_s"] / first["wall_s"],
        "full_second_wall": medians["full_second"]["wall_s"] / first["wall_s"],
        "changed_vs_full_wall": medians["changed_second"]["wall_s"] / medians["full_second"]["wall_s"],
    }
    targets = [
        {"name": "second save bytes <= 12% of the first", "value": ratios["second_bytes"], "met": ratios["second_bytes"] <= TARGET_BYTES},
        {"name": "second save wall <= 0.25x the first", "value": ratios["second_wall"], "met": ratios["second_wall"] <= TARGET_WALL},
    ]  # fmt: skip
    result = {
        "meta": {"state_mib": state_mib, "arrays": ARRAYS, "frozen": ARRAYS - 1, "reps": reps, "cpus": os.cpu_count()},
        "runs": runs,
        "medians": medians,
        "ratios": ratios,
        "targets": targets,
    }
    if out_json is not None:
        await asyncio.to_thread(Path(out_json).write_text, json.dumps(result, indent=2))
    _render(console, result)
    return result


def _render(console: Console, result: dict[str, Any]) -> None:
    meta, medians, ratios = result["meta"], result["medians"], result["ratios"]
    table = Table(
        title=f"incremental saves: {meta['state_mib']:g} MiB in {meta['arrays']} arrays, {meta['frozen']} frozen "
        f"(medians of {meta['reps']})",
        title_justify="left",
        header_style="bold cyan",
    )
    for column in ("save", "wall s", "MB uploaded", "MB reused", "requests"):
        table.add_column(column, justify="left" if column == "save" else "right")
    labels = {
        "first": "first save",
        "second": "second save (1 of 10 changed)",
        "full_second": "second save, incremental=False",
        "changed_second": "second save, all 10 changed",
    }
    for case in CASES:
        row = medians[case]
        table.add_row(
            labels[case],
            f"{row['wall_s']:.3f}",
            f"{row['bytes_sent'] / 1e6:.1f}",
            f"{row['reused_bytes'] / 1e6:.1f}",
            f"{row['requests']:.0f}",
        )
    console.print(table)
    console.print(
        f"second/first: bytes {ratios['second_bytes']:.3f}x, wall {ratios['second_wall']:.3f}x; "
        f"without incremental the second save takes {ratios['full_second_wall']:.2f}x the first; "
        f"when every blob changed, incremental costs {ratios['changed_vs_full_wall']:.2f}x a plain save",
        highlight=False,
    )
    for target in result["targets"]:
        mark = "[green]✓ met[/]" if target["met"] else "[red]✗ missed[/]"
        console.print(f"{mark} {target['name']}: {target['value']:.3f}", highlight=False)
