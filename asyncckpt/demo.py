"""A simulated multi-node training job that checkpoints, crashes and resumes.

:func:`run_demo` is what ``asyncckpt demo`` runs. Every node ("trainer_0", ...) holds
the state of a small model in its workspace: an embedding table (most of the bytes), a
dense layer, the optimizer state, a step counter, a data cursor, the learning rate and
the state of its random generator. Each epoch updates every array deterministically
and saves a checkpoint (epoch 0 is the state right after initialisation, as in caffe2).

After epoch ``crash_after`` the job "crashes": the manager and every workspace are
dropped. A new manager then finds the epoch to resume from, loads it into empty
workspaces, and the demo checks that every blob equals what was saved, bit for bit.
Training continues to ``epochs``, and the final state must equal an uninterrupted
run computed in memory.

:func:`run_multiprocess_demo` runs the same job as several OS processes (spawned), each
holding some of the nodes with its own manager and the job's run id, as a launcher
such as torchrun would start them: every epoch commits through storage alone. The
crash kills every process; a new set of processes (a new run id) resumes, each
checking its own nodes, and the parent checks the final epoch with a single-process
manager. Nothing here calls ``asyncio.run``: the CLI owns the event loops, the
workers' too (it passes the function that runs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import multiprocessing
import multiprocessing.connection
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import MiB, TransferConfig
from .errors import (
    CheckpointConflictError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
)
from .launcher import job_from_env, split_nodes
from .manager import MultiNodeCheckpointManager

__all__ = [
    "DemoResult",
    "TransferStats",
    "run_demo",
    "run_multiprocess_demo",
    "init_workspace",
    "train_epoch",
    "node_names",
]

SEED = 1_2024_0611
EMBED_DIM = 64
DENSE_DIM = 64
STEPS_PER_EPOCH = 1
BATCH_SIZE = 512
LR_START = 0.05
LR_DECAY = 0.9
MOMENTUM = 0.9

Workspace = dict[str, Any]


# ---------------------------------------------------------------------- the "model"


def node_names(count: int) -> list[str]:
    """``["trainer_0", "trainer_1", ...]``."""
    return [f"trainer_{i}" for i in range(count)]


def init_workspace(node_index: int, mib_per_node: float) -> Workspace:
    """The freshly initialised state of one node: about ``mib_per_node`` MiB of weights."""
    rng = np.random.default_rng([SEED, node_index])
    dense_w = rng.standard_normal((DENSE_DIM, DENSE_DIM)) * 0.1  # float64
    dense_b = np.zeros(DENSE_DIM, dtype=np.float32)
    rest = int(mib_per_node * MiB) - dense_w.nbytes - dense_b.nbytes
    rows = max(1, rest // (EMBED_DIM * np.dtype(np.float32).itemsize))
    embedding = rng.random((rows, EMBED_DIM), dtype=np.float32)
    embedding -= np.float32(0.5)
    embedding *= np.float32(0.02)
    return {
        "model.embedding": embedding,
        "model.dense_w": dense_w,
        "model.dense_b": dense_b,
        "optim.embedding_sq_sum": np.zeros(rows, dtype=np.float32),  # row-wise Adagrad
        "optim.dense_momentum": np.zeros_like(dense_w),
        "step": np.int64(0),
        "data_cursor": 0,
        "lr": LR_START,
        "rng_state": rng.bit_generator.state,  # a dict holding 128-bit ints
    }


def train_epoch(ws: Workspace) -> None:
    """One deterministic epoch: the gradients come from the node's own generator,
    whose state lives in the workspace, so a restored workspace continues exactly."""
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = ws["rng_state"]
    emb, sq_sum = ws["model.embedding"], ws["optim.embedding_sq_sum"]
    dense_w, dense_b, momentum = ws["model.dense_w"], ws["model.dense_b"], ws["optim.dense_momentum"]
    lr = ws["lr"]
    for _ in range(STEPS_PER_EPOCH):
        grad = rng.random(emb.shape, dtype=np.float32)  # uniform: cheaper than normal, as good here
        grad -= np.float32(0.5)
        sq_sum += np.einsum("ij,ij->i", grad, grad)
        grad *= (lr / (np.sqrt(sq_sum) + np.float32(1e-6)))[:, None]
        emb -= grad
        momentum *= MOMENTUM
        momentum += rng.standard_normal(dense_w.shape)
        dense_w -= lr * momentum
        dense_b -= np.float32(lr) * rng.standard_normal(DENSE_DIM, dtype=np.float32)
        ws["step"] = ws["step"] + np.int64(1)
        ws["data_cursor"] += BATCH_SIZE
    ws["lr"] = lr * LR_DECAY
    ws["rng_state"] = rng.bit_generator.state


def _init_all(nodes: int, mib_per_node: float) -> dict[str, Workspace]:
    return {name: init_workspace(i, mib_per_node) for i, name in enumerate(node_names(nodes))}


def _recompute(node_indices: Mapping[str, int], epochs: int, mib_per_node: float) -> dict[str, Workspace]:
    """The state of the given nodes (name -> index) after ``epochs`` epochs, from scratch."""
    workspaces = {name: init_workspace(i, mib_per_node) for name, i in node_indices.items()}
    for ws in workspaces.values():
        for _ in range(epochs):
            train_epoch(ws)
    return workspaces


def _reference_run(nodes: int, epochs: int, mib_per_node: float) -> dict[str, Workspace]:
    """The uninterrupted job, in memory: the state every node must end with."""
    return _recompute({name: i for i, name in enumerate(node_names(nodes))}, epochs, mib_per_node)


async def _train_all(workspaces: Mapping[str, Workspace]) -> None:
    """One epoch on every node, off the event loop (numpy releases the GIL)."""
    async with asyncio.TaskGroup() as tg:
        for ws in workspaces.values():
            tg.create_task(asyncio.to_thread(train_epoch, ws))


# ---------------------------------------------------------------------- checks


def _blob_difference(expected: Any, actual: Any) -> str | None:
    """Why ``actual`` is not exactly ``expected`` (same type, dtype, shape, bits), or None."""
    if type(actual) is not type(expected):
        return f"type {type(actual).__name__}, expected {type(expected).__name__}"
    if isinstance(expected, np.ndarray):
        if actual.dtype != expected.dtype:
            return f"dtype {actual.dtype}, expected {expected.dtype}"
        if actual.shape != expected.shape:
            return f"shape {actual.shape}, expected {expected.shape}"
        if not np.array_equal(actual, expected):
            count = int(np.count_nonzero(actual != expected))
            return f"{count} of {expected.size} elements differ"
        return None
    return None if actual == expected else f"{actual!r:.60}, expected {expected!r:.60}"


def compare_workspaces(
    expected: Mapping[str, Mapping[str, Any]], actual: Mapping[str, Mapping[str, Any]]
) -> tuple[int, list[str]]:
    """Compare every blob of every node; returns (blobs compared, problems)."""
    compared, problems = 0, []
    for node, exp in expected.items():
        act = actual.get(node)
        if act is None:
            problems.append(f"{node}: node missing")
            continue
        for name in sorted(set(exp) | set(act)):
            if name not in act:
                problems.append(f"{node}/{name}: missing")
            elif name not in exp:
                problems.append(f"{node}/{name}: unexpected blob")
            else:
                compared += 1
                why = _blob_difference(exp[name], act[name])
                if why:
                    problems.append(f"{node}/{name}: {why}")
    return compared, problems


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class TransferStats:
    """One save or load, from :meth:`MultiNodeCheckpointManager.report_checkpoint_stats`."""

    action: str
    epoch: int
    seconds: float
    bytes: int
    slowest_node: str | None
    slowest_seconds: float
    requests: int
    retries: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> TransferStats:
        nodes = report.get("nodes") or {}
        slowest = report.get("slowest_node")
        return cls(
            action=report["action"],
            epoch=report["epoch"],
            seconds=float(report["seconds"]),
            bytes=int(report["bytes"]),
            slowest_node=slowest,
            slowest_seconds=float(nodes[slowest]["seconds"]) if slowest in nodes else 0.0,
            requests=sum(int(n.get("requests", 0)) for n in nodes.values()),
            retries=sum(int(n.get("retries", 0)) for n in nodes.values()),
        )


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` did; ``passed`` is the verdict, ``problems`` say why not."""

    passed: bool
    url: str
    nodes: int
    epochs: int
    crash_after: int
    resumed_from: int | None
    saves: tuple[TransferStats, ...]
    load: TransferStats | None
    blobs_checked: int
    problems: tuple[str, ...]
    seconds: float
    processes: int = 1

    @property
    def bytes_saved(self) -> int:
        return sum(s.bytes for s in self.saves)


