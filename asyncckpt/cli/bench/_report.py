"""From raw measurements to the report: per-op medians, ratios to the baselines, the
targets (measured, never asserted), and the table printed and written as Markdown."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from asyncckpt import MiB

from ._state import OPS, OpSpec

__all__ = [
    "TABLE_COLUMNS",
    "add_ratios",
    "evaluate_targets",
    "markdown_table",
    "median",
    "render",
    "summarize",
    "table_rows",
]


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are numbers (None and NaN left out); None when there are none."""
    numbers = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(numbers) if numbers else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(
    runs: Sequence[Mapping[str, Any]], state_bytes: int, ops: Mapping[str, OpSpec] = OPS
) -> dict[str, dict[str, Any]]:
    """Per op of ``ops``: medians over the successful runs (and min/max wall)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, spec in ops.items():
        mine = [r for r in runs if r.get("op") == name]
        ok = [r for r in mine if r.get("status") == "ok"]
        row: dict[str, Any] = {
            "op": name,
            "label": spec.label,
            "peer": spec.peer,
            "kind": spec.kind,
            "state": spec.state,
            "n": len(ok),
            "attempts": len(mine),
            "status": "ok" if ok else (mine[-1].get("status", "missing") if mine else "not run"),
        }
        if not ok:
            reasons = [r.get("reason") or r.get("error") for r in mine if r.get("reason") or r.get("error")]
            row["reason"] = reasons[-1] if reasons else None
            rows[name] = row
            continue
        walls = [r["wall_s"] for r in ok]
        nbytes = ok[0].get("bytes") or state_bytes
        wall = median(walls)
        cpu = median([r["cpu_s"] for r in ok])
        row.update(
            bytes=nbytes,
            wall_s=wall,
            wall_min_s=min(walls),
            wall_max_s=max(walls),
            mb_s=nbytes / wall / 1e6 if wall is not None else None,
            cpu_s=cpu,
            cpu_s_per_gb=cpu / (nbytes / 1e9) if cpu is not None else None,
            cpu_user_s=median([r.get("cpu_user_s") for r in ok]),
            cpu_sys_s=median([r.get("cpu_sys_s") for r in ok]),
            page_faults=median([r.get("page_faults") for r in ok]),
            peak_rss_mib=median([r["peak_rss_mib"] for r in ok]),
            rss_before_mib=median([r["rss_before_mib"] for r in ok]),
            rss_delta_mib=median([r["peak_rss_mib"] - r["rss_before_mib"] for r in ok]),
            rss_libs_mib=median([r.get("rss_libs_mib") for r in ok]),
            server_cpu_s=median([r.get("server_cpu_s") for r in ok]),
            requests=median([(r.get("requests") or {}).get("total") for r in ok]),
        )
        if name == "memcpy":
            row["warm_copyto_s"] = median([r.get("warm_copyto_s") for r in ok])
        blocking = [r["laps"]["blocking"] for r in ok if "blocking" in r.get("laps", {})]
        if blocking:  # save_async, DCP async_save: until the call returned
            row["blocking_s"] = median([b["wall_s"] for b in blocking])
            row["blocking_cpu_s"] = median([b["cpu_s"] for b in blocking])
        if any(r.get("second_blocking_s") is not None for r in ok):
            row["second_blocking_s"] = median([r.get("second_blocking_s") for r in ok])
            row["second_total_s"] = median([r.get("second_total_s") for r in ok])
        if any(r.get("in_place") is not None for r in ok):
            row["in_place"] = all(r.get("in_place") for r in ok)
        if name in ("ckpt_load", "ckpt_partial"):
            row["received_bytes"] = median([r.get("received_bytes") for r in ok])
        if name == "ckpt_partial":
            row["requested_bytes"] = ok[0].get("requested_bytes")
            row["report_bytes"] = ok[0].get("report_bytes")
            row["blobs"] = ok[0].get("blobs")
        rows[name] = row
    return rows


_BASELINES = {"save": ("aio_save", "s3t_save"), "load": ("aio_load", "s3t_load")}


def add_ratios(rows: dict[str, dict[str, Any]], runs: Sequence[Mapping[str, Any]]) -> None:
    """Ratio fields of every row: wall and client CPU vs bare aioboto3 and vs s3transfer
    (medians' ratio, and the median of the per-repetition paired ratios)."""
    for name, row in rows.items():
        base = _BASELINES.get(row["kind"])
        for peer in ("aio", "s3t"):
            for metric in ("wall", "cpu"):
                key = f"{metric}_vs_{peer}"
                row[key] = None
                row[key + "_paired"] = None
                if base is None or row.get("n", 0) == 0:
                    continue
                ref_name = base[0] if peer == "aio" else base[1]
                ref = rows.get(ref_name, {})
                field = "wall_s" if metric == "wall" else "cpu_s_per_gb"
                row[key] = _ratio(row.get(field), ref.get(field))
                row[key + "_paired"] = _paired_ratio(runs, name, ref_name, metric)


def _per_gb(r: Mapping[str, Any]) -> float | None:
    return r["cpu_s"] / (r["bytes"] / 1e9) if r.get("bytes") else None


def _paired_ratio(runs: Sequence[Mapping[str, Any]], op: str, ref: str, metric: str) -> float | None:
    by_rep: dict[int, dict[str, Mapping[str, Any]]] = {}
    for r in runs:
        if r.get("status") == "ok":
            by_rep.setdefault(int(r.get("rep", 0)), {})[r["op"]] = r
    ratios = []
    for rep in by_rep.values():
        if op in rep and ref in rep:
            a, b = (
                (rep[op]["wall_s"], rep[ref]["wall_s"]) if metric == "wall" else (_per_gb(rep[op]), _per_gb(rep[ref]))
            )
            if a is not None and b:
                ratios.append(a / b)
    return median(ratios)


def evaluate_targets(rows: Mapping[str, Mapping[str, Any]], state_bytes: int) -> list[dict[str, Any]]:
    """The issue's targets, as measured ratios (never assertions)."""

    def get(op: str, field: str) -> float | None:
        return rows.get(op, {}).get(field)

    state_mib = state_bytes / MiB
    rss_limit = state_mib + 256
    partial_moved = get("ckpt_partial", "received_bytes")
    partial_requested = get("ckpt_partial", "requested_bytes")
    targets = [
        (
            "save wall <= 1.05x bare aioboto3 multipart",
            _ratio(get("ckpt_save", "wall_s"), get("aio_save", "wall_s")),
            1.05,
            "x",
        ),
        ("save wall <= 0.8x s3transfer", _ratio(get("ckpt_save", "wall_s"), get("s3t_save", "wall_s")), 0.8, "x"),
        (
            "load wall <= 0.8x bare aioboto3 get_object+read()",
            _ratio(get("ckpt_load", "wall_s"), get("aio_load", "wall_s")),
            0.8,
            "x",
        ),
        (
            "save client CPU s/GB <= 0.5x bare aioboto3",
            _ratio(get("ckpt_save", "cpu_s_per_gb"), get("aio_save", "cpu_s_per_gb")),
            0.5,
            "x",
        ),
        (
            "load client CPU s/GB <= 0.5x bare aioboto3",
            _ratio(get("ckpt_load", "cpu_s_per_gb"), get("aio_load", "cpu_s_per_gb")),
            0.5,
            "x",
        ),
        (
            "save_async blocking <= 1.5x numpy copy",
            _ratio(get("ckpt_save_async", "blocking_s"), get("memcpy", "wall_s")),
            1.5,
            "x",
        ),
        (
            f"peak RSS during save <= state + 256 MiB ({rss_limit:.0f} MiB)",
            get("ckpt_save", "peak_rss_mib"),
            rss_limit,
            "MiB",
        ),
        (
            f"peak RSS during load <= state + 256 MiB ({rss_limit:.0f} MiB)",
            get("ckpt_load", "peak_rss_mib"),
            rss_limit,
            "MiB",
        ),
        ("partial load (10% of blobs) moves <= 1.05x their bytes", _ratio(partial_moved, partial_requested), 1.05, "x"),
    ]
    out = []
    for name, value, limit, unit in targets:
        out.append(
            {
                "target": name,
                "measured": value,
                "limit": limit,
                "unit": unit,
                "met": None if value is None else bool(value <= limit),
            }
        )
    return out


# ---------------------------------------------------------------------------- output


def _fmt(value: Any, spec: str = ".2f", none: str = "n/a") -> str:
    if value is None:
        return none
    return format(value, spec)


TABLE_COLUMNS = [
    "op",
    "n",
    "wall s (min-max)",
    "MB/s",
    "CPU s",
    "CPU s/GB",
    "peak RSS MiB",
    "RSS Δ MiB",
    "server CPU s",
    "reqs",
    "wall ×aio",
    "wall ×s3t",
    "CPU/GB ×aio",
    "CPU/GB ×s3t",
]


def table_rows(rows: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The table's cells (:data:`TABLE_COLUMNS`), one list per line, in :data:`~._state.OPS` order."""
    out = []
    for name in OPS:
        row = rows.get(name)
        if row is None:
            continue
        label = f"{name}: {row['label']}"
        if not row.get("n"):
            out.append([label, "0", row.get("status", "n/a")] + ["n/a"] * (len(TABLE_COLUMNS) - 3))
            continue
        wall = f"{row['wall_s']:.3f} ({row['wall_min_s']:.2f}-{row['wall_max_s']:.2f})"
        cells = [
            label,
            str(row["n"]),
            wall,
            _fmt(row["mb_s"], ".0f"),
            _fmt(row["cpu_s"]),
            _fmt(row["cpu_s_per_gb"]),
            _fmt(row["peak_rss_mib"], ".0f"),
            _fmt(row["rss_delta_mib"], "+.0f"),
            _fmt(row["server_cpu_s"]),
            _fmt(row["requests"], ".0f"),
            _fmt(row.get("wall_vs_aio"), none="—"),
            _fmt(row.get("wall_vs_s3t"), none="—"),
            _fmt(row.get("cpu_vs_aio"), none="—"),
            _fmt(row.get("cpu_vs_s3t"), none="—"),
        ]
        out.append(cells)
        if name == "ckpt_save_async" and row.get("blocking_s") is not None:
            out.append(
                [
                    f"{name}: blocking (until save_async returns)",
                    str(row["n"]),
                    f"{row['blocking_s']:.3f}",
                    "",
                    _fmt(row["blocking_cpu_s"]),
                ]
                + [""] * (len(TABLE_COLUMNS) - 5)
            )
        if name == "ckpt_save_async" and row.get("second_blocking_s") is not None:
            out.append(
                [f"{name}: 2nd save_async in the process, blocking", str(row["n"]), f"{row['second_blocking_s']:.3f}"]
                + [""] * (len(TABLE_COLUMNS) - 3)
            )
            out.append(
                [f"{name}: 2nd save_async in the process, total", str(row["n"]), f"{row['second_total_s']:.3f}",
                 _fmt(row["bytes"] / row["second_total_s"] / 1e6, ".0f")]
                + [""] * (len(TABLE_COLUMNS) - 4)
            )  # fmt: skip
        if name == "memcpy" and row.get("warm_copyto_s") is not None:
            warm = row["warm_copyto_s"]
            out.append(
                [
                    "memcpy: warm np.copyto (reference)",
                    str(row["n"]),
                    f"{warm:.3f}",
                    _fmt(row["bytes"] / warm / 1e6, ".0f"),
                ]
                + [""] * (len(TABLE_COLUMNS) - 4)
            )
    return out


def markdown_table(rows: Mapping[str, Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> str:
    """The table and the targets as Markdown."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {_target_value(t)} | {_target_limit(t)} | {_target_status(t)} |")
    return "\n".join(lines)


def _target_value(t: Mapping[str, Any]) -> str:
    if t["measured"] is None:
        return "n/a"
    return f"{t['measured']:.0f} MiB" if t["unit"] == "MiB" else f"{t['measured']:.2f}x"


def _target_limit(t: Mapping[str, Any]) -> str:
    return f"{t['limit']:.0f} MiB" if t["unit"] == "MiB" else f"{t['limit']:.2f}x"


def _target_status(t: Mapping[str, Any]) -> str:
    return "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")


def render(console: Console, result: Mapping[str, Any]) -> None:
    """Print :func:`~._run.run_bench`'s result: the table of ops, the targets, and any warning."""
    meta = result["meta"]
    rows = result["rows"]
    title = (
        f"asyncckpt bench: {meta['state_mib']:g} MiB state ({meta['state_bytes'] / 1e6:.1f} MB), "
        f"{meta['nodes']} nodes x {meta['blobs_per_node']} blobs, moto on 127.0.0.1, "
        f"medians of {meta['reps_done']}/{meta['reps']} reps"
    )
    table = Table(title=title, show_lines=False)
    for i, col in enumerate(TABLE_COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for cells in table_rows(rows):
        table.add_row(*cells)
    console.print(table)
    console.print(
        "ratios: wall and client CPU s/GB of each save vs aio_save / s3t_save and of each load vs aio_load / "
        "s3t_load (ratio of medians). Peak RSS: VmHWM during the op (absolute); RSS Δ: peak minus RSS just "
        "before the op. Server CPU: moto's CPU during the op.",
        highlight=False,
    )
    targets = Table(title="targets (measured, not asserted)")
    for col in ("target", "measured", "limit", "status"):
        targets.add_column(col)
    for t in result["targets"]:
        status = _target_status(t)
        style = "green" if t["met"] else ("red" if t["met"] is False else "yellow")
        targets.add_row(t["target"], _target_value(t), _target_limit(t), f"[{style}]{status}[/]")
    console.print(targets)
    if meta.get("aborted"):
        console.print(f"[yellow]stopped early: {meta['aborted']}[/]")
    if meta.get("busy_warning"):
        console.print(f"[yellow]warning: {meta['busy_warning']}[/]")
