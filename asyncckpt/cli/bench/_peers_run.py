"""The driver of ``asyncckpt bench --peers``: per server, one interleaved run of every peer.

:func:`run_peers` runs, for each server in turn (moto, then localbucket by default), the
same method as :func:`~._run.run_bench`: a fresh server subprocess, the state's digests,
then every op of :data:`~._peers.PEER_OPS` in a fresh child process, the groups
interleaved and their order rotated every repetition, under one time budget shared
evenly among the servers. A peer that is not importable here is skipped with the reason
(the peers live in ``.venv-peers``, which ``make bench-peers`` builds); an asyncckpt
feature missing in this version answers ``unavailable``. Ratios, targets and tables:
:mod:`._peers_report`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from asyncckpt import MiB
from asyncckpt.testing.s3_server import create_bucket

from ._meters import process_rss_mib
from ._peers import PEER_GROUPS, PEER_OPS, missing_requirement
from ._peers_report import add_peer_ratios, evaluate_peer_targets, peer_markdown, render_peers
from ._report import median, summarize
from ._run import SERVER_MALLOC_ENV, Plan, clean_env, machine_info, measure, versions
from ._servers import SERVERS, clear_prefix, make_server, server_unavailable
from ._state import BUCKET, BenchParams

__all__ = ["PEER_PACKAGES", "run_peers"]

#: The peers' distributions, whose versions the result records.
PEER_PACKAGES = (
    "torch",
    "s3fs",
    "fsspec",
    "s3torchconnector",
    "s3torchconnectorclient",
    "torchsnapshot",
    "localbucket",
)


async def run_peers(
    *,
    servers: Sequence[str] = ("moto", "localbucket"),
    params: BenchParams,
    ops: Sequence[str] | None = None,
    out_json: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the peers benchmark (see the module docstring) on each of ``servers``; print
    the tables and targets; return (and write to ``out_json``) every raw measurement,
    per server the medians with their ratios and the fastest/leanest peers, and the targets.

    ``ops`` limits the run to those ops (default: all). Bad arguments raise
    :class:`ValueError`; a server that is not installed is reported, not raised.
    """
    console = console or Console()
    unknown = [s for s in servers if s not in SERVERS]
    if unknown or not servers:
        raise ValueError(f"unknown server(s) {unknown}; known: {', '.join(SERVERS)}")
    selected = list(PEER_OPS) if ops is None else list(ops)
    unknown_ops = [o for o in selected if o not in PEER_OPS]
    if unknown_ops:
        raise ValueError(f"unknown op(s) {unknown_ops}; known: {list(PEER_OPS)}")
    layout = params.layout()
    state_bytes = sum(b.nbytes for b in layout)
    skipped = {group: why for group in PEER_GROUPS if (why := missing_requirement(group)) is not None}
    meta: dict[str, Any] = {
        "state_mib": params.state_mib,
        "state_bytes": state_bytes,
        "nodes": params.nodes,
        "blobs_per_node": params.blobs_per_node,
        "blob_bytes": layout[0].nbytes,
        "reps": params.reps,
        "servers": list(servers),
        "budget_s": params.budget_s,
        "op_timeout_s": params.op_timeout_s,
        "params": asdict(params),
        "skipped_groups": skipped,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "versions": versions(PEER_PACKAGES),
    }
    for group, (status, reason) in skipped.items():
        console.print(f"[yellow]{status}: {', '.join(PEER_GROUPS[group])}: {reason}[/]", highlight=False)
    t_start = time.monotonic()
    parts: dict[str, dict[str, Any]] = {}
    targets: list[dict[str, Any]] = []
    for i, name in enumerate(servers):
        share = (params.budget_s - (time.monotonic() - t_start)) / (len(servers) - i)
        part = await _run_server(name, replace(params, budget_s=max(share, 1.0)), selected, skipped, console)
        parts[name] = part
        if part["status"] == "ok":
            targets += evaluate_peer_targets(part["rows"], part["references"], name)
    meta["elapsed_s"] = time.monotonic() - t_start
    result: dict[str, Any] = {"meta": meta, "servers": parts, "targets": targets}
    result["markdown"] = peer_markdown(result)
    if out_json is not None:  # first, so a broken console never loses the measurements
        await asyncio.to_thread(Path(out_json).write_text, json.dumps(result, indent=2, default=str))
    render_peers(console, result)
    if out_json is not None:
        console.print(f"wrote {out_json}", highlight=False)
    return result


async def _run_server(
    name: str, params: BenchParams, selected: Sequence[str], skipped: dict[str, tuple[str, str]], console: Console
) -> dict[str, Any]:
    """One server's interleaved run: its rows, references, raw runs and meta (or why not)."""
    reason = server_unavailable(name)
    if reason is not None:
        console.print(f"[yellow]{name}: {reason}[/]", highlight=False)
        return {"status": "unavailable", "reason": reason}
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix=f"asyncckpt-bench-{name}-"))
    server = make_server(name, workdir, clean_env(SERVER_MALLOC_ENV if name == "moto" else {}))
    meta: dict[str, Any] = {"server": SERVERS[name], "budget_s": params.budget_s}
    try:
        await asyncio.to_thread(server.start)
        meta["server_pid"] = server.pid
        meta["endpoint"] = server.endpoint_url
        async with server.admin_client() as admin:
            await create_bucket(admin, BUCKET)
            console.print(f"{name} pid {server.pid} on {server.endpoint_url}", highlight=False)
            plan = Plan(PEER_OPS, PEER_GROUPS, lambda prefix: clear_prefix(admin, server, BUCKET, prefix), skipped)
            runs, reps_done, aborted = await measure(server, params, plan, selected, workdir, t_start, meta, console)
        meta["server_rss_mib_end"] = process_rss_mib(server.pid)
    finally:
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(shutil.rmtree, workdir, True)
    meta.update(reps_done=reps_done, aborted=aborted, elapsed_s=time.monotonic() - t_start)
    loads = [r["loadavg_1m"] for r in runs if r.get("loadavg_1m") is not None]
    meta["loadavg_1m_median"] = median(loads)
    cpus = os.cpu_count() or 1
    if loads and meta["loadavg_1m_median"] > 1.5 * cpus:
        meta["busy_warning"] = (
            f"the machine was busy (median 1-min load average {meta['loadavg_1m_median']:.1f} on {cpus} CPUs): "
            "wall times are inflated and noisy; client CPU and RSS are more trustworthy"
        )
    state_bytes = sum(b.nbytes for b in params.layout())
    rows = summarize(runs, state_bytes, PEER_OPS)
    references = add_peer_ratios(rows)
    console.print(f"{name}: done in {meta['elapsed_s']:.0f} s ({state_bytes / MiB:.0f} MiB state)", highlight=False)
    return {"status": "ok", "meta": meta, "rows": rows, "references": references, "runs": runs}