# ---------------------------------------------------------------------- the job


def _epoch_table(title: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", header_style="bold cyan")
    table.add_column("epoch", justify="right")
    table.add_column("save s", justify="right")
    table.add_column("MB", justify="right")
    table.add_column("MB/s", justify="right")
    table.add_column("slowest node", justify="left")
    table.add_column("requests", justify="right")
    return table


def _add_row(table: Table, stats: TransferStats) -> None:
    slowest = f"{stats.slowest_node} ({stats.slowest_seconds:.3f} s)" if stats.slowest_node else "-"
    requests = f"{stats.requests}" + (f" [yellow]({stats.retries} retried)[/]" if stats.retries else "")
    table.add_row(
        str(stats.epoch),
        f"{stats.seconds:.3f}",
        f"{stats.bytes / 1e6:.1f}",
        f"{stats.mb_per_s:.0f}",
        slowest,
        requests,
    )


async def _save_epoch(mgr: MultiNodeCheckpointManager, epoch: int, console: Console) -> TransferStats:
    with console.status(f"saving epoch {epoch}..."):
        await mgr.save(epoch)
    return TransferStats.from_report(await mgr.report_checkpoint_stats("checkpoint_save"))


async def run_demo(
    url: str,
    *,
    nodes: int = 4,
    epochs: int = 5,
    crash_after: int = 3,
    mib_per_node: float = 8.0,
    storage_options: Mapping[str, Any] | None = None,
    config: TransferConfig | None = None,
    console: Console | None = None,
) -> DemoResult:
    """Train, checkpoint, crash after ``crash_after``, resume, finish, and verify.

    ``url`` must hold no checkpoint yet (else :class:`CheckpointConflictError`).
    Storage failures raise :class:`~asyncckpt.CheckpointError`; a state that does not
    match comes back as ``passed=False`` with the differences in ``problems``.
    """
    _validate_job(nodes, epochs, crash_after, mib_per_node)
    console = console or Console()
    options = dict(storage_options or {})
    config = config or TransferConfig()
    started = time.perf_counter()
    names = node_names(nodes)

    _print_header(console, url, options, config, nodes, epochs, crash_after, mib_per_node)

    saves: list[TransferStats] = []
    problems: list[str] = []

    # -- run 1: from scratch until the crash -------------------------------------------
    async with MultiNodeCheckpointManager(url, storage_options=options, config=config) as mgr:
        await _require_empty(mgr, url)
        workspaces = await asyncio.to_thread(_init_all, nodes, mib_per_node)
        await mgr.init(workspaces)
        table = _epoch_table(f"run 1 (run id {mgr.run_id}): from scratch")
        for epoch in range(crash_after + 1):
            if epoch:
                await _train_all(workspaces)
            stats = await _save_epoch(mgr, epoch, console)
            saves.append(stats)
            _add_row(table, stats)
        saved_at_crash = await asyncio.to_thread(copy.deepcopy, workspaces)
    console.print(table)
    del workspaces, mgr  # the crash: nothing of run 1 survives but the bucket (and our copy for checking)
    console.print(f"[bold yellow]crash![/] (simulated) after epoch {crash_after}: manager and workspaces dropped")
    console.print()

    # -- run 2: a new manager resumes ----------------------------------------------------
    load_stats: TransferStats | None = None
    compared_load = 0
    async with MultiNodeCheckpointManager(url, storage_options=options, config=config) as mgr:
        resume = await mgr.get_resume_from_epoch_id()
        console.print(f"[bold]run 2 (run id {mgr.run_id}): a new manager resumes[/]")
        facts = _facts()
        if resume != crash_after:
            problems.append(f"get_resume_from_epoch_id() returned {resume}, expected {crash_after}")
        if resume is None:
            facts.add_row("resume epoch", "[red]none: no committed epoch found[/]")
            console.print(facts)
            restored: dict[str, Workspace] = {}
        else:
            restored = {name: {} for name in names}
            await mgr.init(restored, retrieve_from_epoch=resume)
            with console.status(f"loading epoch {resume}..."):
                await mgr.load(resume)
            load_stats = TransferStats.from_report(await mgr.report_checkpoint_stats("checkpoint_load"))
            facts.add_row("resume epoch", f"{resume} (the latest committed)")
            facts.add_row(
                "load",
                f"{load_stats.seconds:.3f} s, {load_stats.bytes / 1e6:.1f} MB, {load_stats.mb_per_s:.0f} MB/s, "
                f"{load_stats.requests} requests",
            )
            facts.add_row("slowest node", f"{load_stats.slowest_node} ({load_stats.slowest_seconds:.3f} s)")
            shard_url = mgr.get_ckpt_db_name(names[0], resume) or "-"
            facts.add_row("a shard", f"[dim]{escape(_relative(shard_url, url))}[/]")
            console.print(facts)
            compared_load, diff = await asyncio.to_thread(compare_workspaces, saved_at_crash, restored)
            problems.extend(f"after load of epoch {resume}: {d}" for d in diff)
            _print_check(console, f"restored state = state saved at epoch {crash_after}", compared_load, diff)
            table = _epoch_table(f"run 2 (run id {mgr.run_id}): training continues")
            console.print()
            for epoch in range(resume + 1, epochs + 1):
                await _train_all(restored)
                stats = await _save_epoch(mgr, epoch, console)
                saves.append(stats)
                _add_row(table, stats)
            if table.row_count:
                console.print(table)
    del saved_at_crash

    # -- the verdict ---------------------------------------------------------------------
    with console.status("computing the uninterrupted reference run..."):
        reference = await asyncio.to_thread(_reference_run, nodes, epochs, mib_per_node)
    compared_final, diff = await asyncio.to_thread(compare_workspaces, reference, restored)
    problems.extend(f"final state: {d}" for d in diff)
    _print_check(console, f"final state = an uninterrupted {epochs}-epoch run", compared_final, diff)

    seconds = time.perf_counter() - started
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
        seconds=seconds,
    )
    _print_verdict(console, result)
    return result


