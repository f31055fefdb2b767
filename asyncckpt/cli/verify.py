"""``asyncckpt verify``: read every byte of committed epochs and check every CRC32C."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from asyncckpt import CheckpointCorruptedError, CheckpointNotFoundError, EpochManifest, TransferConfig
from asyncckpt._tasks import run_all
from asyncckpt.housekeeping import epoch_dirs
from asyncckpt.layout import manifest_key
from asyncckpt.manifest import EpochIndex, NodeRecord, read_index, read_manifest
from asyncckpt.node import ShardReader
from asyncckpt.progress import reporting
from asyncckpt.storage import Storage, storage_for

from . import EXIT_FAILED, run_coroutine
from ._options import (
    count,
    endpoint_option,
    epoch_summary,
    existing_location_options,
    format_bytes,
    json_option,
    print_json,
)

__all__ = ["Damage", "verify"]

DEFAULT_PARALLEL = 4
_BLOB_IN_MESSAGE = re.compile(r"""blob ('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


@dataclass(frozen=True)
class Damage:
    """The first damage found: the epoch, and where known the node, blob and object."""

    epoch: int
    node: str | None
    blob: str | None
    object: str | None
    message: str

    @classmethod
    def of(cls, epoch: int, exc: Exception, *, node: str | None = None, url: str | None = None) -> Damage:
        """The damage ``exc`` reports; the blob is the one its message names, if any."""
        message = str(exc)
        match = _BLOB_IN_MESSAGE.search(message)
        blob = ast.literal_eval(match[1]) if match else None
        return cls(epoch, node, blob, url, message)


class _Damaged(Exception):
    """Carries a :class:`Damage` out of the concurrent shard reads (and stops them)."""

    def __init__(self, damage: Damage):
        super().__init__(damage.message)
        self.damage = damage


@dataclass(frozen=True)
class VerifyResult:
    """What was checked (the committed epochs whose records parse) and the first damage."""

    epochs: list[EpochManifest]
    bytes_checked: int
    damage: Damage | None


@click.command(short_help="Read every byte of committed epochs and check every CRC32C.")
@click.argument("location")
@click.argument("epoch", type=click.IntRange(min=0), required=False)
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=DEFAULT_PARALLEL,
    show_default=True,
    metavar="N",
    help="Shards read at once; each is held in memory while it is checked.",
)
@json_option
@endpoint_option
def verify(location: str, epoch: int | None, parallel: int, as_json: bool, endpoint_url: str | None) -> None:
    """Check EPOCH of LOCATION (s3://bucket/prefix or a directory), or every committed
    epoch when no EPOCH is given: read every byte of every node's shard, and the bytes
    its blobs reuse in the shards of earlier epochs (incremental saves), and check the
    CRC32C of every blob, of every shard, of each epoch's index and its manifest, as a
    load does. Stops at the first damage and names its node, blob and object. A
    manifest that does not parse is damage too. Draws a progress bar on stderr when it
    is a terminal.

    With --json: {"location", "ok", "epochs": [{"epoch", "nodes", "bytes", "reused_bytes",
    "created", "created_unix", "run_id", "writer_id", "metrics"}], "bytes_checked", "damage":
    null or {"epoch", "node", "blob", "object", "message"}} (node, blob and object are
    null where the damage is not in one).

    Exit code 0 when every byte checked is intact (also when there is no committed
    epoch), 1 on damage, 2 on a storage or usage error (an EPOCH that is not
    committed, a directory or bucket that does not exist).

    \b
    Examples:
      asyncckpt verify /tmp/ckpt-demo
      asyncckpt verify s3://my-bucket/run 12 --json
    """
    options = existing_location_options(location, endpoint_url, "verify")
    console = Console(stderr=True)
    progress = (
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        if console.is_terminal
        else None
    )
    with progress or nullcontext():
        result = run_coroutine(_verify(location, options, epoch, parallel, progress))
    if as_json:
        print_json(
            {
                "location": location,
                "ok": result.damage is None,
                "epochs": [epoch_summary(m) for m in result.epochs],
                "bytes_checked": result.bytes_checked,
                "damage": asdict(result.damage) if result.damage is not None else None,
            }
        )
    else:
        _print_result(location, result)
    if result.damage is not None:
        raise SystemExit(EXIT_FAILED)


