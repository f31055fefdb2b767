"""The report of ``asyncckpt bench --peers``: ratios to the fastest and the leanest peer,
issue 12's targets (measured, never asserted), a table per server and the Markdown.

Within one server's run, for saves and for loads apart: the *fastest* peer is the one
with the lowest median wall time, the *leanest* the one with the lowest median client
CPU (and, for RSS, the lowest median extra RSS). Peers are every other library's op
(:func:`~._peers.is_peer`; DCP ``async_save`` counts by its total time); asyncckpt's
rows and the ``memcpy`` reference are compared, not compared against. Every row carries
its ratios (``wall_x_fastest``, ``cpu_x_leanest``, ``rss_x_leanest``); the targets are
read on asyncckpt's rows for numpy state and for the same state as torch tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from ._peers import PEER_OPS, is_peer

__all__ = [
    "PEER_TABLE_COLUMNS",
    "add_peer_ratios",
    "evaluate_peer_targets",
    "peer_markdown",
    "peer_table_rows",
    "render_peers",
]

_FLAVOURS = {"numpy": "ckpt", "torch": "ckpt_torch"}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _best(rows: Sequence[Mapping[str, Any]], field: str) -> Mapping[str, Any] | None:
    measured = [r for r in rows if r.get(field) is not None]
    return min(measured, key=lambda r: r[field]) if measured else None


def add_peer_ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Give every save and load row its ratios to the fastest and the leanest peer of its
    kind; return those peers per kind (``{"save": {"fastest": op, "wall_s": ...}}``)."""
    references: dict[str, dict[str, Any]] = {}
    for kind in ("save", "load"):
        peers = [r for r in rows.values() if r["kind"] == kind and r.get("n") and is_peer(PEER_OPS[r["op"]])]
        fastest, lean_cpu, lean_rss = _best(peers, "wall_s"), _best(peers, "cpu_s"), _best(peers, "rss_delta_mib")
        references[kind] = {
            "fastest": fastest and fastest["op"],
            "wall_s": fastest and fastest["wall_s"],
            "leanest_cpu": lean_cpu and lean_cpu["op"],
            "cpu_s": lean_cpu and lean_cpu["cpu_s"],
            "leanest_rss": lean_rss and lean_rss["op"],
            "rss_delta_mib": lean_rss and lean_rss["rss_delta_mib"],
        }
        for row in rows.values():
            if row["kind"] == kind:
                ref = references[kind]
                row["wall_x_fastest"] = _ratio(row.get("wall_s"), ref["wall_s"])
                row["cpu_x_leanest"] = _ratio(row.get("cpu_s"), ref["cpu_s"])
                row["rss_x_leanest"] = _ratio(row.get("rss_delta_mib"), ref["rss_delta_mib"])
    return references


def evaluate_peer_targets(
    rows: Mapping[str, Mapping[str, Any]], references: Mapping[str, Mapping[str, Any]], server: str
) -> list[dict[str, Any]]:
    """Issue 12's targets on one server's rows, for numpy state and for torch tensors:
    each with the measured value (a ratio, or MiB), the limit, ``met`` (None when a row
    was not measured) and which rows it compares."""

    def get(op: str, field: str) -> float | None:
        return rows.get(op, {}).get(field)

    load_limit = 1.0 if server == "moto" else 0.8
    save_ref, load_ref = references["save"], references["load"]
    dcp_blocking = get("dcp_async_save", "blocking_s")
    warm_copy = get("memcpy", "warm_copyto_s")
    out = []
    for flavour, peer in _FLAVOURS.items():
        save, load, inplace, save_async = (
            f"{peer}_save",
            f"{peer}_load",
            f"{peer}_inplace_load",
            f"{peer}_save_async",
        )
        targets = [
            (
                "save wall <= 0.8x fastest peer",
                get(save, "wall_x_fastest"),
                0.8,
                "x",
                f"{save} / {save_ref['fastest']}",
            ),
            (
                "load wall <= 0.8x fastest peer (moto: 1.0x)",
                get(load, "wall_x_fastest"),
                load_limit,
                "x",
                f"{load} / {load_ref['fastest']}",
            ),
            (
                "save client CPU <= 0.6x leanest peer",
                get(save, "cpu_x_leanest"),
                0.6,
                "x",
                f"{save} / {save_ref['leanest_cpu']}",
            ),
            (
                "load client CPU <= 0.6x leanest peer",
                get(load, "cpu_x_leanest"),
                0.6,
                "x",
                f"{load} / {load_ref['leanest_cpu']}",
            ),
            ("save extra RSS <= 64 MiB", get(save, "rss_delta_mib"), 64.0, "MiB", save),
            ("in-place load extra RSS <= 32 MiB", get(inplace, "rss_delta_mib"), 32.0, "MiB", inplace),
            (
                "save_async blocking <= 0.5x DCP async_save's",
                _ratio(get(save_async, "blocking_s"), dcp_blocking),
                0.5,
                "x",
                f"{save_async} / dcp_async_save (blocking)",
            ),
            (
                "2nd save_async blocking <= 1.5x a warm copy",
                _ratio(get(save_async, "second_blocking_s"), warm_copy),
                1.5,
                "x",
                f"{save_async} (2nd in the process) / memcpy warm np.copyto",
            ),
        ]
        for name, value, limit, unit, compares in targets:
            out.append(
                {
                    "target": name,
                    "state": flavour,
                    "server": server,
                    "measured": value,
                    "limit": limit,
                    "unit": unit,
                    "compares": compares,
                    "met": None if value is None else bool(value <= limit),
                }
            )
    return out