# ---------------------------------------------------------------------- several processes

# A worker sends the parent, in order: "ready", then after the parent's "go" ("resumed"
# when resuming), "saved" per epoch, "done"; or "error" at any point. A worker of the
# first run waits after its last save until the parent kills it (the crash).
_MAX_PROBLEMS_SENT = 20
_POLL_SECONDS = 0.25  # the longest a wait blocks its thread: cancellation stays prompt

RunLoop = Callable[[Coroutine[Any, Any, int]], int]


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


def _worker_process(spec: _WorkerSpec, conn: Connection, run_loop: RunLoop) -> None:
    """The entry point of one spawned worker: the launcher's environment, then its own event loop."""
    os.environ.update(spec.launch_env)
    try:
        code = run_loop(_worker(spec, conn))
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
                workspaces = await asyncio.to_thread(_recompute, index, 0, spec.mib_per_node)
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
                expected = await asyncio.to_thread(_recompute, index, epoch, spec.mib_per_node)
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
                    await _train_all(workspaces)
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


class _Wave:
    """One incarnation of the job: spawned workers sharing a run id, and the parent's
    ends of their pipes. Every wait ends at the wave's deadline; :meth:`kill` ends it."""

    def __init__(self, label: str, specs: Sequence[_WorkerSpec], run_loop: RunLoop, timeout: float):
        self.label = label
        self.timeout = timeout
        self._specs = list(specs)
        self._run_loop = run_loop
        self._deadline = time.monotonic() + timeout
        self.procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._inbox: list[deque[tuple[str, dict[str, Any]]]] = []
        self._open: set[int] = set()  # ranks whose pipe may still carry messages
        self._running: set[int] = set()  # ranks whose exit was not seen yet
        self.nodes: list[list[str]] = []

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for rank, spec in enumerate(self._specs):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_process,
                args=(spec, theirs, self._run_loop),
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
        return [proc.pid or 0 for proc in self.procs]

    def send_all(self, message: str) -> None:
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