def _print_result(location: str, result: VerifyResult) -> None:
    out = Console(highlight=False, soft_wrap=True)
    damage = result.damage
    if damage is not None:
        out.print(f"[bold red]✗ epoch {damage.epoch} is damaged[/]")
        for label, value in (("node", damage.node), ("blob", damage.blob), ("object", damage.object)):
            if value is not None:
                out.print(f"  {label:<7} {escape(value)}")
        out.print(f"  [red]{escape(damage.message)}[/]")
        return
    if not result.epochs:
        out.print(f"no committed epoch in {escape(location)}: nothing to verify")
        return
    for manifest in result.epochs:
        out.print(
            f"[green]✓[/] epoch {manifest.epoch}: {count(manifest.node_count, 'node')}, "
            f"{format_bytes(manifest.total_bytes)}"
        )
    out.print(
        f"[green]✓[/] {count(len(result.epochs), 'epoch')} intact: {format_bytes(result.bytes_checked)} read, "
        "every CRC32C matches"
    )


async def _verify(
    location: str, options: dict[str, Any], epoch: int | None, parallel: int, progress: Progress | None
) -> VerifyResult:
    config = TransferConfig()
    async with storage_for(location, options=options, config=config) as storage:
        try:
            plan = await _plan(storage, epoch, config.max_concurrency)
        except _Damaged as damaged:
            return VerifyResult([], 0, damaged.damage)
        manifests = [manifest for manifest, _ in plan]
        shards = [(manifest.epoch, record) for manifest, index in plan for record in index.nodes.values()]
        total = sum(record.load_bytes for _, record in shards)
        checked: list[int] = []  # the sizes of the shards found intact
        try:
            with reporting(_progress_bar(progress, f"verifying {count(len(manifests), 'epoch')}", total), total):
                await run_all((_check_shard(storage, config, e, r, checked) for e, r in shards), parallel)
        except _Damaged as damaged:
            if not await storage.exists(manifest_key(damaged.damage.epoch)):  # not damage: an rm ran beside us
                raise CheckpointNotFoundError(
                    f"epoch {damaged.damage.epoch} was deleted from {storage.url} while it was being verified"
                ) from None
            return VerifyResult(manifests, sum(checked), damaged.damage)
        return VerifyResult(manifests, sum(checked), None)


def _progress_bar(progress: Progress | None, description: str, total: int) -> Callable[[int, int], None] | None:
    """A ``progress(bytes_done, bytes_total)`` callback that draws on ``progress``, if any."""
    if progress is None:
        return None
    task = progress.add_task(description, total=total)

    def draw(done: int, _total: int) -> None:
        progress.update(task, completed=done)

    return draw


async def _plan(storage: Storage, epoch: int | None, limit: int) -> list[tuple[EpochManifest, EpochIndex]]:
    """The manifest and index of ``epoch``, or of every committed epoch, ascending.

    An ``epoch`` that is not committed is :class:`CheckpointNotFoundError` (nothing to
    check); without ``epoch``, an epoch directory without a manifest is an unfinished
    save and left out. A record that does not parse raises :class:`_Damaged`.
    """

    async def records(e: int, *, required: bool) -> tuple[EpochManifest, EpochIndex] | None:
        try:
            manifest = await read_manifest(storage, e)
        except CheckpointNotFoundError:
            if required:
                raise
            return None
        except CheckpointCorruptedError as exc:
            raise _Damaged(Damage.of(e, exc, url=storage.url_of(manifest_key(e)))) from None
        try:
            return manifest, await read_index(storage, manifest)
        except CheckpointCorruptedError as exc:
            raise _Damaged(Damage.of(e, exc, url=storage.url_of(manifest.index))) from None

    if epoch is not None:
        found = [await records(epoch, required=True)]
    else:
        found = await run_all((records(e, required=False) for e in await epoch_dirs(storage)), limit)
    return [item for item in found if item is not None]


async def _check_shard(
    storage: Storage, config: TransferConfig, epoch: int, record: NodeRecord, checked: list[int]
) -> None:
    """Read and check one node's whole shard (every blob's CRC32C); damage is :class:`_Damaged`."""
    try:
        await ShardReader(storage, record.node, record, config).read_all()
    except (CheckpointCorruptedError, CheckpointNotFoundError) as exc:
        raise _Damaged(Damage.of(epoch, exc, node=record.node, url=_object_of(storage, record, exc))) from None
    checked.append(record.load_bytes)


def _object_of(storage: Storage, record: NodeRecord, exc: Exception) -> str:
    """The URL of the object ``exc`` is about: one of earlier epochs the node's blobs live
    in, when its message names one, else the node's shard."""
    message = str(exc)
    return next((url for url in map(storage.url_of, record.referenced) if url in message), storage.url_of(record.shard))
