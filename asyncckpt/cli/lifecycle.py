"""``asyncckpt show``, ``rm`` and ``prune``: look inside a committed epoch, delete epochs
by number or by retention rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from asyncckpt import CheckpointError, EpochManifest, MultiNodeCheckpointManager, Retention, TransferConfig
from asyncckpt._tasks import run_all
from asyncckpt.codec import BlobEntry
from asyncckpt.layout import epoch_of_key
from asyncckpt.manifest import NodeRecord, read_index, read_manifest
from asyncckpt.node import ShardReader
from asyncckpt.storage import storage_for

from . import EXIT_FAILED, fail, run_coroutine
from ._options import (
    count,
    endpoint_option,
    epoch_summary,
    existing_location_options,
    format_bytes,
    format_metrics,
    format_time,
    json_option,
    print_json,
)

__all__ = ["prune", "rm", "show"]


# ---------------------------------------------------------------------- show


@dataclass(frozen=True)
class NodeContents:
    """One node's shard in a committed epoch: where it is and its blob index."""

    record: NodeRecord
    url: str
    blobs: dict[str, BlobEntry]
    ref_urls: tuple[str, ...] = ()  # the URLs of record.refs

    def holder(self, entry: BlobEntry) -> str | None:
        """The URL of the object of an earlier epoch holding ``entry``'s bytes, if not the shard."""
        return self.ref_urls[entry.ref] if entry.ref is not None else None

    def stored_in(self, entry: BlobEntry) -> str:
        """Where ``entry``'s bytes are, for the table: ``""`` (the shard), ``"epoch N"``
        or, for a tree some of whose leaves are elsewhere, ``"leaves in epoch N[, M]"``."""
        if entry.ref is not None:
            return f"epoch {epoch_of_key(self.record.refs[entry.ref].key)}"
        keys = {self.record.refs[leaf.ref].key for leaf in entry.leaves if leaf.ref is not None}
        epochs = sorted({epoch for key in keys if (epoch := epoch_of_key(key)) is not None})
        return f"leaves in epoch {', '.join(map(str, epochs))}" if epochs else ""


