"""``asyncckpt bench --scale``: what commits, resumes, multi-process jobs, partial loads and
saves cost as the numbers of nodes, blobs and processes grow (issue 9's "done when" list).

:func:`run_scale` starts moto's server as a subprocess of its own
(:class:`~asyncckpt.testing.s3_server.SubprocessS3Server`, loopback only; its log is the
truth of requests and response bytes, see :mod:`._scale_log`) and runs every measured
operation in a fresh process (:mod:`._scale_ops`), each under a timeout and all under a
time budget. Four sections:

1. **commit record**: N nodes x B tiny blobs (B = 10 and 1000 by default, N = 1024): the
   client CPU of the commit (index PUT, decision, manifest, with the real records of a
   real upload), then from a fresh process ``get_resume_from_epoch_id()`` and
   ``committed_epochs()``: their CPU, requests and response bytes at both B.
2. **multi-process commit**: P processes (one node each, tiny state, a run id per run)
   save E epochs together; the requests per epoch (server log, by epoch) in total and per
   process, and each process's own count (``collect_request_stats``).
3. **partial loads**: ``load_blobs_locally`` of k blobs spread evenly over one node of
   8000 blobs of 4 KiB (k = 1000, 2000, 4000), next to a full ``load`` of that node; with
   the default ``coalesce_gap`` (neighbours share a ranged GET; medians of the repetitions)
   and, once, with 0 (a GET per blob).
4. **memory**: the extra RSS of a ``save`` (VmHWM reset before it, state allocated
   before) of 64 MiB, 256 MiB and 1 GiB of float32 arrays in 4 nodes, and of 100k tiny
   blobs, with the default ``max_bytes_in_flight``.

Targets are measured and reported (:mod:`._scale_report`), never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from asyncckpt import layout
from asyncckpt.testing.s3_server import SubprocessS3Server, create_bucket, empty_bucket

from ._report import median
from ._run import SERVER_MALLOC_ENV, clean_env, machine_info, versions
from ._scale_log import log_size, read_requests, request_epoch, summarize_requests
from ._scale_ops import READY, ScaleJob
from ._scale_report import evaluate_targets, markdown, render
from ._scale_sizes import DEFAULT_SCALE_BUDGET_S, DEFAULT_SCALE_OP_TIMEOUT_S, FULL, QUICK, ScaleSizes

__all__ = ["run_scale"]

CHILD_MODULE = "asyncckpt.cli.bench._scale_ops"
#: The requests of a multi-process commit that wait rather than write or read a record:
#: the other processes' reads of the absent decision, the committer's listings of receipts.
POLL_KINDS = ("GET decision (absent)", "LIST writer")
BUCKET = "asyncckpt-bench-scale"


class _Budget:
    """The time left of the run's budget, and the timeout of the next child."""

    def __init__(self, budget_s: float, op_timeout_s: float):
        self.budget_s, self.op_timeout_s = budget_s, op_timeout_s
        self.started = time.monotonic()
        self.exhausted: str | None = None

    def timeout(self) -> float | None:
        """The next child's timeout; None (and :attr:`exhausted` set) once the budget is spent."""
        remaining = self.budget_s - (time.monotonic() - self.started)
        if remaining <= 0:
            self.exhausted = f"time budget of {self.budget_s:g} s used up"
            return None
        return min(self.op_timeout_s, max(remaining, 5.0))


