"""The demo in one process: a simulated multi-node training job that checkpoints, crashes and resumes.

:func:`run_demo` is what ``asyncckpt demo`` runs. Every node holds the state of a small
model (:mod:`._model`); each epoch updates every array deterministically and saves a
checkpoint (epoch 0 is the state right after initialisation, as in caffe2).

After epoch ``crash_after`` the job "crashes": the manager and every workspace are
dropped. A new manager then finds the epoch to resume from, loads it into empty
workspaces, and the demo checks that every blob equals what was saved, bit for bit.
Training continues to ``epochs``, and the final state must equal an uninterrupted
run computed in memory. The caller owns the event loop.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape

from asyncckpt import CheckpointConflictError, MultiNodeCheckpointManager, TransferConfig

from .._options import node_names
from ._model import Workspace, compare_workspaces, init_all, reference_run, train_all
from ._render import (
    DemoResult,
    TransferStats,
    add_epoch_row,
    epoch_table,
    facts_grid,
    print_check,
    print_header,
    print_verdict,
    relative_url,
)

__all__ = ["require_empty", "run_demo", "validate_job"]


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
    validate_job(nodes, epochs, crash_after, mib_per_node)
    console = console or Console()
    options = dict(storage_options or {})
    config = config or TransferConfig()
    started = time.perf_counter()
    names = node_names(nodes)

    print_header(console, url, options, config, nodes, epochs, crash_after, mib_per_node)

    saves: list[TransferStats] = []
    problems: list[str] = []

    # -- run 1: from scratch until the crash -------------------------------------------
    async with MultiNodeCheckpointManager(url, storage_options=options, config=config) as mgr:
        await require_empty(mgr, url)
        workspaces = await asyncio.to_thread(init_all, nodes, mib_per_node)
        await mgr.init(workspaces)
        table = epoch_table(f"run 1 (run id {mgr.run_id}): from scratch")
        for epoch in range(crash_after + 1):
            if epoch:
                await train_all(workspaces)
            stats = await _save_epoch(mgr, epoch, console)
            saves.append(stats)
            add_epoch_row(table, stats)
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
        facts = facts_grid()
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
            facts.add_row("a shard", f"[dim]{escape(relative_url(shard_url, url))}[/]")
            console.print(facts)
            compared_load, diff = await asyncio.to_thread(compare_workspaces, saved_at_crash, restored)
            problems.extend(f"after load of epoch {resume}: {d}" for d in diff)
            print_check(console, f"restored state = state saved at epoch {crash_after}", compared_load, diff)
            table = epoch_table(f"run 2 (run id {mgr.run_id}): training continues")
            console.print()
            for epoch in range(resume + 1, epochs + 1):
                await train_all(restored)
                stats = await _save_epoch(mgr, epoch, console)
                saves.append(stats)
                add_epoch_row(table, stats)
            if table.row_count:
                console.print(table)
    del saved_at_crash

    # -- the verdict ---------------------------------------------------------------------
    with console.status("computing the uninterrupted reference run..."):
        reference = await asyncio.to_thread(reference_run, nodes, epochs, mib_per_node)
    compared_final, diff = await asyncio.to_thread(compare_workspaces, reference, restored)
    problems.extend(f"final state: {d}" for d in diff)
    print_check(console, f"final state = an uninterrupted {epochs}-epoch run", compared_final, diff)

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
    print_verdict(console, result)
    return result


async def require_empty(mgr: MultiNodeCheckpointManager, url: str) -> None:
    existing = await mgr.get_resume_from_epoch_id()
    if existing is not None:
        raise CheckpointConflictError(
            f"{url} already holds checkpoints (latest epoch {existing}); the demo needs an empty location"
        )


def validate_job(nodes: int, epochs: int, crash_after: int, mib_per_node: float) -> None:
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive int, got {nodes!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(crash_after, int) or not 0 <= crash_after < epochs:
        raise ValueError(f"crash_after must be in [0, epochs) = [0, {epochs}), got {crash_after!r}")
    if not mib_per_node > 0:
        raise ValueError(f"mib_per_node must be positive, got {mib_per_node!r}")
