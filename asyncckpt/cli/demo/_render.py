"""What a demo run reports, and how it is printed (rich).

:class:`TransferStats` is one save or load as the manager's report gives it;
:class:`DemoResult` is the verdict of a whole run. The ``print_*`` helpers write the
header, the per-epoch lines, the checks and the verdict that ``asyncckpt demo`` shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from asyncckpt import MiB, TransferConfig

__all__ = [
    "DemoResult",
    "TransferStats",
    "add_epoch_row",
    "epoch_table",
    "facts_grid",
    "merge_reports",
    "print_check",
    "print_commit_columns",
    "print_commit_seen",
    "print_header",
    "print_ranks",
    "print_verdict",
    "relative_url",
]


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


def merge_reports(reports: Sequence[Mapping[str, Any]]) -> TransferStats:
    """A save or load of the whole job from every process's report (each covers the
    nodes it holds): bytes added, the slowest process's time."""
    nodes: dict[str, Any] = {}
    for report in reports:
        nodes.update(report.get("nodes") or {})
    merged = {
        "action": reports[0]["action"],
        "epoch": reports[0]["epoch"],
        "seconds": max(float(r["seconds"]) for r in reports),
        "bytes": sum(int(r["bytes"]) for r in reports),
        "nodes": nodes,
        "slowest_node": max(nodes, key=lambda n: nodes[n]["seconds"]) if nodes else None,
    }
    return TransferStats.from_report(merged)


# ---------------------------------------------------------------------- one process


def epoch_table(title: str) -> Table:
    """An empty table of per-epoch saves (see :func:`add_epoch_row`)."""
    table = Table(title=title, title_justify="left", title_style="bold", header_style="bold cyan")
    table.add_column("epoch", justify="right")
    table.add_column("save s", justify="right")
    table.add_column("MB", justify="right")
    table.add_column("MB/s", justify="right")
    table.add_column("slowest node", justify="left")
    table.add_column("requests", justify="right")
    return table


def add_epoch_row(table: Table, stats: TransferStats) -> None:
    """One save's line: epoch, seconds, MB, MB/s, slowest node, requests (and retries)."""
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


# ---------------------------------------------------------------------- several processes


def print_ranks(console: Console, pids: Sequence[int], nodes: Sequence[Sequence[str]]) -> None:
    """One line per worker process: its rank, PID and nodes."""
    facts = facts_grid()
    for rank, (pid, names) in enumerate(zip(pids, nodes)):
        facts.add_row(f"  rank {rank}", f"pid {pid}: {', '.join(names)}")
    console.print(facts)


def print_commit_seen(
    console: Console, epoch: int, reports: Sequence[Mapping[str, Any]], names: Sequence[str], problems: list[str]
) -> TransferStats:
    """Check every process's save report of ``epoch`` (each covers the nodes that process
    holds, together every node once), print the epoch's line from all of them."""
    covered: list[str] = []
    for rank, report in enumerate(reports):
        covered.extend(report.get("nodes") or {})
        if report.get("epoch") != epoch:
            problems.append(f"epoch {epoch}: rank {rank}'s save report is of epoch {report.get('epoch')}")
    if sorted(covered) != sorted(names):
        problems.append(
            f"epoch {epoch}: the save reports cover nodes {sorted(covered)}, expected each of {sorted(names)} once"
        )
    stats = merge_reports(reports)
    slowest = f"{stats.slowest_node} ({stats.slowest_seconds:.3f} s)" if stats.slowest_node else "-"
    seen = f"seen by {len(reports)}/{len(reports)}"
    console.print(
        f"  {epoch:>5}  [green]committed[/], {seen}  {stats.seconds:7.3f}  {stats.bytes / 1e6:7.1f}"
        f"  {stats.mb_per_s:5.0f}  {slowest}"
    )
    return stats


def print_commit_columns(console: Console, processes: int) -> None:
    """The column heads of :func:`print_commit_seen`'s lines."""
    width = len(f"committed, seen by {processes}/{processes}")
    console.print("[dim]a line once every process saw the epoch committed; stats: every process's save report[/]")
    console.print(
        f"  [bold cyan]{'epoch':>5}  {'commit':<{width}}  {'save s':>7}  {'MB':>7}  {'MB/s':>5}  slowest node[/]"
    )


# ---------------------------------------------------------------------- both


def print_header(
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
    """What the job is: nodes, sizes, epochs, the crash, processes, location and transfer settings."""
    console.print(f"[bold]asyncckpt demo[/]: a {nodes}-node training job that crashes and resumes")
    header = facts_grid()
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


def facts_grid() -> Table:
    """Aligned "label  value" lines."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    return grid


def relative_url(full_url: str, root: str) -> str:
    """``full_url`` shown below ``root`` when it is (``epochs/.../x.shard``)."""
    root = root.rstrip("/") + "/"
    return full_url[len(root) :] if full_url.startswith(root) else full_url


def print_check(console: Console, what: str, compared: int, diff: Sequence[str]) -> None:
    """A check's verdict: a green tick, or a red cross and the first ten differences."""
    if not diff:
        console.print(f"[green]✓[/] {what}: {compared} blobs equal, bit for bit")
        return
    console.print(f"[red]✗ {what}: {len(diff)} difference(s)[/]")
    for line in diff[:10]:
        console.print(f"    [red]{escape(line)}[/]")
    if len(diff) > 10:
        console.print(f"    [red]... and {len(diff) - 10} more[/]")


def print_verdict(console: Console, result: DemoResult) -> None:
    """The totals of the run, then PASS or FAIL."""
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