class _Runner:
    """Starts the children of one run against one server and collects their JSON lines."""

    def __init__(self, s3: SubprocessS3Server, admin: Any, workdir: Path, budget: _Budget, console: Console):
        self.s3, self.admin, self.workdir, self.budget, self.console = s3, admin, workdir, budget, console
        self._stderr: dict[int, Path] = {}

    def job(self, op: str, prefix: str, **args: Any) -> ScaleJob:
        return ScaleJob(op, self.s3.endpoint_url, BUCKET, prefix, self.s3.pid, str(self.s3.log_path), args)

    async def spawn(self, job: ScaleJob, *, interactive: bool = False) -> asyncio.subprocess.Process:
        """Start one child (its stdin a pipe when ``interactive``); its stderr goes to
        the run's work directory (see :meth:`result_of`)."""
        path = self.workdir / f"{job.op}-{time.monotonic_ns()}.err"
        stderr = await asyncio.to_thread(open, path, "wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                CHILD_MODULE,
                job.to_json(),
                stdin=asyncio.subprocess.PIPE if interactive else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=clean_env({}),
            )
        finally:
            stderr.close()  # the child has its own copy
        self._stderr[proc.pid] = path
        return proc

    async def run(self, job: ScaleJob) -> dict[str, Any]:
        """One child to its end: its JSON result (``status`` says how it went)."""
        timeout = self.budget.timeout()
        if timeout is None:
            return {"op": job.op, "status": "skipped", "error": self.budget.exhausted}
        proc = await self.spawn(job)
        try:
            async with asyncio.timeout(timeout):
                stdout, _ = await proc.communicate()
        except TimeoutError:
            return {"op": job.op, "status": "timeout", "error": f"no result within {timeout:.0f} s"}
        finally:
            await _reap(proc)
        return await self.result_of(job, stdout, proc)

    async def result_of(self, job: ScaleJob, stdout: bytes, proc: asyncio.subprocess.Process) -> dict[str, Any]:
        """The child's JSON line; without one, an error with the end of its stderr."""
        for line in reversed(stdout.decode("utf-8", "replace").splitlines()):
            with contextlib.suppress(ValueError):
                candidate = json.loads(line)
                if isinstance(candidate, dict) and "op" in candidate:
                    return candidate
        errors = await asyncio.to_thread(self._stderr_tail, proc.pid)
        return {"op": job.op, "status": "error", "error": f"exit {proc.returncode} without a result: {errors}"}

    def _stderr_tail(self, pid: int) -> str:
        path = self._stderr.get(pid)
        text = path.read_text(errors="replace") if path is not None and path.exists() else ""
        return " | ".join(text.strip().splitlines()[-3:])

    async def clear(self, prefix: str) -> None:
        """Delete a section's objects, so that the server's memory stays flat."""
        with contextlib.suppress(Exception):
            await empty_bucket(self.admin, BUCKET, prefix + "/")

    def progress(self, text: str) -> None:
        self.console.print(text, highlight=False)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()  # our own child, by its PID
        await proc.wait()


async def run_scale(
    *,
    quick: bool = False,
    sizes: ScaleSizes | None = None,
    out_json: Path | None = None,
    console: Console | None = None,
    budget_s: float = DEFAULT_SCALE_BUDGET_S,
    op_timeout_s: float = DEFAULT_SCALE_OP_TIMEOUT_S,
) -> dict[str, Any]:
    """Run the scale benchmark (see the module docstring); print its tables; return (and
    write to ``out_json``) every measurement, the targets and a Markdown table.

    A server that cannot start raises :class:`RuntimeError` (or :class:`OSError`); a
    measurement that fails is reported in the result, not raised.
    """
    console = console or Console()
    sizes = sizes or (QUICK if quick else FULL)
    budget = _Budget(budget_s, op_timeout_s)
    meta: dict[str, Any] = {
        "quick": quick,
        "sizes": asdict(sizes),
        "server": "moto_server (subprocess on 127.0.0.1, MALLOC_* tunables on the server only)",
        "budget_s": budget_s,
        "op_timeout_s": op_timeout_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "versions": versions(),
    }
    result: dict[str, Any] = {"meta": meta}
    workdir = Path(tempfile.mkdtemp(prefix="asyncckpt-bench-scale-"))
    server_tmp = workdir / "moto-tmp"
    server_tmp.mkdir()
    s3 = SubprocessS3Server(
        workdir / "moto_server.log", env=clean_env({**SERVER_MALLOC_ENV, "TMPDIR": str(server_tmp)})
    )
    try:
        await asyncio.to_thread(s3.start)
        meta["endpoint"] = s3.endpoint_url
        async with s3.admin_client() as admin:
            await create_bucket(admin, BUCKET)
            runner = _Runner(s3, admin, workdir, budget, console)
            runner.progress(f"moto_server pid {s3.pid} on {s3.endpoint_url}; {'quick' if quick else 'full'} sizes")
            result["commit"] = await _commit_section(runner, sizes)
            result["processes"] = await _process_section(runner, sizes)
            result["partial"] = await _partial_section(runner, sizes)
            result["memory"] = await _memory_section(runner, sizes)
    finally:
        await asyncio.to_thread(s3.stop)
        await asyncio.to_thread(shutil.rmtree, workdir, True)
    meta["aborted"] = budget.exhausted
    meta["elapsed_s"] = time.monotonic() - budget.started
    with contextlib.suppress(OSError):
        meta["loadavg_end"] = os.getloadavg()
    result["targets"] = evaluate_targets(result)
    result["markdown"] = markdown(result)
    if out_json is not None:  # first, so a broken console never loses the measurements
        await asyncio.to_thread(Path(out_json).write_text, json.dumps(result, indent=2, default=str))
    render(console, result)
    if out_json is not None:
        console.print(f"wrote {out_json}", highlight=False)
    return result


