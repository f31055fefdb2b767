"""``asyncckpt ls`` and ``asyncckpt gc``: read and tidy what is already in a location."""

from __future__ import annotations

import dataclasses
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from asyncckpt import EpochManifest, GcReport, MultiNodeCheckpointManager

from . import run_coroutine
from ._options import (
    Duration,
    count,
    endpoint_option,
    epoch_summary,
    existing_location_options,
    format_bytes,
    format_duration,
    format_metrics,
    format_time,
    json_option,
    print_json,
)

__all__ = ["gc", "ls"]


# ---------------------------------------------------------------------- ls


@click.command(short_help="List the committed epochs of a location.")
@click.argument("location")
@json_option
@endpoint_option
def ls(location: str, as_json: bool, endpoint_url: str | None) -> None:
    """List the committed epochs of LOCATION (s3://bucket/prefix or a directory): per
    epoch its nodes, the bytes of their shards (what its save uploaded), the bytes of
    its blobs it reuses from the shards of earlier epochs (incremental saves; a column
    shown when any epoch has them), when it was committed, by which run id and the
    metrics it was saved with (a column shown when any epoch has them). The latest one,
    where a resuming job starts, is marked.

    With --json: {"location", "epochs": [{"epoch", "nodes", "bytes", "reused_bytes",
    "created", "created_unix", "run_id", "writer_id", "metrics", "latest"}], "latest"
    (null when there is none), "total_bytes"}.

    Exit code 0 (also when there is no committed epoch), 2 on a storage or usage error
    (a directory or bucket that does not exist is one).

    \b
    Examples:
      asyncckpt ls s3://my-bucket/run --endpoint-url http://127.0.0.1:9000
      asyncckpt ls /tmp/ckpt-demo --json
    """
    options = existing_location_options(location, endpoint_url, "ls")
    manifests = run_coroutine(_read_committed_manifests(location, options))
    latest = manifests[-1].epoch if manifests else None
    total = sum(manifest.total_bytes for manifest in manifests)
    if as_json:
        epochs = [{**epoch_summary(m), "latest": m.epoch == latest} for m in manifests]
        print_json({"location": location, "epochs": epochs, "latest": latest, "total_bytes": total})
        return
    console = Console()
    if not manifests:
        console.print(f"no committed epoch in {escape(location)}")
        return
    table = Table(
        title=f"committed epochs in {escape(location)}",
        title_justify="left",
        title_style="bold",
        header_style="bold cyan",
    )
    table.add_column("epoch", justify="right")
    table.add_column("nodes", justify="right")
    table.add_column("shards", justify="right")
    with_reuse = any(manifest.reused_bytes for manifest in manifests)
    if with_reuse:
        table.add_column("reused", justify="right")
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("run id", overflow="fold")
    with_metrics = any(manifest.metrics for manifest in manifests)
    if with_metrics:
        table.add_column("metrics", overflow="fold")
    table.add_column("")
    for manifest in manifests:
        metrics = [escape(format_metrics(manifest.metrics))] if with_metrics else []
        reused = [format_bytes(manifest.reused_bytes)] if with_reuse else []
        table.add_row(
            str(manifest.epoch),
            str(manifest.node_count),
            format_bytes(manifest.total_bytes),
            *reused,
            format_time(manifest.created_unix),
            escape(manifest.run_id),
            *metrics,
            "[bold green]latest[/]" if manifest.epoch == latest else "",
        )
    console.print(table)
    console.print(
        f"{count(len(manifests), 'committed epoch')}, {format_bytes(total)} of shards; a job resumes from epoch {latest}"
    )


async def _read_committed_manifests(location: str, options: dict[str, Any]) -> list[EpochManifest]:
    """The manifests of the committed epochs, ascending."""
    async with MultiNodeCheckpointManager(location, storage_options=options) as mgr:
        return await mgr.committed_manifests()


# ---------------------------------------------------------------------- gc


