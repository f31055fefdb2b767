"""The benchmark's driver: one S3 server process, then every measurement in a fresh child.

:func:`run_bench` starts moto's server as a subprocess of its own
(:class:`~asyncckpt.testing.s3_server.SubprocessS3Server`, with glibc's
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` tunables; the clients run with
default glibc settings), builds the state's digests once, then runs each op of
:data:`~._state.OPS` in a child process (:mod:`._child`) with a clean environment, the
peers interleaved (the order rotates every repetition), each under a timeout and all
under a time budget. Between groups of ops their objects are deleted, so the server's
memory stays flat. It runs on the caller's event loop; the children run their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from asyncckpt import MiB
from asyncckpt.testing.s3_server import REGION, SubprocessS3Server, create_bucket, empty_bucket

from ._meters import process_rss_mib
from ._report import add_ratios, evaluate_targets, markdown_table, median, render, summarize
from ._state import (
    BUCKET,
    DEFAULT_BUDGET_S,
    DEFAULT_OP_TIMEOUT_S,
    GROUPS,
    OPS,
    BenchParams,
    ChildJob,
    OpSpec,
    partial_selection,
)

__all__ = ["Plan", "clean_env", "machine_info", "measure", "progress_line", "run_bench", "run_child", "versions"]

CHILD_MODULE = "asyncckpt.cli.bench._child"
SERVER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Environment that would change what "botocore's default config" means, or point a
# client elsewhere: removed from every child's (and the server's) environment.
_SCRUBBED_ENV_PREFIXES = ("AWS_", "MALLOC_")
_SCRUBBED_ENV = ("GLIBC_TUNABLES",)


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without AWS and allocator settings, with the test
    credentials, no AWS config files, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES) and k not in _SCRUBBED_ENV}
    env.update(TEST_CREDENTIALS)
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env.update(extra)
    return env


async def run_child(job: ChildJob, kill_after_s: float) -> dict[str, Any]:
    """Run one measurement in a fresh process; its JSON result (``status`` says how it went).

    Past ``kill_after_s`` seconds the child is killed (by its PID) and the result says ``timeout``.
    """
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        CHILD_MODULE,
        job.to_json(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env({}),
    )
    try:
        async with asyncio.timeout(kill_after_s):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        return {
            "op": job.op,
            "prefix": job.prefix,
            "status": "timeout",
            "error": f"no result within {kill_after_s:.0f} s",
        }
    finally:
        if proc.returncode is None:
            proc.kill()  # our own child, by its PID
            await proc.wait()
    result: dict[str, Any] | None = None
    for line in reversed(stdout.decode("utf-8", "replace").splitlines()):
        with contextlib.suppress(ValueError):
            candidate = json.loads(line)
            if isinstance(candidate, dict) and "op" in candidate:
                result = candidate
                break
    if result is None:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        result = {
            "op": job.op,
            "prefix": job.prefix,
            "status": "error",
            "error": f"exit {proc.returncode}: {' | '.join(tail)}",
        }
    result["process_s"] = time.perf_counter() - started
    return result


async def run_bench(
    *,
    state_mib: float = 192,
    nodes: int = 4,
    blobs_per_node: int = 8,
    reps: int = 3,
    server: str = "moto",
    out_json: Path | None = None,
    console: Console | None = None,
    part_size_mib: float | None = None,
    range_size_mib: float | None = None,
    max_concurrency: int | None = None,
    max_bytes_in_flight_mib: float | None = None,
    checksum_mode: str | None = None,
    payload_signing: bool | None = None,
    baseline_part_size_mib: float | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
    ops: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); print the table; return (and write
    to ``out_json``) every raw measurement, the per-op medians with their ratio fields,
    and the targets.

    Bad arguments raise :class:`ValueError`; a server or state that cannot be set up
    raises :class:`RuntimeError` (or :class:`OSError`). A measurement that fails is
    reported in the result, not raised.
    """
    console = console or Console()
    if server != "moto":
        raise ValueError(f"unsupported server {server!r}: only 'moto' (moto_server on 127.0.0.1)")
    if reps < 1 or nodes < 1 or blobs_per_node < 1:
        raise ValueError("reps, nodes and blobs_per_node must be positive")
    selected = list(OPS) if ops is None else list(ops)
    unknown = [o for o in selected if o not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; known: {list(OPS)}")
    params = BenchParams(
        state_mib, nodes, blobs_per_node, reps, part_size_mib, range_size_mib, max_concurrency,
        max_bytes_in_flight_mib, checksum_mode, payload_signing, baseline_part_size_mib, budget_s, op_timeout_s,
    )  # fmt: skip
    layout = params.layout()
    state_bytes = sum(b.nbytes for b in layout)
    started_wall = time.time()
    t_start = time.monotonic()
    meta: dict[str, Any] = {
        "state_mib": state_mib,
        "state_bytes": state_bytes,
        "nodes": nodes,
        "blobs_per_node": blobs_per_node,
        "blob_bytes": layout[0].nbytes,
        "reps": reps,
        "server": "moto_server (subprocess, MALLOC_* tunables on the server only)",
        "budget_s": budget_s,
        "op_timeout_s": op_timeout_s,
        "params": asdict(params),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_wall)),
        "machine": machine_info(),
        "versions": versions(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="asyncckpt-bench-"))
    server_tmp = workdir / "moto-tmp"
    server_tmp.mkdir()
    s3 = SubprocessS3Server(
        workdir / "moto_server.log", env=clean_env({**SERVER_MALLOC_ENV, "TMPDIR": str(server_tmp)})
    )
    try:
        await asyncio.to_thread(s3.start)
        meta["server_pid"] = s3.pid
        meta["endpoint"] = s3.endpoint_url
        async with s3.admin_client() as admin:
            await create_bucket(admin, BUCKET)
            console.print(
                f"moto_server pid {s3.pid} on {s3.endpoint_url}; state {state_bytes / MiB:.1f} MiB", highlight=False
            )
            plan = Plan(OPS, GROUPS, lambda prefix: empty_bucket(admin, BUCKET, prefix))
            runs, reps_done, aborted = await measure(s3, params, plan, selected, workdir, t_start, meta, console)
        meta["server_rss_mib_end"] = process_rss_mib(s3.pid)
    finally:
        await asyncio.to_thread(s3.stop)
        await asyncio.to_thread(shutil.rmtree, workdir, True)
    meta["reps_done"] = reps_done
    meta["aborted"] = aborted
    loads = [r["loadavg_1m"] for r in runs if r.get("loadavg_1m") is not None]
    meta["loadavg_1m_median"] = median(loads)
    cpus = os.cpu_count() or 1
    if loads and meta["loadavg_1m_median"] > 1.5 * cpus:
        meta["busy_warning"] = (
            f"the machine was busy (median 1-min load average {meta['loadavg_1m_median']:.1f} on {cpus} CPUs "
            "while measuring): wall times are inflated and noisy; client CPU and RSS are more trustworthy"
        )
    meta["elapsed_s"] = time.monotonic() - t_start
    meta["partial_blobs"] = [f"{b.node}/{b.name}" for b in partial_selection(layout)]
    rows = summarize(runs, state_bytes)
    add_ratios(rows, runs)
    targets = evaluate_targets(rows, state_bytes)
    result = {
        "meta": meta,
        "rows": rows,
        "targets": targets,
        "runs": runs,
        "markdown": markdown_table(rows, targets),
    }
    if out_json is not None:  # first, so a broken console never loses the measurements
        await asyncio.to_thread(Path(out_json).write_text, json.dumps(result, indent=2, default=str))
    render(console, result)
    if out_json is not None:
        console.print(f"wrote {out_json}", highlight=False)
    return result