# ---------------------------------------------------------------------- 1. commit record


async def _commit_section(runner: _Runner, sizes: ScaleSizes) -> dict[str, Any]:
    scales = []
    for blobs in sizes.commit_blobs:
        prefix = f"commit-{blobs}"
        saved = await runner.run(
            runner.job("commit", prefix, nodes=sizes.commit_nodes, blobs_per_node=blobs, epochs=sizes.commit_epochs)
        )
        row: dict[str, Any] = {"blobs_per_node": blobs, "status": saved.get("status"), "error": saved.get("error")}
        if saved.get("status") == "ok":
            epochs = saved["epochs"]
            row.update(
                commit_cpu_s=max(e["commit"]["cpu_s"] for e in epochs),
                commit_wall_s=max(e["commit"]["wall_s"] for e in epochs),
                commit_requests=max(e["commit"]["server"]["requests"] for e in epochs),
                upload_wall_s=median([e["upload"]["wall_s"] for e in epochs]),
                upload_cpu_s=median([e["upload"]["cpu_s"] for e in epochs]),
                build_and_encode_s=saved["build_and_encode_s"],
                index_bytes=max(e["index_bytes"] for e in epochs),
                manifest_bytes=max(e["manifest_bytes"] for e in epochs),
                shard_bytes=epochs[0]["shard_bytes"],
                epochs=epochs,
            )
            resumed = await runner.run(runner.job("resume", prefix))
            row["resume_status"] = resumed.get("status")
            if resumed.get("status") == "ok":
                listing, count = resumed["listing"], len(resumed["committed_epochs"])
                row.update(
                    resume_epoch=resumed["resume_epoch"],
                    resume_cpu_s=resumed["resume"]["cpu_s"],
                    resume_wall_s=resumed["resume"]["wall_s"],
                    resume_requests=resumed["resume"]["server"]["requests"],
                    resume_bytes=resumed["resume"]["server"]["response_bytes"],
                    listed_epochs=count,
                    listing_requests=listing["server"]["requests"],
                    listing_bytes=listing["server"]["response_bytes"],
                    listing_requests_per_epoch=listing["server"]["requests"] / max(count, 1),
                    listing_bytes_per_epoch=listing["server"]["response_bytes"] / max(count, 1),
                    listing_cpu_s=listing["cpu_s"],
                )
            else:
                row["error"] = resumed.get("error")
            row["commit_and_resume_cpu_s"] = row["commit_cpu_s"] + row.get("resume_cpu_s", float("nan"))
        runner.progress(_commit_line(sizes.commit_nodes, row))
        scales.append(row)
        await runner.clear(prefix)
    return {"nodes": sizes.commit_nodes, "epochs": sizes.commit_epochs, "scales": scales}


def _commit_line(nodes: int, row: Mapping[str, Any]) -> str:
    head = f"commit  {nodes} nodes x {row['blobs_per_node']} blobs"
    if row.get("status") != "ok" or row.get("resume_status") != "ok":
        return f"{head}: {row.get('status')}/{row.get('resume_status')} {row.get('error')}"
    return (
        f"{head}: commit cpu {row['commit_cpu_s']:.3f} s, resume cpu {row['resume_cpu_s']:.3f} s "
        f"({row['resume_requests']} requests, {row['resume_bytes']} B), committed_epochs "
        f"{row['listing_bytes_per_epoch']:.0f} B/epoch; upload {row['upload_wall_s']:.1f} s"
    )


# ---------------------------------------------------------------------- 2. multi-process commit


async def _process_section(runner: _Runner, sizes: ScaleSizes) -> dict[str, Any]:
    runs = []
    for processes in sizes.processes:
        prefix = f"jobs-{processes}"
        row = await _run_job(runner, prefix, processes, sizes.process_epochs)
        runner.progress(_job_line(row))
        runs.append(row)
        await runner.clear(prefix)
    return {"epochs": sizes.process_epochs, "runs": runs}