@click.command(short_help="Remove what interrupted or losing saves left in a location.")
@click.argument("location")
@click.option(
    "--grace",
    type=Duration(),
    default="1h",
    show_default=True,
    metavar="DURATION",
    help="Leave objects younger than this alone (a save may still be writing them): seconds, "
    "or a number with s, m, h or d (90s, 30m, 1h, 2d).",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted or aborted.")
@json_option
@endpoint_option
def gc(location: str, grace: float, dry_run: bool, as_json: bool, endpoint_url: str | None) -> None:
    """Delete the garbage of LOCATION (s3://bucket/prefix or a directory): the objects
    of epochs that were never committed, objects inside committed epochs that their
    manifest does not name (a failed or losing attempt), and unfinished multipart
    uploads, when older than --grace. A committed epoch's manifest and the shards and
    receipts it names are never touched, nor an epoch whose manifest does not parse,
    nor the shards of deleted epochs that a committed (incremental) epoch points at.

    With --json: {"location", "grace_seconds", "dry_run", "deleted", "aborted_uploads",
    "kept_recent", "skipped_epochs", "abandoned", "completed_epochs", "kept_referenced"}
    (the fields of asyncckpt.GcReport).

    Exit code 0, or 2 on a storage or usage error (a directory or bucket that does not
    exist is one).

    \b
    Examples:
      asyncckpt gc s3://my-bucket/run --dry-run
      asyncckpt gc /tmp/ckpt-demo --grace 0
      asyncckpt gc /tmp/ckpt-demo --dry-run --json
    """
    options = existing_location_options(location, endpoint_url, "gc")
    report = run_coroutine(_collect_garbage(location, options, grace, dry_run))
    if as_json:
        print_json({"location": location, "grace_seconds": grace, **dataclasses.asdict(report)})
        return
    console = Console(highlight=False)
    what = "dry run: nothing is deleted" if dry_run else "deleting"
    console.print(f"[bold]asyncckpt gc[/] {escape(location)} [dim](grace {format_duration(grace)}, {what})[/]")
    lists = (
        ("would delete" if dry_run else "deleted", "object", report.deleted),
        ("would abort" if dry_run else "aborted", "unfinished multipart upload", report.aborted_uploads),
    )
    for verb, noun, keys in lists:
        if keys:
            console.print(f"{verb} {count(len(keys), noun)}:")
            for key in keys:
                console.print(f"  {escape(key)}", soft_wrap=True)
    if report.kept_recent:
        console.print(
            f"[yellow]kept {count(report.kept_recent, 'object')} younger than {format_duration(grace)}[/]: "
            "a save may still be writing them"
        )
    if report.kept_referenced:
        console.print(
            f"kept {count(report.kept_referenced, 'object')} of deleted or failed saves: "
            "other epochs still point at them"
        )
    if report.abandoned:
        claimed = "would claim" if dry_run else "claimed"
        console.print(f"{claimed} {count(len(report.abandoned), 'unfinished save')} as abandoned (it can never commit)")
    if report.completed_epochs:
        epochs = ", ".join(str(e) for e in report.completed_epochs)
        console.print(f"[green]completed the commit of epoch(s) {epochs}[/]: their save had decided to commit")
    if report.skipped_epochs:
        epochs = ", ".join(str(e) for e in report.skipped_epochs)
        console.print(
            f"[yellow]skipped {'epoch' if len(report.skipped_epochs) == 1 else 'epochs'} {epochs}[/]: "
            "the manifest exists but does not parse; left untouched"
        )
    garbage = [
        count(n, noun) for n, noun in ((len(report.deleted), "object"), (len(report.aborted_uploads), "upload")) if n
    ]
    if not garbage:
        console.print("[green]✓[/] nothing to delete")
    elif dry_run:
        console.print(f"[green]✓[/] dry run: {' and '.join(garbage)} would go; run without --dry-run to remove them")
    else:
        console.print(f"[green]✓[/] removed {' and '.join(garbage)}")


async def _collect_garbage(location: str, options: dict[str, Any], grace: float, dry_run: bool) -> GcReport:
    async with MultiNodeCheckpointManager(location, storage_options=options) as mgr:
        return await mgr.gc(grace_period=grace, dry_run=dry_run)
