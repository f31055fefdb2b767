"""The demo in several OS processes, as a launcher such as torchrun would start them.

:func:`run_multiprocess_demo` runs :func:`~._single.run_demo`'s job with the nodes split
over spawned worker processes, each holding some of the nodes with its own manager and
the job's run id: every epoch commits through storage alone. The crash kills every
process; a new set of processes (a new run id) resumes, each checking its own nodes, and
the parent checks the final epoch with a single-process manager.

The parent's coroutine runs on the caller's loop. Each worker is a process of its own:
its entry point, :func:`_worker_process`, runs its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from rich.console import Console

from asyncckpt import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
    MultiNodeCheckpointManager,
    TransferConfig,
    job_from_env,
    split_nodes,
)

from .._options import node_names
from ._model import Workspace, compare_workspaces, recompute, reference_run, train_all
from ._render import (
    DemoResult,
    TransferStats,
    facts_grid,
    merge_reports,
    print_check,
    print_commit_columns,
    print_commit_seen,
    print_header,
    print_ranks,
    print_verdict,
)
from ._single import require_empty, validate_job

__all__ = ["run_multiprocess_demo"]

# A worker sends the parent, in order: "ready", then after the parent's "go" ("resumed"
# when resuming), "saved" per epoch, "done"; or "error" at any point. A worker of the
# first run waits after its last save until the parent kills it (the crash).
_MAX_PROBLEMS_SENT = 20
_POLL_SECONDS = 0.25  # the longest a wait blocks its thread: cancellation stays prompt


@dataclass(frozen=True)
class _WorkerSpec:
    """What one worker process does (pickled to the spawned child)."""

    url: str
    storage_options: dict[str, Any]
    config: TransferConfig
    launch_env: dict[str, str]  # what a launcher sets per process: ASYNCCKPT_RUN_ID, _RANK, _WORLD_SIZE
    nodes: int
    mib_per_node: float
    last_epoch: int
    resume: bool


def _worker_process(spec: _WorkerSpec, conn: Connection) -> None:
    """The entry point of one spawned worker process: the launcher's environment, then
    the worker on an event loop of its own; the process exits with :func:`_worker`'s code."""
    os.environ.update(spec.launch_env)
    try:
        code = asyncio.run(_worker(spec, conn))
    finally:
        conn.close()
    raise SystemExit(code)


def _send(conn: Connection, kind: str, **payload: Any) -> None:
    """One small message to the parent (a pipe write far below the pipe's buffer: it does not block)."""
    conn.send((kind, payload))


async def _worker(spec: _WorkerSpec, conn: Connection) -> int:
    """One process of the job: its nodes, its manager, the job's run id; see :func:`run_multiprocess_demo`."""
    job = job_from_env()
    if job is None:
        raise RuntimeError("no job identity in the environment (ASYNCCKPT_RUN_ID)")
    names = node_names(spec.nodes)
    mine = split_nodes(names, job.rank, job.world_size)
    index = {name: names.index(name) for name in mine}
    try:
        async with MultiNodeCheckpointManager(
            spec.url, storage_options=spec.storage_options, config=spec.config, run_id=job.run_id
        ) as mgr:
            if spec.resume:
                workspaces: dict[str, Workspace] = {name: {} for name in mine}
            else:
                workspaces = await asyncio.to_thread(recompute, index, 0, spec.mib_per_node)
                await mgr.init(names, local_nodes=workspaces)
            _send(conn, "ready")
            if await asyncio.to_thread(conn.recv) != "go":
                return 1
            first = 0
            if spec.resume:
                epoch = await mgr.get_resume_from_epoch_id()
                if epoch is None:
                    raise CheckpointNotFoundError(f"no committed epoch in {spec.url} to resume from")
                await mgr.init(names, retrieve_from_epoch=epoch, local_nodes=workspaces)
                await mgr.load(epoch)
                report = await mgr.report_checkpoint_stats("checkpoint_load")
                expected = await asyncio.to_thread(recompute, index, epoch, spec.mib_per_node)
                compared, diff = await asyncio.to_thread(compare_workspaces, expected, workspaces)
                del expected
                _send(
                    conn,
                    "resumed",
                    epoch=epoch,
                    report=report,
                    compared=compared,
                    problems=diff[:_MAX_PROBLEMS_SENT],
                    more_problems=max(len(diff) - _MAX_PROBLEMS_SENT, 0),
                )
                first = epoch + 1
            for epoch in range(first, spec.last_epoch + 1):
                if epoch:
                    await train_all(workspaces)
                await mgr.save(epoch)  # returns once the epoch is committed, by whichever process
                _send(conn, "saved", epoch=epoch, report=await mgr.report_checkpoint_stats("checkpoint_save"))
            if not spec.resume:
                await asyncio.to_thread(conn.recv)  # the crash: the parent kills this process here
                return 1
    except CheckpointError as exc:
        with contextlib.suppress(OSError):
            _send(conn, "error", type=type(exc).__name__, message=str(exc))
        return 2
    except (EOFError, BrokenPipeError):
        return 1  # the parent is gone
    _send(conn, "done")
    return 0