@click.command(short_help="Show the nodes and blobs of a committed epoch.")
@click.argument("location")
@click.argument("epoch", type=click.IntRange(min=0))
@json_option
@endpoint_option
def show(location: str, epoch: int, as_json: bool, endpoint_url: str | None) -> None:
    """Show committed EPOCH of LOCATION (s3://bucket/prefix or a directory): its nodes,
    each with its shard object and size, and every blob of each node with its kind
    (ndarray, bytes or msgpack), dtype, shape and stored bytes, and, for a blob an
    incremental save did not upload again, the earlier epoch whose shard holds it. Only
    the manifest, the index and the tail of each shard are read (its blob index), not
    the blobs.

    With --json: {"location", "epoch", "nodes" (a count), "bytes", "reused_bytes",
    "created", "created_unix", "run_id", "writer_id", "metrics", "shards": [{"node",
    "object", "bytes", "reused_bytes", "blobs": [{"name", "kind", "dtype", "shape",
    "bytes", "reused_bytes", "object"}]}]}; dtype and shape are null for blobs that are
    not arrays; a blob's object is null when it is in the node's own shard, else the URL
    of the object of an earlier epoch that holds it; a blob's reused_bytes are those of
    its payload stored in earlier epochs' objects (all of it, or a tree's reused leaves).

    Exit code 0, or 2 on a storage or usage error (an epoch that is not committed, a
    directory or bucket that does not exist). A shard whose blob index is damaged is
    also exit 2; `asyncckpt verify` checks every byte.

    \b
    Examples:
      asyncckpt show /tmp/ckpt-demo 3
      asyncckpt show s3://my-bucket/run 12 --json
    """
    options = existing_location_options(location, endpoint_url, "show")
    manifest, nodes = run_coroutine(_read_epoch_contents(location, options, epoch))
    if as_json:
        shards = [
            {
                "node": node.record.node,
                "object": node.url,
                "bytes": node.record.size,
                "reused_bytes": node.record.stats.reused_bytes,
                "blobs": [
                    {**_blob_json(name, entry), "object": node.holder(entry)} for name, entry in node.blobs.items()
                ],
            }
            for node in nodes
        ]
        print_json({"location": location, **epoch_summary(manifest), "shards": shards})
        return
    console = Console(highlight=False)
    reused = f" (and {format_bytes(manifest.reused_bytes)} reused)" if manifest.reused_bytes else ""
    console.print(
        f"[bold]epoch {epoch}[/] of {escape(location)}: {count(manifest.node_count, 'node')}, "
        f"{format_bytes(manifest.total_bytes)} of shards{reused}, committed {format_time(manifest.created_unix)} UTC "
        f"by run {escape(manifest.run_id)}",
        soft_wrap=True,
    )
    if manifest.metrics:
        console.print(f"metrics: {escape(format_metrics(manifest.metrics))}")
    table = Table(header_style="bold cyan")
    table.add_column("node", overflow="fold")
    table.add_column("blob", overflow="fold")
    table.add_column("kind")
    table.add_column("dtype")
    table.add_column("shape")
    table.add_column("bytes", justify="right")
    with_reuse = any(node.record.refs for node in nodes)
    if with_reuse:
        table.add_column("stored in")
    for node in nodes:
        for i, (name, entry) in enumerate(node.blobs.items()):
            blob = _blob_json(name, entry)
            table.add_row(
                escape(node.record.node) if i == 0 else "",
                escape(name),
                entry.encoding,
                escape(blob["dtype"] or ""),
                "" if blob["shape"] is None else str(tuple(blob["shape"])),
                format_bytes(entry.payload_length),
                *([node.stored_in(entry)] if with_reuse else []),
                end_section=i == len(node.blobs) - 1,
            )
    console.print(table)
    for node in nodes:
        console.print(
            f"[dim]{escape(node.record.node)}: {escape(node.url)} ({format_bytes(node.record.size)})[/]",
            soft_wrap=True,
        )


def _blob_json(name: str, entry: BlobEntry) -> dict[str, Any]:
    return {
        "name": name,
        "kind": entry.encoding,
        "dtype": _dtype_name(entry.dtype) if entry.dtype is not None else None,
        "shape": list(entry.shape) if entry.shape is not None else None,
        "bytes": entry.payload_length,
        "reused_bytes": entry.length if entry.ref is not None else entry.payload_length - entry.length,
    }


def _dtype_name(dtype: str) -> str:
    """numpy's name for a stored dtype (``"<f4"`` -> ``"float32"``), else the stored text."""
    try:
        return str(np.dtype(dtype))
    except TypeError:
        return dtype


async def _read_epoch_contents(
    location: str, options: dict[str, Any], epoch: int
) -> tuple[EpochManifest, list[NodeContents]]:
    """The epoch's manifest, and each node's shard with its blob index, by node name."""
    config = TransferConfig()
    async with storage_for(location, options=options, config=config) as storage:
        manifest = await read_manifest(storage, epoch)
        index = await read_index(storage, manifest)

        async def contents(record: NodeRecord) -> NodeContents:
            reader = ShardReader(storage, record.node, record, config)
            await reader.check_size()
            refs = tuple(storage.url_of(key) for key in record.referenced)
            return NodeContents(record, storage.url_of(record.shard), await reader.read_index(), refs)

        records = sorted(index.nodes.values(), key=lambda record: record.node)
        return manifest, await run_all((contents(r) for r in records), config.max_concurrency)


# ---------------------------------------------------------------------- rm