async def _run_job(runner: _Runner, prefix: str, processes: int, epochs: int) -> dict[str, Any]:
    """P processes of one job save ``epochs`` epochs together; the server log, by epoch."""
    row: dict[str, Any] = {"processes": processes, "epochs": epochs}
    timeout = runner.budget.timeout()
    if timeout is None:
        return {**row, "status": "skipped", "error": runner.budget.exhausted}
    nodes = [f"rank_{i:03d}" for i in range(processes)]
    run_id = layout.new_run_id()
    jobs = [
        runner.job("job_worker", prefix, nodes=nodes, rank=r, run_id=run_id, epochs=epochs) for r in range(processes)
    ]
    procs: list[asyncio.subprocess.Process] = []
    log_path = str(runner.s3.log_path)
    try:
        async with asyncio.timeout(timeout):
            for job in jobs:
                procs.append(await runner.spawn(job, interactive=True))
            async with asyncio.TaskGroup() as tg:
                for proc in procs:
                    tg.create_task(_await_ready(proc))
            start = log_size(log_path) or 0
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            started = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                outputs = [tg.create_task(proc.communicate()) for proc in procs]
            row["wall_s"] = time.perf_counter() - started
    except TimeoutError:
        return {**row, "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    except ExceptionGroup as group:  # a worker ended before it was ready
        return {**row, "status": "error", "error": "; ".join(str(e) for e in group.exceptions)}
    finally:
        for proc in procs:
            await _reap(proc)
    results = [await runner.result_of(job, out.result()[0], proc) for job, out, proc in zip(jobs, outputs, procs)]
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        return {**row, "status": failed[0].get("status"), "error": failed[0].get("error")}
    requests = read_requests(log_path, start)
    by_epoch = {e: [r for r in requests if request_epoch(r) == e] for e in range(1, epochs + 1)}
    per_epoch = [summarize_requests(by_epoch[e]) for e in range(1, epochs + 1)]
    total = sum(p["requests"] for p in per_epoch)
    client = [sum(r["per_epoch"][e - 1]["requests"] for r in results) for e in range(1, epochs + 1)]
    kinds: dict[str, float] = {}
    for p in per_epoch:
        for kind, n in p["by_kind"].items():
            kinds[kind] = kinds.get(kind, 0) + n / epochs
    walls = [e["wall_s"] for r in results for e in r["per_epoch"]]
    polls = sum(n for kind, n in kinds.items() if kind in POLL_KINDS)
    row.update(
        status="ok",
        requests_per_epoch=total / epochs,
        requests_per_epoch_per_process=total / epochs / processes,
        poll_requests_per_epoch=polls,
        other_requests_per_epoch=total / epochs - polls,
        response_bytes_per_epoch=sum(p["response_bytes"] for p in per_epoch) / epochs,
        outside_epochs=len(requests) - total,
        by_kind_per_epoch=dict(sorted(kinds.items())),
        client_counted_per_epoch=sum(client) / epochs,
        max_process_requests_per_epoch=max(e["requests"] for r in results for e in r["per_epoch"]),
        save_wall_s_median=median(walls),
        save_wall_s_max=max(walls),
        per_epoch=per_epoch,
    )
    return row


async def _await_ready(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            raise EOFError(f"a job worker (pid {proc.pid}) ended before it was ready")
        if line.decode().strip() == READY:
            return


def _job_line(row: Mapping[str, Any]) -> str:
    head = f"job     P={row['processes']:<3}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}: {row.get('error')}"
    return (
        f"{head} {row['requests_per_epoch']:.1f} requests/epoch ({row['poll_requests_per_epoch']:.1f} polls), "
        f"{row['requests_per_epoch_per_process']:.2f} per process; {row['response_bytes_per_epoch']:.0f} response "
        f"B/epoch; save {row['save_wall_s_median']:.2f} s"
    )


# ---------------------------------------------------------------------- 3. partial loads


async def _partial_section(runner: _Runner, sizes: ScaleSizes) -> dict[str, Any]:
    prefix = "partial"
    shape = {"blobs": sizes.partial_blobs, "elements": sizes.partial_blob_elements}
    out: dict[str, Any] = {**shape, "blob_bytes": sizes.partial_blob_elements * 4, "rows": []}
    prep = await runner.run(runner.job("partial_prep", prefix, **shape))
    if prep.get("status") != "ok":
        out.update(status=prep.get("status"), error=prep.get("error"))
        return out
    # (op, blobs, coalesce_gap): None is TransferConfig's default; 0 fetches every blob alone
    plan: list[tuple[str, int, int | None]] = [("full_load", sizes.partial_blobs, None)]
    plan += [("partial_load", k, None) for k in sizes.partial_ks]
    plan += [("partial_load", k, 0) for k in sizes.partial_ks]
    runs: dict[tuple[str, int, int | None], list[dict[str, Any]]] = {item: [] for item in plan}
    for rep in range(sizes.partial_reps):
        todo = plan if rep == 0 else [item for item in plan if item[2] is None]  # a GET per blob: once
        shift = rep % len(todo)
        for op, k, gap in todo[shift:] + todo[:shift]:  # the order rotates every repetition
            args = {"k": k} if gap is None else {"k": k, "coalesce_gap": gap}
            runs[(op, k, gap)].append(await runner.run(runner.job(op, prefix, **args, **shape)))
    for (op, k, gap), mine in runs.items():
        ok = [r for r in mine if r.get("status") == "ok"]
        row: dict[str, Any] = {"op": op, "k": k, "coalesce_gap": gap, "n": len(ok), "attempts": len(mine)}
        if ok:
            wall = median([r["wall_s"] for r in ok])
            row.update(
                status="ok",
                wall_s=wall,
                cpu_s=median([r["cpu_s"] for r in ok]),
                server_cpu_s=median([r["server_cpu_s"] for r in ok]),
                requests=median([r["server"]["requests"] for r in ok]),
                response_bytes=median([r["server"]["response_bytes"] for r in ok]),
                by_kind=ok[0]["server"]["by_kind"],
                wall_ms_per_blob=1000 * wall / k if wall is not None else None,
                walls=[r["wall_s"] for r in ok],
            )
        else:
            row.update(
                status=mine[-1].get("status") if mine else "not run", error=mine[-1].get("error") if mine else None
            )
        runner.progress(_partial_line(row))
        out["rows"].append(row)
    await runner.clear(prefix)
    out["status"] = "ok"
    return out


def _partial_line(row: Mapping[str, Any]) -> str:
    gap = "" if row["coalesce_gap"] is None else f" (coalesce_gap={row['coalesce_gap']})"
    head = f"{row['op']:<13} {row['k']:>5} blobs{gap}"
    if row.get("status") != "ok":
        return f"{head}: {row.get('status')} {row.get('error')}"
    return f"{head}: {row['wall_s']:.3f} s, cpu {row['cpu_s']:.2f} s, {row['requests']:.0f} requests"


# ---------------------------------------------------------------------- 4. memory


async def _memory_section(runner: _Runner, sizes: ScaleSizes) -> dict[str, Any]:
    cases: list[dict[str, Any]] = [
        {"label": f"{mib:g} MiB float32", "state_mib": mib, "blobs_per_node": sizes.memory_blobs_per_node}
        for mib in sizes.memory_mib
    ]
    cases.append({"label": f"{sizes.memory_tiny_blobs} tiny blobs", "tiny_blobs": sizes.memory_tiny_blobs})
    rows = []
    for i, case in enumerate(cases):
        prefix = f"memory-{i}"
        args = {k: v for k, v in case.items() if k != "label"}
        got = await runner.run(runner.job("memory_save", prefix, nodes=sizes.memory_nodes, **args))
        row: dict[str, Any] = {**case, "nodes": sizes.memory_nodes, "status": got.get("status")}
        if got.get("status") == "ok":
            row.update(
                {
                    k: got[k]
                    for k in (
                        "state_bytes",
                        "max_bytes_in_flight",
                        "extra_rss_mib",
                        "peak_rss_mib",
                        "rss_before_mib",
                        "wall_s",
                        "cpu_s",
                    )
                }
            )
            row["requests"] = got["server"]["requests"]
            runner.progress(
                f"memory  {case['label']}: extra RSS {row['extra_rss_mib']:.0f} MiB (before {row['rss_before_mib']:.0f}), "
                f"save {row['wall_s']:.2f} s"
            )
        else:
            row["error"] = got.get("error")
            runner.progress(f"memory  {case['label']}: {row['status']} {row['error']}")
        rows.append(row)
        await runner.clear(prefix)
    return {"nodes": sizes.memory_nodes, "rows": rows}