# ---------------------------------------------------------------------------- output

PEER_TABLE_COLUMNS = [
    "op",
    "state",
    "n",
    "wall s",
    "MB/s",
    "CPU s",
    "+RSS",
    "srv CPU",
    "reqs",
    "×fast",
    "CPU×lean",
    "RSS×lean",
]
_LEGEND = (
    "wall s: median wall time; CPU s: client CPU (user+sys); +RSS: extra RSS in MiB (peak VmHWM minus RSS before "
    "the op); srv CPU: the server's CPU s; reqs: requests the server logged; ×fast: wall / the fastest peer's; "
    "CPU×lean, RSS×lean: / the leanest peer's (saves against saves, loads against loads)."
)


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def peer_table_rows(rows: Mapping[str, Mapping[str, Any]]) -> tuple[list[list[str]], list[str]]:
    """The cells of one server's table (:data:`PEER_TABLE_COLUMNS`) in :data:`~._peers.PEER_OPS`
    order, and the notes its cells refer to (why a row was not measured)."""
    out: list[list[str]] = []
    notes: list[str] = []
    blank = [""] * (len(PEER_TABLE_COLUMNS) - 4)
    for name in PEER_OPS:
        row = rows.get(name)
        if row is None:
            continue
        if not row.get("n"):
            notes.append(f"{name}: {row.get('status')}: {row.get('reason') or 'no successful run'}")
            status = "n/a" if row.get("status") == "unavailable" else row.get("status")
            out.append([row["label"], row["state"], "0", f"{status} ({len(notes)})"] + blank)
            continue
        out.append(
            [
                row["label"],
                row["state"],
                str(row["n"]),
                f"{row['wall_s']:.3f}",
                _fmt(row["mb_s"], ".0f"),
                _fmt(row["cpu_s"]),
                _fmt(row["rss_delta_mib"], "+.0f"),
                _fmt(row["server_cpu_s"]),
                _fmt(row["requests"], ".0f"),
                _fmt(row.get("wall_x_fastest")),
                _fmt(row.get("cpu_x_leanest")),
                _fmt(row.get("rss_x_leanest")),
            ]
        )
        if row.get("blocking_s") is not None:
            out.append(["  ↳ blocking (until returned)", "", str(row["n"]), f"{row['blocking_s']:.3f}"] + blank)
        if row.get("second_blocking_s") is not None:
            out.append(["  ↳ blocking, 2nd save", "", str(row["n"]), f"{row['second_blocking_s']:.3f}"] + blank)
        if name == "memcpy" and row.get("warm_copyto_s") is not None:
            out.append(["  ↳ warm np.copyto", "", str(row["n"]), f"{row['warm_copyto_s']:.3f}"] + blank)
    return out, notes


