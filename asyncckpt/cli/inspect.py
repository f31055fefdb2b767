"""``asyncckpt ls`` and ``asyncckpt gc``: read and tidy what is already in a location."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from asyncckpt import EpochManifest, GcReport, MultiNodeCheckpointManager
from asyncckpt.storage import parse_location, storage_for

from . import fail, run_coroutine
from ._options import Duration, count, endpoint_option, format_bytes, format_duration, storage_options_for

__all__ = ["gc", "ls"]


def existing_location_options(location: str, endpoint_url: str | None, command: str) -> dict[str, Any]:
    """Check the LOCATION of a command that reads what is already there (no I/O; a bad
    one ends the command with one red line) and return its ``storage_options``."""
    try:
        kind, where, _ = parse_location(location)
        storage_for(location)  # bucket-name rules and the like
    except ValueError as exc:
        fail(f"invalid location: {exc}")
    if kind == "memory":
        fail(
            f"{location}: a memory:// location lives inside one process; `asyncckpt {command}` needs s3:// or a directory"
        )
    if kind == "file" and Path(where).expanduser().exists() and not Path(where).expanduser().is_dir():
        fail(f"{location}: not a directory")
    return storage_options_for(location, endpoint_url)


# ---------------------------------------------------------------------- ls


@click.command(short_help="List the committed epochs of a location.")
@click.argument("location")
@endpoint_option
def ls(location: str, endpoint_url: str | None) -> None:
    """List the committed epochs of LOCATION (s3://bucket/prefix or a directory): per
    epoch its nodes, the bytes of their shards, when it was committed and by which run
    id. The latest one, where a resuming job starts, is marked.

    Exit code 0 (also when there is no committed epoch), 2 on a storage or usage error.
    """
    options = existing_location_options(location, endpoint_url, "ls")
    manifests = run_coroutine(_read_committed_manifests(location, options))
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
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("run id", overflow="fold")
    table.add_column("")
    latest = manifests[-1].epoch
    for manifest in manifests:
        created = datetime.fromtimestamp(manifest.created_unix, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            str(manifest.epoch),
            str(manifest.node_count),
            format_bytes(manifest.total_bytes),
            created,
            escape(manifest.run_id),
            "[bold green]latest[/]" if manifest.epoch == latest else "",
        )
    console.print(table)
    total = sum(manifest.total_bytes for manifest in manifests)
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
@endpoint_option
def gc(location: str, grace: float, dry_run: bool, endpoint_url: str | None) -> None:
    """Delete the garbage of LOCATION (s3://bucket/prefix or a directory): the objects
    of epochs that were never committed, objects inside committed epochs that their
    manifest does not name (a failed or losing attempt), and unfinished multipart
    uploads, when older than --grace. A committed epoch's manifest and the shards and
    receipts it names are never touched, nor an epoch whose manifest does not parse.

    Exit code 0, or 2 on a storage or usage error.

    \b
    Examples:
      asyncckpt gc s3://my-bucket/run --dry-run
      asyncckpt gc /tmp/ckpt-demo --grace 0
    """
    options = existing_location_options(location, endpoint_url, "gc")
    report = run_coroutine(_collect_garbage(location, options, grace, dry_run))
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