def _merge_load_reports(reports: Sequence[Mapping[str, Any]]) -> TransferStats:
    """The load of the whole job from every process's report: bytes added, the slowest process's time."""
    nodes: dict[str, Any] = {}
    for report in reports:
        nodes.update(report.get("nodes") or {})
    merged = {
        "action": "checkpoint_load",
        "epoch": reports[0]["epoch"],
        "seconds": max(float(r["seconds"]) for r in reports),
        "bytes": sum(int(r["bytes"]) for r in reports),
        "nodes": nodes,
        "slowest_node": max(nodes, key=lambda n: nodes[n]["seconds"]) if nodes else None,
    }
    return TransferStats.from_report(merged)


def _print_ranks(console: Console, wave: _Wave) -> None:
    facts = _facts()
    for rank, (pid, nodes) in enumerate(zip(wave.pids, wave.nodes)):
        facts.add_row(f"  rank {rank}", f"pid {pid}: {', '.join(nodes)}")
    console.print(facts)


def _commit_seen(
    console: Console, epoch: int, reports: Sequence[Mapping[str, Any]], names: Sequence[str], problems: list[str]
) -> TransferStats:
    """Check every process's save report of ``epoch``, print the epoch's line (from rank 0's report)."""
    for rank, report in enumerate(reports):
        if report.get("epoch") != epoch or sorted(report.get("nodes") or {}) != sorted(names):
            problems.append(
                f"epoch {epoch}: rank {rank}'s save report is of epoch {report.get('epoch')} with nodes "
                f"{sorted(report.get('nodes') or {})}, expected every node of the job"
            )
    stats = TransferStats.from_report(reports[0])
    slowest = f"{stats.slowest_node} ({stats.slowest_seconds:.3f} s)" if stats.slowest_node else "-"
    seen = f"seen by {len(reports)}/{len(reports)}"
    console.print(
        f"  {epoch:>5}  [green]committed[/], {seen}  {stats.seconds:7.3f}  {stats.bytes / 1e6:7.1f}"
        f"  {stats.mb_per_s:5.0f}  {slowest}"
    )
    return stats