def _target_cell(t: Mapping[str, Any], markup: bool) -> str:
    if t["measured"] is None:
        return "n/a"
    value = f"{t['measured']:.0f} MiB" if t["unit"] == "MiB" else f"{t['measured']:.2f}x"
    status = "met" if t["met"] else "MISSED"
    if markup:
        status = f"[green]{status}[/]" if t["met"] else f"[red]{status}[/]"
    return f"{value} {status}"


def _target_grid(targets: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Targets as a grid: one line per target, one column per (server, state)."""
    columns = list(dict.fromkeys((t["server"], t["state"]) for t in targets))
    names = list(dict.fromkeys(t["target"] for t in targets))
    cell = {(t["target"], t["server"], t["state"]): t for t in targets}
    grid: list[list[Any]] = [[name, *(cell.get((name, server, state)) for server, state in columns)] for name in names]
    return [f"{server} {state}" for server, state in columns], grid


def render_peers(console: Console, result: Mapping[str, Any]) -> None:
    """Print every server's table, its fastest/leanest peers, then the targets."""
    meta = result["meta"]
    for server, part in result["servers"].items():
        if part.get("status") != "ok":
            console.print(f"[yellow]{server}: not measured: {part.get('reason')}[/]")
            continue
        table = Table(
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            collapse_padding=True,
            pad_edge=False,
            title=(
                f"{server}: {meta['state_mib']:g} MiB state, {meta['nodes']} nodes x {meta['blobs_per_node']} blobs, "
                f"medians of {part['meta']['reps_done']}/{meta['reps']} reps"
            ),
        )
        cells, notes = peer_table_rows(part["rows"])
        for i, col in enumerate(PEER_TABLE_COLUMNS):
            if i == 0:
                table.add_column(col, no_wrap=True, min_width=max(len(r[0]) for r in cells))
            else:
                table.add_column(col, justify="left" if i == 1 else "right", overflow="fold")
        for line in cells:
            table.add_row(*line)
        console.print(table)
        console.print(_LEGEND, highlight=False)
        for kind, ref in part["references"].items():
            console.print(
                f"{kind}: fastest peer {ref['fastest']} ({_fmt(ref['wall_s'], '.3f')} s), leanest CPU "
                f"{ref['leanest_cpu']} ({_fmt(ref['cpu_s'])} s), leanest RSS {ref['leanest_rss']} "
                f"({_fmt(ref['rss_delta_mib'], '+.0f')} MiB)",
                highlight=False,
            )
        for i, note in enumerate(notes, 1):
            console.print(f"({i}) {note}", highlight=False)
        if part["meta"].get("aborted"):
            console.print(f"[yellow]stopped early: {part['meta']['aborted']}[/]")
        if part["meta"].get("busy_warning"):
            console.print(f"[yellow]warning: {part['meta']['busy_warning']}[/]")
    headers, grid = _target_grid(result["targets"])
    targets = Table(
        title="issue 12 targets (ratios within one server's run; measured, not asserted)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    targets.add_column("target")
    for header in headers:
        targets.add_column(header, justify="right")
    for name, *values in grid:
        targets.add_row(name, *[("n/a" if t is None else _target_cell(t, markup=True)) for t in values])
    console.print(targets)


def peer_markdown(result: Mapping[str, Any]) -> str:
    """Every server's table and the targets, as Markdown."""
    lines: list[str] = []
    for server, part in result["servers"].items():
        if part.get("status") != "ok":
            lines += [f"**{server}**: not measured: {part.get('reason')}", ""]
            continue
        lines += [f"**{server}** (medians of {part['meta']['reps_done']} reps)", ""]
        lines += ["| " + " | ".join(PEER_TABLE_COLUMNS) + " |", "|" + "---|" * len(PEER_TABLE_COLUMNS)]
        cells, notes = peer_table_rows(part["rows"])
        lines += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in cells]
        lines += [""] + [f"({i}) {note}  " for i, note in enumerate(notes, 1)] + [""]
    headers, grid = _target_grid(result["targets"])
    lines += ["| target | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    for line in grid:
        lines.append(
            f"| {line[0]} | "
            + " | ".join("n/a" if t is None else _target_cell(t, markup=False) for t in line[1:])
            + " |"
        )
    return "\n".join(lines)
