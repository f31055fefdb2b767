"""From the measurements of ``asyncckpt bench --scale`` to its report: the targets of issue 9
(measured, never asserted), the tables printed, and the same tables as Markdown."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from asyncckpt import MiB

__all__ = [
    "BYTE_TOLERANCE",
    "COMMIT_CPU_LIMIT_S",
    "LINEAR_EXPONENT_LIMIT",
    "MEMORY_SLACK_MIB",
    "evaluate_targets",
    "markdown",
    "render",
    "section_tables",
]

COMMIT_CPU_LIMIT_S = 2.0
#: Two records "read the same bytes" when they differ by at most this much: the manifest
#: carries totals (shard bytes, index size) and a timestamp whose digits vary.
BYTE_TOLERANCE = 16
LINEAR_EXPONENT_LIMIT = 1.2  # requests/epoch ~ P^x: x at most this is "linear"
HANDFUL = 10  # requests of a partial load of half a node
PARTIAL_PER_BLOB_LIMIT = 1.5  # per-blob time at the largest k / at the smallest k
MEMORY_SLACK_MIB = 32

Row = Mapping[str, Any]


def _ok(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.get("status") == "ok"]


def _target(name: str, shown: str, limit: str, met: bool | None, measured: Any = None) -> dict[str, Any]:
    return {"target": name, "measured": measured, "shown": shown, "limit": limit, "met": met}


def evaluate_targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 9's targets, each with what was measured, its limit and whether it is met
    (``met`` is None when its measurements are missing)."""
    targets = _commit_targets(result.get("commit") or {})
    targets += _process_targets(result.get("processes") or {})
    targets += _partial_targets(result.get("partial") or {})
    targets += _memory_targets(result.get("memory") or {})
    return targets