@click.command(short_help="Delete committed epochs.")
@click.argument("location")
@click.argument("epochs", nargs=-1, required=True, type=click.IntRange(min=0))
@click.option("--yes", "-y", is_flag=True, help="Delete without asking.")
@json_option
@endpoint_option
def rm(location: str, epochs: Sequence[int], yes: bool, as_json: bool, endpoint_url: str | None) -> None:
    """Delete committed EPOCHS of LOCATION (s3://bucket/prefix or a directory). Each epoch
    stops existing at once (its commit record goes first), then its objects go; an
    interrupted rm leaves only what `asyncckpt gc` removes. Asks first (on stderr) unless
    --yes. Every epoch named must be committed, else nothing is deleted.

    With --json: {"location", "deleted": [epochs]}.

    Exit code 0 when deleted, 1 when the question is answered no (nothing deleted), 2 on
    a storage or usage error (an epoch that is not committed, a directory or bucket that
    does not exist).

    \b
    Examples:
      asyncckpt rm /tmp/ckpt-demo 0 1
      asyncckpt rm s3://my-bucket/run 12 --yes --json
    """
    options = existing_location_options(location, endpoint_url, "rm")
    wanted = sorted(set(epochs))
    manifests = {m.epoch: m for m in run_coroutine(_committed_manifests(location, options))}
    missing = [epoch for epoch in wanted if epoch not in manifests]
    if missing:
        fail(f"{_epochs_text(missing)} not committed in {location}: nothing deleted")
    if not yes:
        size = format_bytes(sum(manifests[epoch].total_bytes for epoch in wanted))
        question = f"Delete {_epochs_text(wanted)} of {location} ({size} of shards)?"
        remaining = [epoch for epoch in manifests if epoch not in wanted]
        if max(manifests) in wanted:
            resume = f"epoch {max(remaining)}" if remaining else "scratch"
            question += f" Epoch {max(manifests)} is the latest: a resuming job would start from {resume}."
        if not click.confirm(question, default=False, err=True):
            click.echo("nothing deleted", err=True)
            if as_json:
                print_json({"location": location, "deleted": []})
            raise SystemExit(EXIT_FAILED)
    deleted = run_coroutine(_delete_epochs(location, options, wanted))
    if as_json:
        print_json({"location": location, "deleted": deleted})
        return
    Console(highlight=False, soft_wrap=True).print(f"[green]✓[/] deleted {_epochs_text(deleted)} of {escape(location)}")


def _epochs_text(epochs: Sequence[int]) -> str:
    """``[3]`` -> ``"epoch 3"``, ``[3, 4]`` -> ``"epochs 3, 4"``."""
    return ("epoch " if len(epochs) == 1 else "epochs ") + ", ".join(str(e) for e in epochs)


async def _committed_manifests(location: str, options: dict[str, Any]) -> list[EpochManifest]:
    async with MultiNodeCheckpointManager(location, storage_options=options) as mgr:
        return await mgr.committed_manifests()


async def _delete_epochs(location: str, options: dict[str, Any], epochs: Sequence[int]) -> list[int]:
    """Delete ``epochs`` one by one, in order; an error names those already deleted."""
    deleted: list[int] = []
    async with MultiNodeCheckpointManager(location, storage_options=options) as mgr:
        for epoch in epochs:
            try:
                await mgr.delete_epoch(epoch)
            except CheckpointError as exc:
                if not deleted:
                    raise
                raise CheckpointError(f"{exc} (already deleted: {_epochs_text(deleted)})") from exc
            deleted.append(epoch)
    return deleted


# ---------------------------------------------------------------------- prune


