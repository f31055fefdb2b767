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
run computed in memory. Nothing here calls ``asyncio.run``: the CLI owns the loop.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import MiB, TransferConfig
from .errors import CheckpointConflictError
from .manager import MultiNodeCheckpointManager

__all__ = ["DemoResult", "TransferStats", "run_demo", "init_workspace", "train_epoch", "node_names"]

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


def _reference_run(nodes: int, epochs: int, mib_per_node: float) -> dict[str, Workspace]:
    """The uninterrupted job, in memory: the state every node must end with."""
    workspaces = _init_all(nodes, mib_per_node)
    for ws in workspaces.values():
        for _ in range(epochs):
            train_epoch(ws)
    return workspaces


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
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive int, got {nodes!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(crash_after, int) or not 0 <= crash_after < epochs:
        raise ValueError(f"crash_after must be in [0, epochs) = [0, {epochs}), got {crash_after!r}")
    if not mib_per_node > 0:
        raise ValueError(f"mib_per_node must be positive, got {mib_per_node!r}")
    console = console or Console()
    options = dict(storage_options or {})
    config = config or TransferConfig()
    started = time.perf_counter()
    names = node_names(nodes)

    console.print(f"[bold]asyncckpt demo[/]: a {nodes}-node training job that crashes and resumes")
    header = _facts()
    header.add_row("job", f"{nodes} nodes × {mib_per_node:g} MiB of weights, {epochs} epochs, crash after epoch {crash_after}")
    header.add_row("location", escape(url))
    if options.get("endpoint_url"):
        header.add_row("endpoint", escape(str(options["endpoint_url"])))
    header.add_row(
        "transfer",
        f"parts of {config.part_size / MiB:g} MiB, checksums {config.checksum_mode}, "
        f"≤ {config.max_concurrency} requests in flight",
    )
    console.print(header)
    console.print()

    saves: list[TransferStats] = []
    problems: list[str] = []

    # -- run 1: from scratch until the crash -------------------------------------------
    async with MultiNodeCheckpointManager(url, storage_options=options, config=config) as mgr:
        existing = await mgr.get_resume_from_epoch_id()
        if existing is not None:
            raise CheckpointConflictError(
                f"{url} already holds checkpoints (latest epoch {existing}); the demo needs an empty location"
            )
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
        console.print(
            f"[bold green]PASS[/]  resumed at epoch {result.resumed_from}, "
            f"ended where an uninterrupted run ends ({result.seconds:.1f} s)"
        )
    else:
        console.print(f"[bold red]FAIL[/]  {len(result.problems)} problem(s), see above ({result.seconds:.1f} s)")