def _commit_targets(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    nodes = section.get("nodes")
    scales = [r for r in _ok(section.get("scales", [])) if r.get("resume_status") == "ok"]
    if not scales:
        return [_target(f"commit + resume CPU < {COMMIT_CPU_LIMIT_S:g} s ({nodes} nodes)", "not measured", "", None)]
    big, small = max(scales, key=lambda r: r["blobs_per_node"]), min(scales, key=lambda r: r["blobs_per_node"])
    together = big["commit_and_resume_cpu_s"]
    out = [
        _target(
            f"commit + resume client CPU, {nodes} nodes x {big['blobs_per_node']} blobs",
            f"{together:.3f} s (commit {big['commit_cpu_s']:.3f} + resume {big['resume_cpu_s']:.3f})",
            f"< {COMMIT_CPU_LIMIT_S:g} s",
            together < COMMIT_CPU_LIMIT_S,
            together,
        )
    ]
    if big is not small:
        pair = f"{small['blobs_per_node']} vs {big['blobs_per_node']} blobs/node"
        diff = abs(big["resume_bytes"] - small["resume_bytes"])
        out.append(
            _target(
                f"resume reads the same bytes at {pair}",
                f"{small['resume_bytes']} B vs {big['resume_bytes']} B ({small['resume_requests']} vs "
                f"{big['resume_requests']} requests)",
                f"equal (± {BYTE_TOLERANCE} B of digits)",
                diff <= BYTE_TOLERANCE and small["resume_requests"] == big["resume_requests"],
                [small["resume_bytes"], big["resume_bytes"]],
            )
        )
        diff = abs(big["listing_bytes_per_epoch"] - small["listing_bytes_per_epoch"])
        out.append(
            _target(
                f"committed_epochs() per epoch at {pair}",
                f"{small['listing_bytes_per_epoch']:.0f} B, {small['listing_requests_per_epoch']:.2f} req vs "
                f"{big['listing_bytes_per_epoch']:.0f} B, {big['listing_requests_per_epoch']:.2f} req",
                f"equal (± {BYTE_TOLERANCE} B of digits)",
                diff <= BYTE_TOLERANCE and small["listing_requests"] == big["listing_requests"],
                [small["listing_bytes_per_epoch"], big["listing_bytes_per_epoch"]],
            )
        )
    return out


def _exponent(lo: Row, hi: Row, field: str) -> float:
    """x in ``field ~ P^x`` between two runs."""
    return math.log(hi[field] / lo[field]) / math.log(hi["processes"] / lo["processes"])


def _process_targets(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    runs = _ok(section.get("runs", []))
    name = "multi-process commit: requests/epoch linear in P"
    if len(runs) < 2:
        return [_target(name, "not measured", "", None)]
    lo, hi = runs[0], runs[-1]
    span = f"P = {lo['processes']}..{hi['processes']}"
    exponent = _exponent(lo, hi, "requests_per_epoch")
    per_process = ", ".join(f"P={r['processes']}: {r['requests_per_epoch_per_process']:.2f}" for r in runs)
    other = _exponent(lo, hi, "other_requests_per_epoch")
    others = ", ".join(f"{r['other_requests_per_epoch']:.0f}" for r in runs)
    return [
        _target(
            f"{name} ({span})",
            f"~P^{exponent:.2f}; requests/(epoch*P) {per_process}",
            f"exponent <= {LINEAR_EXPONENT_LIMIT:g}",
            exponent <= LINEAR_EXPONENT_LIMIT,
            exponent,
        ),
        _target(
            f"multi-process commit: requests/epoch other than polls linear in P ({span})",
            f"~P^{other:.2f} ({others})",
            f"exponent <= {LINEAR_EXPONENT_LIMIT:g}",
            other <= LINEAR_EXPONENT_LIMIT,
            other,
        ),
        _target(
            "collect_request_stats around save counts what the server logged (nested collectors add up)",
            ", ".join(
                f"P={r['processes']}: {r['client_counted_per_epoch']:.1f} of {r['requests_per_epoch']:.1f}"
                for r in runs
            ),
            "equal",
            all(r["client_counted_per_epoch"] == r["requests_per_epoch"] for r in runs),
            [[r["client_counted_per_epoch"], r["requests_per_epoch"]] for r in runs],
        ),
    ]


def _partial_targets(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = _ok(section.get("rows", []))
    full = next((r for r in rows if r["op"] == "full_load"), None)
    blobs = section.get("blobs")
    out: list[dict[str, Any]] = []
    for gap in (None, 0):
        partial = sorted(
            (r for r in rows if r["op"] == "partial_load" and r["coalesce_gap"] == gap), key=lambda r: r["k"]
        )
        if not partial:
            continue
        half, first = partial[-1], partial[0]
        how = "" if gap is None else f", coalesce_gap={gap}"
        if gap is None:
            out.append(
                _target(
                    f"load_blobs_locally of {half['k']} of {blobs} blobs: a handful of requests",
                    f"{half['requests']:.0f} requests",
                    f"<= {HANDFUL}",
                    half["requests"] <= HANDFUL,
                    half["requests"],
                )
            )
            if full is not None:
                ratio = half["wall_s"] / full["wall_s"]
                out.append(
                    _target(
                        f"load_blobs_locally of {half['k']} of {blobs} blobs: no slower than a full load",
                        f"{half['wall_s']:.3f} s vs {full['wall_s']:.3f} s ({ratio:.2f}x)",
                        "<= 1.00x",
                        ratio <= 1.0,
                        ratio,
                    )
                )
        if len(partial) > 1:
            growth = half["wall_ms_per_blob"] / first["wall_ms_per_blob"]
            walls = " / ".join(f"{r['wall_s']:.3f}" for r in partial)
            ks = " / ".join(str(r["k"]) for r in partial)
            out.append(
                _target(
                    f"partial loads linear in k ({ks} blobs{how})",
                    f"{walls} s; per blob {growth:.2f}x at {half['k']} vs {first['k']}",
                    f"per-blob time <= {PARTIAL_PER_BLOB_LIMIT:g}x",
                    growth <= PARTIAL_PER_BLOB_LIMIT,
                    growth,
                )
            )
    return out or [_target(f"partial load of {blobs} blobs", "not measured", "", None)]


def _memory_targets(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row in section.get("rows", []):
        name = f"extra RSS of a save of {row['label']}"
        if row.get("status") != "ok":
            out.append(_target(name, str(row.get("status")), "", None))
            continue
        limit = row["max_bytes_in_flight"] / MiB + MEMORY_SLACK_MIB
        out.append(
            _target(
                name,
                f"{row['extra_rss_mib']:.0f} MiB ({row['extra_rss_mib'] / limit:.2f}x)",
                f"<= {limit:.0f} MiB (max_bytes_in_flight + {MEMORY_SLACK_MIB})",
                row["extra_rss_mib"] <= limit,
                row["extra_rss_mib"],
            )
        )
    return out


# ---------------------------------------------------------------------- tables


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def section_tables(result: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every section as (title, columns, rows of cells): what :func:`render` and
    :func:`markdown` show."""
    tables = []
    commit = result.get("commit") or {}
    if commit:
        cols = [
            "blobs/node",
            "commit CPU s",
            "resume CPU s",
            "together s",
            "resume requests",
            "resume bytes",
            "committed_epochs B/epoch",
            "req/epoch",
            "index B",
            "manifest B",
            "upload s",
        ]
        rows = []
        for r in commit.get("scales", []):
            if r.get("status") != "ok" or r.get("resume_status") != "ok":
                rows.append([str(r["blobs_per_node"]), f"{r.get('status')}: {r.get('error')}"] + [""] * (len(cols) - 2))
                continue
            rows.append(
                [
                    str(r["blobs_per_node"]),
                    _fmt(r["commit_cpu_s"]),
                    _fmt(r["resume_cpu_s"]),
                    _fmt(r["commit_and_resume_cpu_s"]),
                    str(r["resume_requests"]),
                    str(r["resume_bytes"]),
                    _fmt(r["listing_bytes_per_epoch"], ".0f"),
                    _fmt(r["listing_requests_per_epoch"], ".2f"),
                    str(r["index_bytes"]),
                    str(r["manifest_bytes"]),
                    _fmt(r["upload_wall_s"], ".1f"),
                ]
            )
        title = (
            f"1. commit record: {commit['nodes']} nodes, {commit['epochs']} epochs (client CPU; server-logged bytes)"
        )
        tables.append((title, cols, rows))
    processes = result.get("processes") or {}
    if processes:
        cols = [
            "P",
            "requests/epoch",
            "requests/(epoch*P)",
            "of which polls/epoch",
            "other/epoch",
            "response KB/epoch",
            "client-counted/epoch",
            "save s",
        ]
        rows = []
        for r in processes.get("runs", []):
            if r.get("status") != "ok":
                rows.append([str(r["processes"]), f"{r.get('status')}: {r.get('error')}"] + [""] * (len(cols) - 2))
                continue
            rows.append(
                [
                    str(r["processes"]),
                    _fmt(r["requests_per_epoch"], ".1f"),
                    _fmt(r["requests_per_epoch_per_process"], ".2f"),
                    _fmt(r["poll_requests_per_epoch"], ".1f"),
                    _fmt(r["other_requests_per_epoch"], ".1f"),
                    _fmt(r["response_bytes_per_epoch"] / 1000, ".1f"),
                    _fmt(r["client_counted_per_epoch"], ".1f"),
                    _fmt(r["save_wall_s_median"], ".2f"),
                ]
            )
        title = f"2. multi-process commit: one node per process, {processes['epochs']} epochs (server log)"
        tables.append((title, cols, rows))
    partial = result.get("partial") or {}
    if partial:
        cols = ["operation", "blobs", "wall s", "ms/blob", "client CPU s", "moto CPU s", "requests", "response MB"]
        rows = []
        for r in partial.get("rows", []):
            label = "load (all)" if r["op"] == "full_load" else "load_blobs_locally"
            if r.get("coalesce_gap") is not None:
                label += f", coalesce_gap={r['coalesce_gap']}"
            if r.get("status") != "ok":
                rows.append([label, str(r["k"]), f"{r.get('status')}: {r.get('error')}"] + [""] * (len(cols) - 3))
                continue
            rows.append(
                [
                    label,
                    str(r["k"]),
                    _fmt(r["wall_s"]),
                    _fmt(r["wall_ms_per_blob"], ".4f"),
                    _fmt(r["cpu_s"], ".2f"),
                    _fmt(r["server_cpu_s"], ".2f"),
                    _fmt(r["requests"], ".0f"),
                    _fmt(r["response_bytes"] / 1e6, ".1f"),
                ]
            )
        title = (
            f"3. partial loads: one node of {partial['blobs']} blobs of {partial['blob_bytes']} B "
            "(k blobs spread evenly; medians)"
        )
        tables.append((title, cols, rows))
    memory = result.get("memory") or {}
    if memory:
        cols = ["save of", "extra RSS MiB", "target MiB", "ratio", "RSS before MiB", "wall s", "requests"]
        rows = []
        for r in memory.get("rows", []):
            if r.get("status") != "ok":
                rows.append([r["label"], f"{r.get('status')}: {r.get('error')}"] + [""] * (len(cols) - 2))
                continue
            limit = r["max_bytes_in_flight"] / MiB + MEMORY_SLACK_MIB
            rows.append(
                [
                    r["label"],
                    _fmt(r["extra_rss_mib"], ".0f"),
                    _fmt(limit, ".0f"),
                    _fmt(r["extra_rss_mib"] / limit, ".2f"),
                    _fmt(r["rss_before_mib"], ".0f"),
                    _fmt(r["wall_s"], ".2f"),
                    str(r["requests"]),
                ]
            )
        title = f"4. memory: save of {memory['nodes']} nodes, default max_bytes_in_flight (VmHWM - RSS before)"
        tables.append((title, cols, rows))
    return tables


def _status(target: Mapping[str, Any]) -> str:
    return {True: "met", False: "NOT met", None: "n/a"}[target["met"]]


def render(console: Console, result: Mapping[str, Any]) -> None:
    """Print every section's table, then the targets."""
    for title, cols, rows in section_tables(result):
        table = Table(title=title)
        for i, col in enumerate(cols):
            table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
        for cells in rows:
            table.add_row(*cells)
        console.print(table)
    targets = Table(title="issue 9 targets (measured, not asserted)")
    for col in ("target", "measured", "limit", "status"):
        targets.add_column(col, overflow="fold")
    for t in result.get("targets", []):
        style = "green" if t["met"] else ("red" if t["met"] is False else "yellow")
        targets.add_row(t["target"], t["shown"], t["limit"], f"[{style}]{_status(t)}[/]")
    console.print(targets)
    meta = result.get("meta", {})
    if meta.get("aborted"):
        console.print(f"[yellow]stopped early: {meta['aborted']}[/]")
    if "elapsed_s" in meta:
        console.print(f"elapsed {meta['elapsed_s']:.0f} s", highlight=False)


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(result: Mapping[str, Any]) -> str:
    """The tables and the targets as Markdown (for the README)."""
    parts = []
    for title, cols, rows in section_tables(result):
        parts.append(f"{title}\n\n{_line(cols)}\n{_line(['---'] * len(cols))}\n" + "\n".join(_line(r) for r in rows))
    targets = [_line([t["target"], t["shown"], t["limit"], _status(t)]) for t in result.get("targets", [])]
    cols = ["target", "measured", "limit", "status"]
    parts.append(f"{_line(cols)}\n{_line(['---'] * len(cols))}\n" + "\n".join(targets))
    return "\n\n".join(parts) + "\n"