@click.command(short_help="Delete the committed epochs that retention rules do not keep.")
@click.argument("location")
@click.option("--keep-last", type=click.IntRange(min=1), metavar="N", help="Keep the newest N epochs.")
@click.option("--keep-every", type=click.IntRange(min=1), metavar="K", help="Keep every epoch divisible by K.")
@click.option("--keep-best", type=click.IntRange(min=1), metavar="K", help="Keep the K epochs with the best --metric.")
@click.option("--metric", metavar="M", help="The metric of --keep-best, as saved with save(epoch, metrics={M: ...}).")
@click.option(
    "--mode",
    type=click.Choice(["min", "max"]),
    default="min",
    show_default=True,
    help="Whether the best --metric is the lowest or the highest.",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@json_option
@endpoint_option
def prune(
    location: str,
    keep_last: int | None,
    keep_every: int | None,
    keep_best: int | None,
    metric: str | None,
    mode: str,
    dry_run: bool,
    as_json: bool,
    endpoint_url: str | None,
) -> None:
    """Delete the committed epochs of LOCATION (s3://bucket/prefix or a directory) that
    no rule keeps: the rules of asyncckpt.Retention. An epoch is kept if any rule keeps
    it, and the latest committed epoch is always kept. Epochs saved without --metric
    are not candidates for --keep-best; a --metric that no committed epoch has is
    refused (a typo would otherwise leave only the latest). At least one rule is needed.

    With --json: {"location", "dry_run", "retention": {"keep_last", "keep_every",
    "keep_best", "metric", "mode"}, "deleted": [epochs], "kept": [epochs]}.

    Exit code 0, or 2 on a storage or usage error (no rule, a directory or bucket that
    does not exist).

    \b
    Examples:
      asyncckpt prune /tmp/ckpt-demo --keep-last 2 --dry-run
      asyncckpt prune s3://my-bucket/run --keep-last 3 --keep-every 10
      asyncckpt prune s3://my-bucket/run --keep-best 2 --metric loss --mode min --json
    """
    if keep_last is None and keep_every is None and keep_best is None:
        raise click.UsageError("give at least one rule: --keep-last, --keep-every or --keep-best with --metric")
    try:
        rules = Retention(keep_last=keep_last, keep_every=keep_every, keep_best=keep_best, metric=metric, mode=mode)
    except ValueError as exc:
        raise click.UsageError(str(exc).replace("Retention.", "--").replace("_", "-")) from None
    options = existing_location_options(location, endpoint_url, "prune")
    deleted, kept = run_coroutine(_prune(location, options, rules, dry_run))
    if as_json:
        print_json(
            {
                "location": location,
                "dry_run": dry_run,
                "retention": dataclasses.asdict(rules),
                "deleted": deleted,
                "kept": kept,
            }
        )
        return
    console = Console(highlight=False)
    what = "dry run: nothing is deleted" if dry_run else "deleting"
    console.print(f"[bold]asyncckpt prune[/] {escape(location)} [dim]({_rules_text(rules)}; {what})[/]", soft_wrap=True)
    if kept:
        console.print(f"kept {_epochs_text(kept)}")
    if not deleted:
        console.print("[green]✓[/] nothing to delete: every committed epoch is kept")
    elif dry_run:
        console.print(f"[green]✓[/] dry run: {_epochs_text(deleted)} would go; run without --dry-run to delete them")
    else:
        console.print(f"[green]✓[/] deleted {_epochs_text(deleted)}")


def _rules_text(rules: Retention) -> str:
    parts = []
    if rules.keep_last is not None:
        parts.append(f"keep the last {rules.keep_last}")
    if rules.keep_every is not None:
        parts.append(f"every epoch divisible by {rules.keep_every}")
    if rules.keep_best is not None:
        parts.append(f"the best {rules.keep_best} by {'lowest' if rules.mode == 'min' else 'highest'} {rules.metric}")
    return ", ".join(parts) + " and the latest"


async def _prune(
    location: str, options: dict[str, Any], rules: Retention, dry_run: bool
) -> tuple[list[int], list[int]]:
    """Apply ``rules``; returns (deleted or, in a dry run, doomed epochs; kept epochs)."""
    async with MultiNodeCheckpointManager(location, storage_options=options) as mgr:
        manifests = await mgr.committed_manifests()
        if rules.metric is not None and manifests and not any(rules.metric in m.metrics for m in manifests):
            recorded = sorted({name for m in manifests for name in m.metrics})
            raise click.BadParameter(
                f"no committed epoch has metric {rules.metric!r} "
                f"({'metrics recorded: ' + ', '.join(recorded) if recorded else 'no epoch has metrics'}); "
                "nothing deleted",
                param_hint="'--metric'",
            )
        deleted = await mgr.prune(rules, dry_run=dry_run)
    return deleted, [m.epoch for m in manifests if m.epoch not in deleted]