def _print_commit_columns(console: Console, processes: int) -> None:
    width = len(f"committed, seen by {processes}/{processes}")
    console.print("[dim]a line once every process saw the epoch committed; stats: rank 0's save report[/]")
    console.print(
        f"  [bold cyan]{'epoch':>5}  {'commit':<{width}}  {'save s':>7}  {'MB':>7}  {'MB/s':>5}  slowest node[/]"
    )


async def run_multiprocess_demo(
    url: str,
    *,
    processes: int,
    run_loop: RunLoop,
    nodes: int = 4,
    epochs: int = 5,
    crash_after: int = 3,
    mib_per_node: float = 8.0,
    storage_options: Mapping[str, Any] | None = None,
    config: TransferConfig | None = None,
    console: Console | None = None,
    timeout: float = 300.0,
) -> DemoResult:
    """:func:`run_demo` with the nodes in ``processes`` spawned OS processes.

    Each worker holds the nodes :func:`~asyncckpt.split_nodes` gives its rank, runs its
    own manager with the run's id (read with :func:`~asyncckpt.job_from_env`, as under a
    launcher) and saves every epoch; an epoch commits through storage alone. After
    ``crash_after`` every worker is killed (SIGKILL). New workers with a new run id
    resume from ``get_resume_from_epoch_id()``, each checks that its nodes hold what was
    saved (recomputed deterministically), and they train to ``epochs``. Then this
    process loads the last epoch with a single-process manager and compares it with an
    uninterrupted run.

    ``run_loop`` runs a worker's coroutine on a new event loop in the worker process
    (the CLI passes its ``run_coroutine``); it must be a module-level function (it is
    pickled by reference). ``storage_options`` must let other processes reach the
    storage (``memory://`` does not work: it lives in one process). Each set of workers
    has ``timeout`` seconds, startup included; a worker's failure, early exit or
    lateness raises :class:`~asyncckpt.CheckpointError` and every worker is killed.
    """
    _validate_job(nodes, epochs, crash_after, mib_per_node)
    if not isinstance(processes, int) or not 1 <= processes <= nodes:
        raise ValueError(f"processes must be between 1 and nodes ({nodes}), got {processes!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    console = console or Console()
    options = dict(storage_options or {})
    config = config or TransferConfig()
    started = time.perf_counter()
    names = node_names(nodes)
    # a worker whose peers died gives up on its own before its wave's deadline
    worker_config = replace(config, commit_timeout=min(config.commit_timeout, timeout))

    def wave(label: str, resume: bool, last_epoch: int) -> _Wave:
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
        return _Wave(f"{label} (run id {run_id})", specs, run_loop, timeout)

    _print_header(console, url, options, config, nodes, epochs, crash_after, mib_per_node, processes)
    async with _within(timeout, "checking that the location is empty"):
        async with MultiNodeCheckpointManager(url, storage_options=options, config=config) as mgr:
            await _require_empty(mgr, url)

    saves: list[TransferStats] = []
    problems: list[str] = []

    # -- run 1: from scratch until the crash -------------------------------------------
    first = wave("run 1", resume=False, last_epoch=crash_after)
    try:
        with console.status(f"starting {processes} worker processes..."):
            first.start()
            await first.expect("ready", "the start-up")
        console.print(f"[bold]{first.label}[/]: {processes} processes start from scratch")
        _print_ranks(console, first)
        _print_commit_columns(console, processes)
        first.send_all("go")
        for epoch in range(crash_after + 1):
            with console.status(f"epoch {epoch}: waiting until every process sees the commit..."):
                seen = await first.expect("saved", f"the commit of epoch {epoch}")
            saves.append(_commit_seen(console, epoch, [m["report"] for m in seen], names, problems))
        killed = first.kill()
    finally:
        first.kill()
    console.print(
        f"[bold yellow]crash![/] (simulated) after epoch {crash_after}: SIGKILL to every worker (pids {killed})"
    )
    console.print()

    # -- run 2: new processes resume ----------------------------------------------------
    second = wave("run 2", resume=True, last_epoch=epochs)
    resume: int | None = None
    load_stats: TransferStats | None = None
    compared_load = 0
    try:
        with console.status(f"starting {processes} new worker processes..."):
            second.start()
            await second.expect("ready", "the start-up")
        console.print(f"[bold]{second.label}[/]: {processes} new processes resume")
        _print_ranks(console, second)
        second.send_all("go")
        with console.status("resuming: get_resume_from_epoch_id, init(retrieve_from_epoch), load..."):
            resumed = await second.expect("resumed", "the resume")
        chosen = sorted({r["epoch"] for r in resumed})
        facts = _facts()
        if len(chosen) != 1:
            problems.append(f"the processes resumed from different epochs: {[r['epoch'] for r in resumed]}")
            facts.add_row("resume epoch", f"[red]the processes disagree: {[r['epoch'] for r in resumed]}[/]")
            console.print(facts)
        else:
            resume = chosen[0]
            if resume != crash_after:
                problems.append(f"get_resume_from_epoch_id() returned {resume}, expected {crash_after}")
            load_stats = _merge_load_reports([r["report"] for r in resumed])
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
            _print_check(
                console,
                f"restored state = state saved at epoch {resume}, in every process",
                compared_load,
                diff,
            )
            console.print()
            _print_commit_columns(console, processes)
            for epoch in range(resume + 1, epochs + 1):
                with console.status(f"epoch {epoch}: waiting until every process sees the commit..."):
                    seen = await second.expect("saved", f"the commit of epoch {epoch}")
                saves.append(_commit_seen(console, epoch, [m["report"] for m in seen], names, problems))
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
            reference = await asyncio.to_thread(_reference_run, nodes, epochs, mib_per_node)
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
        _print_check(
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
    _print_verdict(console, result)
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


async def _require_empty(mgr: MultiNodeCheckpointManager, url: str) -> None:
    existing = await mgr.get_resume_from_epoch_id()
    if existing is not None:
        raise CheckpointConflictError(
            f"{url} already holds checkpoints (latest epoch {existing}); the demo needs an empty location"
        )


def _validate_job(nodes: int, epochs: int, crash_after: int, mib_per_node: float) -> None:
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive int, got {nodes!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(crash_after, int) or not 0 <= crash_after < epochs:
        raise ValueError(f"crash_after must be in [0, epochs) = [0, {epochs}), got {crash_after!r}")
    if not mib_per_node > 0:
        raise ValueError(f"mib_per_node must be positive, got {mib_per_node!r}")


def _print_header(
    console: Console,
    url: str,
    options: Mapping[str, Any],
    config: TransferConfig,
    nodes: int,
    epochs: int,
    crash_after: int,
    mib_per_node: float,
    processes: int = 1,
) -> None:
    console.print(f"[bold]asyncckpt demo[/]: a {nodes}-node training job that crashes and resumes")
    header = _facts()
    header.add_row(
        "job", f"{nodes} nodes × {mib_per_node:g} MiB of weights, {epochs} epochs, crash after epoch {crash_after}"
    )
    if processes > 1:
        header.add_row(
            "processes",
            f"{processes} spawned, one manager each; epochs commit through storage alone",
        )
    header.add_row("location", escape(url))
    if options.get("endpoint_url"):
        header.add_row("endpoint", escape(str(options["endpoint_url"])))
    header.add_row(
        "transfer",
        f"parts of {config.part_size / MiB:g} MiB, checksums {config.checksum_mode}, "
        f"≤ {config.max_concurrency} requests in flight" + (" each" if processes > 1 else ""),
    )
    console.print(header)
    console.print()


def _facts() -> Table:
    """Aligned "label  value" lines."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    return grid


def _relative(full_url: str, root: str) -> str:
    """``full_url`` shown below ``root`` when it is (``epochs/.../x.shard``)."""
    root = root.rstrip("/") + "/"
    return full_url[len(root) :] if full_url.startswith(root) else full_url


def _print_check(console: Console, what: str, compared: int, diff: Sequence[str]) -> None:
    if not diff:
        console.print(f"[green]✓[/] {what}: {compared} blobs equal, bit for bit")
        return
    console.print(f"[red]✗ {what}: {len(diff)} difference(s)[/]")
    for line in diff[:10]:
        console.print(f"    [red]{escape(line)}[/]")
    if len(diff) > 10:
        console.print(f"    [red]... and {len(diff) - 10} more[/]")


def _print_verdict(console: Console, result: DemoResult) -> None:
    save_s = sum(s.seconds for s in result.saves)
    rate = result.bytes_saved / save_s / 1e6 if save_s else 0.0
    console.print()
    console.print(
        f"saved {result.bytes_saved / 1e6:.1f} MB in {len(result.saves)} checkpoints ({save_s:.2f} s, {rate:.0f} MB/s)"
        + (f", loaded {result.load.bytes / 1e6:.1f} MB ({result.load.seconds:.2f} s)" if result.load else "")
    )
    if result.passed:
        where = f" in {result.processes} new processes" if result.processes > 1 else ""
        console.print(
            f"[bold green]PASS[/]  resumed at epoch {result.resumed_from}{where}, "
            f"ended where an uninterrupted run ends ({result.seconds:.1f} s)"
        )
    else:
        console.print(f"[bold red]FAIL[/]  {len(result.problems)} problem(s), see above ({result.seconds:.1f} s)")