@dataclass(frozen=True)
class Plan:
    """What :func:`measure` runs: the ops, their groups (in the order of the first
    repetition), how a group's objects are deleted afterwards, and the groups not run,
    with their status (``skipped``, ``unavailable``) and why."""

    ops: Mapping[str, OpSpec]
    groups: Mapping[str, Sequence[str]]
    clear: Callable[[str], Awaitable[None]]
    skipped_groups: Mapping[str, tuple[str, str]] = field(default_factory=dict)


async def measure(
    server: Any,
    params: BenchParams,
    plan: Plan,
    selected: Sequence[str],
    workdir: Path,
    t_start: float,
    meta: dict[str, Any],
    console: Console,
) -> tuple[list[dict[str, Any]], int, str | None]:
    """Build the digests, then run every selected op ``params.reps`` times on ``server``
    (its ``endpoint_url``, ``pid`` and ``log_path``), the groups interleaved and the order
    rotated every repetition; returns (every run, repetitions done, why it stopped early
    or None).

    A group of ``plan.skipped_groups``, and an op that once answered ``unavailable``, is
    not started (again): its runs carry the status and the reason. The loads of a group
    whose save did not succeed are skipped too."""
    expected = workdir / "expected.json"

    def job(op: str, prefix: str) -> ChildJob:
        return ChildJob(
            op, prefix, server.endpoint_url, str(expected), server.pid, str(server.log_path), BUCKET, params
        )

    prep = await run_child(job("prep", "prep"), max(params.op_timeout_s, 60))
    if prep.get("status") != "ok":
        raise RuntimeError(f"could not build the state: {prep.get('error')}")
    meta["build_state_s"] = prep.get("build_state_s")
    meta["ckpt_config"] = None
    runs: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    aborted: str | None = None
    order_0 = list(plan.groups)
    reps, reps_done = params.reps, 0
    for rep in range(reps):
        order = order_0[rep % len(order_0) :] + order_0[: rep % len(order_0)]
        for group in order:
            group_ops = [o for o in plan.groups[group] if o in selected]
            if not group_ops:
                continue
            if group in plan.skipped_groups:
                status, reason = plan.skipped_groups[group]
                runs += [{"op": o, "rep": rep, "status": status, "reason": reason} for o in group_ops]
                continue
            prefix = f"r{rep}-{group}"
            failed_write: str | None = None
            for op in group_ops:
                remaining = params.budget_s - (time.monotonic() - t_start)
                if remaining <= 0:
                    aborted = f"time budget of {params.budget_s:g} s used up during rep {rep + 1}/{reps}"
                    break
                if op in unavailable:
                    runs.append({"op": op, "rep": rep, "status": "unavailable", "reason": unavailable[op]})
                    continue
                if failed_write is not None and plan.ops[op].kind in ("load", "partial"):
                    runs.append({"op": op, "rep": rep, "status": "skipped", "reason": f"its save: {failed_write}"})
                    continue
                result = await run_child(job(op, prefix), min(params.op_timeout_s, max(remaining, 5.0)))
                result["rep"] = rep
                runs.append(result)
                if result.get("status") == "unavailable":
                    unavailable[op] = result.get("reason") or "unavailable"
                if plan.ops[op].kind == "save" and result.get("status") != "ok":
                    failed_write = f"{result.get('status')}: {result.get('reason') or result.get('error')}"
                if meta["ckpt_config"] is None and result.get("config"):
                    meta["ckpt_config"] = result["config"]
                console.print(progress_line(rep, reps, result), highlight=False)
            if group != "memcpy":  # the server's memory (or disk) stays flat
                with contextlib.suppress(Exception):
                    await plan.clear(prefix + "/")
            if aborted:
                break
        if aborted:
            console.print(f"[yellow]{aborted}: remaining measurements skipped[/]")
            break
        reps_done = rep + 1
    return runs, reps_done, aborted


def progress_line(rep: int, reps: int, r: Mapping[str, Any]) -> str:
    head = f"rep {rep + 1}/{reps}  {r['op']:<16}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}: {r.get('reason') or r.get('error')}"
    extra = ""
    if "blocking" in r.get("laps", {}):
        extra = f"  blocking {r['laps']['blocking']['wall_s']:.3f} s"
    srv = r.get("server_cpu_s")
    return (
        f"{head} {r['wall_s']:7.3f} s  cpu {r['cpu_s']:.2f} s  peak {r['peak_rss_mib']:.0f} MiB "
        f"(Δ {r['peak_rss_mib'] - r['rss_before_mib']:+.0f})  server cpu {srv if srv is None else round(srv, 2)}{extra}"
    )


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = os.getloadavg()
    return info


def versions(names: Sequence[str] = ()) -> dict[str, str]:
    """The installed versions of the benchmark's libraries (and of ``names``)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    base = ("asyncckpt", "aioboto3", "aiobotocore", "aiohttp", "boto3", "botocore", "s3transfer", "moto", "numpy")
    for name in (*base, *names):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out