class _Incarnation:
    """One incarnation of the job: spawned workers sharing a run id, and the parent's
    ends of their pipes. Every wait ends at the incarnation's deadline; :meth:`kill` ends it."""

    def __init__(self, label: str, specs: Sequence[_WorkerSpec], timeout: float):
        self.label = label
        self.timeout = timeout
        self._specs = list(specs)
        self._deadline = time.monotonic() + timeout
        self.procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._inbox: list[deque[tuple[str, dict[str, Any]]]] = []
        self._open: set[int] = set()  # ranks whose pipe may still carry messages
        self._running: set[int] = set()  # ranks whose exit was not seen yet
        self.nodes: list[list[str]] = []

    def start(self) -> None:
        """Spawn every worker; each gets its end of a pipe to this process."""
        ctx = multiprocessing.get_context("spawn")
        for rank, spec in enumerate(self._specs):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_process,
                args=(spec, theirs),
                name=f"asyncckpt-demo-{spec.launch_env['ASYNCCKPT_RUN_ID']}-rank{rank}",
                daemon=True,
            )
            try:
                proc.start()
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()  # the child holds its end: our pipe ends (EOF) when the child does
            self.procs.append(proc)
            self._conns.append(ours)
            self._inbox.append(deque())
            self._open.add(rank)
            self._running.add(rank)
            self.nodes.append(split_nodes(node_names(spec.nodes), rank, len(self._specs)))

    @property
    def pids(self) -> list[int]:
        """The workers' PIDs, in rank order."""
        return [proc.pid or 0 for proc in self.procs]

    def send_all(self, message: str) -> None:
        """Send ``message`` to every worker whose pipe is open (one that is gone shows up in :meth:`expect`)."""
        for rank in sorted(self._open):
            try:
                self._conns[rank].send(message)
            except OSError:
                pass  # that worker is gone; its exit shows up in expect()

    async def expect(self, kind: str, what: str) -> list[dict[str, Any]]:
        """The next message of every worker, which must be ``kind``, in rank order.

        A worker's error, an exit, or no message by the deadline is a
        :class:`CheckpointError` naming the worker (and ``what`` was awaited).
        """
        got: dict[int, dict[str, Any]] = {}
        while True:
            for rank, inbox in enumerate(self._inbox):
                if rank in got or not inbox:
                    continue
                got_kind, payload = inbox.popleft()
                who = f"{self.label}: worker rank {rank} (pid {self.pids[rank]})"
                if got_kind == kind:
                    got[rank] = payload
                elif got_kind == "error":
                    raise CheckpointError(
                        f"{who} failed while awaiting {what}: {payload['type']}: {payload['message']}"
                    )
                elif got_kind == "exit":
                    raise CheckpointError(f"{who} exited with code {payload['code']} while awaiting {what}")
                else:
                    raise CheckpointError(f"{who} sent {got_kind!r} while awaiting {what}")
            if len(got) == len(self.procs):
                return [got[rank] for rank in range(len(self.procs))]
            await self._receive(what, [rank for rank in range(len(self.procs)) if rank not in got])

    async def _receive(self, what: str, waiting_for: list[int]) -> None:
        """Wait (at most until the deadline) for messages or exits and file them by rank."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            late = [node for rank in waiting_for for node in self.nodes[rank]]
            raise CheckpointTimeoutError(
                f"{self.label}: still awaiting {what} from worker rank(s) {waiting_for} "
                f"(pids {[self.pids[r] for r in waiting_for]}) after {self.timeout:g} s (--timeout); every worker is killed",
                missing_nodes=late,
            )
        watched: dict[Any, tuple[str, int]] = {self._conns[rank]: ("message", rank) for rank in self._open}
        watched.update({self.procs[rank].sentinel: ("exit", rank) for rank in self._running})
        ready = await asyncio.to_thread(multiprocessing.connection.wait, list(watched), min(remaining, _POLL_SECONDS))
        events = sorted((watched[obj] for obj in ready), key=lambda ev: ev[0] == "exit")  # messages first
        for event, rank in events:
            self._drain(rank)
            if event == "exit":
                proc = self.procs[rank]
                proc.join(5)  # its sentinel says it ended: reaped at once
                self._running.discard(rank)
                self._inbox[rank].append(("exit", {"code": proc.exitcode}))

    def _drain(self, rank: int) -> None:
        conn = self._conns[rank]
        try:
            while rank in self._open and conn.poll():
                self._inbox[rank].append(conn.recv())
        except (EOFError, OSError):
            self._open.discard(rank)

    def kill(self) -> list[int]:
        """SIGKILL every worker still running, by its PID, and reap all; the killed PIDs."""
        killed = []
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                killed.append(proc.pid or 0)
        for proc in self.procs:
            proc.join(10)
        for conn in self._conns:
            conn.close()
        self._open.clear()
        self._running.clear()
        return killed


async def run_multiprocess_demo(
    url: str,
    *,
    processes: int,
    nodes: int = 4,
    epochs: int = 5,
    crash_after: int = 3,
    mib_per_node: float = 8.0,
    storage_options: Mapping[str, Any] | None = None,
    config: TransferConfig | None = None,
    console: Console | None = None,
    timeout: float = 300.0,  # noqa: ASYNC109 - a deadline per set of workers (--timeout), not one for the call
) -> DemoResult:
    """:func:`~._single.run_demo` with the nodes in ``processes`` spawned OS processes.

    Each worker holds the nodes :func:`~asyncckpt.split_nodes` gives its rank, runs its
    own manager with the run's id (read with :func:`~asyncckpt.job_from_env`, as under a
    launcher) and saves every epoch; an epoch commits through storage alone. After
    ``crash_after`` every worker is killed (SIGKILL). New workers with a new run id
    resume from ``get_resume_from_epoch_id()``, each checks that its nodes hold what was
    saved (recomputed deterministically), and they train to ``epochs``. Then this
    process loads the last epoch with a single-process manager and compares it with an
    uninterrupted run.

    ``storage_options`` must let other processes reach the
    storage (``memory://`` does not work: it lives in one process). Each set of workers
    has ``timeout`` seconds, startup included; a worker's failure, early exit or
    lateness raises :class:`~asyncckpt.CheckpointError` and every worker is killed.
    """
    validate_job(nodes, epochs, crash_after, mib_per_node)
    if not isinstance(processes, int) or not 1 <= processes <= nodes:
        raise ValueError(f"processes must be between 1 and nodes ({nodes}), got {processes!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    console = console or Console()
    options = dict(storage_options or {})
    config = config or TransferConfig()
    started = time.perf_counter()
    names = node_names(nodes)
    # a worker whose peers died gives up on its own before its incarnation's deadline
    worker_config = replace(config, commit_timeout=min(config.commit_timeout, timeout))

    def incarnation(label: str, resume: bool, last_epoch: int) -> _Incarnation:
        run_id = f"demo-{secrets.token_hex(4)}"  # a new job incarnation
        specs = [
            _WorkerSpec(
                url=url,
                storage_options=options,
                config=worker_config,
                launch_env={
                    "ASYNCCKPT_RUN_ID": run_id,
                    "ASYNCCKPT_RANK": str(rank),
                    "ASYNCCKPT_WORLD_SIZE": str(processes),
                },
                nodes=nodes,
                mib_per_node=mib_per_node,
                last_epoch=last_epoch,
                resume=resume,
            )
            for rank in range(processes)
        ]
        return _Incarnation(f"{label} (run id {run_id})", specs, timeout)

    print_header(console, url, options, config, nodes, epochs, crash_after, mib_per_node, processes)
    async with _within(timeout, "checking that the location is empty"):
        async with MultiNodeCheckpointManager(url, storage_options=options, config=config) as mgr:
            await require_empty(mgr, url)

    saves: list[TransferStats] = []
    problems: list[str] = []

    # -- run 1: from scratch until the crash -------------------------------------------
    first = incarnation("run 1", resume=False, last_epoch=crash_after)
    try:
        with console.status(f"starting {processes} worker processes..."):
            first.start()
            await first.expect("ready", "the start-up")
        console.print(f"[bold]{first.label}[/]: {processes} processes start from scratch")
        print_ranks(console, first.pids, first.nodes)
        print_commit_columns(console, processes)
        first.send_all("go")
        for epoch in range(crash_after + 1):
            with console.status(f"epoch {epoch}: waiting until every process sees the commit..."):
                seen = await first.expect("saved", f"the commit of epoch {epoch}")
            saves.append(print_commit_seen(console, epoch, [m["report"] for m in seen], names, problems))
        killed = first.kill()
    finally:
        first.kill()
    console.print(
        f"[bold yellow]crash![/] (simulated) after epoch {crash_after}: SIGKILL to every worker (pids {killed})"
    )
    console.print()

    # -- run 2: new processes resume ----------------------------------------------------
    second = incarnation("run 2", resume=True, last_epoch=epochs)
    resume: int | None = None
    load_stats: TransferStats | None = None
    compared_load = 0
    try:
        with console.status(f"starting {processes} new worker processes..."):
            second.start()
            await second.expect("ready", "the start-up")
        console.print(f"[bold]{second.label}[/]: {processes} new processes resume")
        print_ranks(console, second.pids, second.nodes)
        second.send_all("go")
        with console.status("resuming: get_resume_from_epoch_id, init(retrieve_from_epoch), load..."):
            resumed = await second.expect("resumed", "the resume")
        chosen = sorted({r["epoch"] for r in resumed})
        facts = facts_grid()
        if len(chosen) != 1:
            problems.append(f"the processes resumed from different epochs: {[r['epoch'] for r in resumed]}")
            facts.add_row("resume epoch", f"[red]the processes disagree: {[r['epoch'] for r in resumed]}[/]")
            console.print(facts)
        else:
            resume = chosen[0]
            if resume != crash_after:
                problems.append(f"get_resume_from_epoch_id() returned {resume}, expected {crash_after}")
            load_stats = merge_reports([r["report"] for r in resumed])
            facts.add_row("resume epoch", f"{resume} (the latest committed; every process agrees)")
            facts.add_row(
                "load",
                f"{load_stats.seconds:.3f} s (slowest process), {load_stats.bytes / 1e6:.1f} MB, "
                f"{load_stats.mb_per_s:.0f} MB/s, {load_stats.requests} requests",
            )
            facts.add_row("slowest node", f"{load_stats.slowest_node} ({load_stats.slowest_seconds:.3f} s)")
            console.print(facts)
            diff = [p for r in resumed for p in r["problems"]]
            diff += [
                f"... and {more} more in rank {rank}" for rank, r in enumerate(resumed) if (more := r["more_problems"])
            ]
            compared_load = sum(r["compared"] for r in resumed)
            problems.extend(f"after load of epoch {resume}: {d}" for d in diff)
            print_check(
                console,
                f"restored state = state saved at epoch {resume}, in every process",
                compared_load,
                diff,
            )
            console.print()
            print_commit_columns(console, processes)
            for epoch in range(resume + 1, epochs + 1):
                with console.status(f"epoch {epoch}: waiting until every process sees the commit..."):
                    seen = await second.expect("saved", f"the commit of epoch {epoch}")
                saves.append(print_commit_seen(console, epoch, [m["report"] for m in seen], names, problems))
            await second.expect("done", "the end of training")
            exits = await second.expect("exit", "a clean exit")
            problems.extend(
                f"worker rank {rank} exited with code {e['code']}" for rank, e in enumerate(exits) if e["code"] != 0
            )
    finally:
        second.kill()

    # -- the verdict: a single-process manager reads the last epoch ----------------------
    compared_final = 0
    if resume is not None:
        with console.status("computing the uninterrupted reference run..."):
            reference = await asyncio.to_thread(reference_run, nodes, epochs, mib_per_node)
        final: dict[str, Workspace] = {name: {} for name in names}
        async with _within(timeout, f"loading epoch {epochs} in this process"):
            async with MultiNodeCheckpointManager(url, storage_options=options, config=config) as mgr:
                committed = await mgr.committed_epochs()
                if committed != list(range(epochs + 1)):
                    problems.append(f"committed epochs are {committed}, expected 0 to {epochs}")
                await mgr.init(final)
                with console.status(f"loading epoch {epochs} in this process..."):
                    await mgr.load(epochs)
        compared_final, diff = await asyncio.to_thread(compare_workspaces, reference, final)
        del reference, final
        problems.extend(f"final state: {d}" for d in diff)
        console.print()
        print_check(
            console,
            f"final state (epoch {epochs} loaded in this process) = an uninterrupted {epochs}-epoch run",
            compared_final,
            diff,
        )

    result = DemoResult(
        passed=not problems,
        url=url,
        nodes=nodes,
        epochs=epochs,
        crash_after=crash_after,
        resumed_from=resume,
        saves=tuple(saves),
        load=load_stats,
        blobs_checked=compared_load + compared_final,
        problems=tuple(problems),
        seconds=time.perf_counter() - started,
        processes=processes,
    )
    print_verdict(console, result)
    return result


@contextlib.asynccontextmanager
async def _within(seconds: float, what: str) -> AsyncIterator[None]:
    """Bound the block by ``seconds``: past them it is cancelled and
    :class:`~asyncckpt.CheckpointTimeoutError` says what took too long."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            yield
    except TimeoutError:
        if deadline.expired():
            raise CheckpointTimeoutError(f"{what} took longer than {seconds:g} s (--timeout)") from None
        raise
