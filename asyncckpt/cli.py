"""The ``asyncckpt`` command line (also ``python -m asyncckpt``).

Each command is one function of the :func:`main` group. This module is the only place
that creates an event loop (:func:`run_coroutine`). Exit codes, for every command:

* 0: success;
* 1: the command ran and its check failed (e.g. the demo's state comparison);
* 2: it could not run: a usage error, or a storage/environment error, printed as
  one red line without a traceback.

Commands: ``demo`` (a simulated job that crashes and resumes), ``ls`` (the committed
epochs of a location) and ``gc`` (remove what interrupted saves left behind). More
commands are added with ``main.add_command(...)``.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .config import MiB, TransferConfig
from .errors import CheckpointError
from .storage import parse_location, storage_for

if TYPE_CHECKING:  # both import numpy: loaded when a command needs them
    from .manager import GcReport
    from .manifest import EpochManifest

__all__ = ["main", "demo", "gc", "ls", "run_coroutine", "Duration", "EXIT_OK", "EXIT_FAILED", "EXIT_ERROR"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2

DEMO_BUCKET = "asyncckpt-demo"

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


# ---------------------------------------------------------------------- shared helpers


def fail(message: object) -> NoReturn:
    """Print ``message`` as one red line on stderr and exit with :data:`EXIT_ERROR`."""
    Console(stderr=True, soft_wrap=True, highlight=False).print(f"[bold red]error:[/] [red]{escape(str(message))}[/]")
    raise SystemExit(EXIT_ERROR)


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a new event loop; a :class:`~asyncckpt.CheckpointError` ends the
    command cleanly (see :func:`fail`)."""
    try:
        return asyncio.run(coro)
    except CheckpointError as exc:
        fail(exc)


def _validate_location(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Reject a malformed location before anything starts (builds the storage, no I/O)."""
    if value is None:
        return None
    try:
        storage_for(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def transfer_options(func: F) -> F:
    """The options that build a :class:`~asyncckpt.TransferConfig` (``transfer_config=``)."""
    func = click.option(
        "--checksum-mode",
        type=click.Choice(["when_required", "when_supported"]),
        default="when_required",
        show_default=True,
        help="botocore's checksum mode for S3. 'when_required': no extra CRC32 per upload "
        "(asyncckpt's own CRC32C guards every blob end to end; works on MinIO, Ceph, R2...). "
        "'when_supported': botocore >= 1.36's default, an extra CRC32 on every upload, which "
        "some S3-compatible stores reject.",
    )(func)
    func = click.option(
        "--part-size-mib",
        type=click.IntRange(min=5, max=5 * 1024),
        default=TransferConfig.part_size // MiB,
        show_default=True,
        help="Multipart part size in MiB (S3 allows 5 to 5120). A shard of at most one part is "
        "uploaded with a single PUT, a larger one in parts uploaded in parallel.",
    )(func)
    return func


def make_transfer_config(part_size_mib: int, checksum_mode: str) -> TransferConfig:
    """The library's defaults, with the chosen part size (the byte budget grows to hold
    at least one part) and checksum mode."""
    part_size = part_size_mib * MiB
    try:
        return TransferConfig(
            part_size=part_size,
            max_bytes_in_flight=max(TransferConfig.max_bytes_in_flight, part_size),
            checksum_mode=checksum_mode,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--part-size-mib'") from None


def endpoint_option(func: F) -> F:
    return click.option(
        "--endpoint-url",
        metavar="URL",
        default=None,
        help="S3 endpoint for s3:// locations, e.g. http://127.0.0.1:9000 for the MinIO of "
        "docker-compose.yml. Default: AWS_ENDPOINT_URL or AWS S3 itself; credentials and "
        "region always come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_PROFILE...).",
    )(func)


def storage_options_for(url: str, endpoint_url: str | None) -> dict[str, Any]:
    if endpoint_url is None:
        return {}
    if parse_location(url)[0] != "s3":
        raise click.BadParameter("applies to s3:// locations only", param_hint="'--endpoint-url'")
    return {"endpoint_url": endpoint_url}


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


class Duration(click.ParamType):
    """A duration, as seconds (``90``, ``2.5``) or with a unit: ``90s``, ``30m``, ``1h``, ``2d``."""

    name = "duration"
    UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
    _SYNTAX = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)", re.IGNORECASE)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value >= 0:
                return float(value)
        else:
            match = self._SYNTAX.fullmatch(str(value).strip())
            if match is not None:
                return float(match[1]) * self.UNITS[match[2].lower()]
        self.fail(
            f"{value!r} is not a duration: use seconds, or a number with s, m, h or d (90s, 30m, 1h, 2d)", param, ctx
        )


def format_duration(seconds: float) -> str:
    """``3600`` -> ``"1h"``, ``90`` -> ``"90s"``, ``5400`` -> ``"90m"``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def format_bytes(n: int) -> str:
    """Decimal units, like the demo's MB: ``3_100_000`` -> ``"3.1 MB"``."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------- the group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asyncckpt")
def main() -> None:
    """asyncckpt: asyncio checkpoints of multi-node training state on S3-compatible
    object storage (AWS S3, MinIO, Ceph, R2...), a local directory or memory.

    Exit codes: 0 success, 1 a check failed, 2 usage or storage error.
    """


# ---------------------------------------------------------------------- demo


@main.command(short_help="Simulate a multi-node training job: checkpoint, crash, resume, verify.")
@click.option(
    "--url",
    metavar="LOCATION",
    default=None,
    callback=_validate_location,
    help="Where to checkpoint: s3://bucket/prefix, a directory (or file:///abs/dir), or "
    "memory://name. It must hold no checkpoint yet. Default: an embedded S3 server (moto, "
    f"on 127.0.0.1, in memory) with bucket '{DEMO_BUCKET}' and a fresh prefix.",
)
@endpoint_option
@click.option("--nodes", type=click.IntRange(min=1), default=4, show_default=True, help="Simulated nodes (trainers).")
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Epochs to train; epoch 0 (the initial state) is saved too, so there are EPOCHS+1 checkpoints.",
)
@click.option(
    "--crash-after",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Simulate a crash after saving this epoch (must be below --epochs), then resume from the latest checkpoint.",
)
@click.option(
    "--mib-per-node",
    type=click.FloatRange(min=0, min_open=True),
    default=8.0,
    show_default=True,
    help="MiB of model weights per node (the optimizer state adds a little).",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run the nodes in this many OS processes (spawned; 1 to --nodes), each with its own manager "
    "and the job's run id, the nodes split round-robin: every epoch then commits through storage "
    "alone. The crash kills every process; a new set of processes resumes. 1: all nodes in this process.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="With --processes above 1: how long each set of worker processes may take, startup "
    "included; then it is killed and the demo fails (exit 2).",
)
@transfer_options
def demo(
    url: str | None,
    endpoint_url: str | None,
    nodes: int,
    epochs: int,
    crash_after: int,
    mib_per_node: float,
    processes: int,
    timeout: float,
    part_size_mib: int,
    checksum_mode: str,
) -> None:
    """Run a simulated multi-node training job that checkpoints every epoch, crashes,
    resumes with a new manager, and checks the restored and final state bit for bit.

    Prints per epoch the save time, bytes, throughput and slowest node; then the resume
    epoch, the load, and PASS or FAIL. Exit code 0 on PASS, 1 on FAIL, 2 on a storage or
    usage error.

    \b
    Examples:
      asyncckpt demo                                  # embedded S3 server, nothing to set up
      asyncckpt demo --processes 4                    # 4 OS processes, one manager each
      asyncckpt demo --url /tmp/ckpt-demo             # a local directory
      asyncckpt demo --url s3://my-bucket/demo --endpoint-url http://127.0.0.1:9000
    """
    if crash_after >= epochs:
        raise click.BadParameter(f"must be below --epochs ({epochs})", param_hint="'--crash-after'")
    if url is None and endpoint_url is not None:
        raise click.UsageError(
            "--endpoint-url needs --url s3://bucket/prefix (without --url the demo starts its own S3 server)"
        )
    if processes > nodes:
        raise click.BadParameter(f"must be between 1 and --nodes ({nodes})", param_hint="'--processes'")
    if processes > 1 and url is not None and parse_location(url)[0] == "memory":
        raise click.BadParameter(
            "a memory:// location lives inside one process; with --processes use a directory or s3://",
            param_hint="'--url'",
        )
    config = make_transfer_config(part_size_mib, checksum_mode)
    from .demo import (  # numpy work lives there; keep `asyncckpt --help` quick
        run_demo,
        run_multiprocess_demo,
    )

    def run(location: str, options: dict[str, Any]) -> bool:
        if processes == 1:
            job = run_demo(
                location,
                nodes=nodes,
                epochs=epochs,
                crash_after=crash_after,
                mib_per_node=mib_per_node,
                storage_options=options,
                config=config,
                console=Console(),
            )
        else:
            job = run_multiprocess_demo(
                location,
                processes=processes,
                nodes=nodes,
                epochs=epochs,
                crash_after=crash_after,
                mib_per_node=mib_per_node,
                storage_options=options,
                config=config,
                console=Console(),
                timeout=timeout,
                run_loop=run_coroutine,  # each worker process runs its own loop; only this module makes loops
            )
        return run_coroutine(job).passed

    if url is not None:
        passed = run(url, storage_options_for(url, endpoint_url))
    else:
        from ._server import EmbeddedS3Server

        server = EmbeddedS3Server()
        try:
            server.start()
            server.create_bucket(DEMO_BUCKET)
        except RuntimeError as exc:
            server.stop()
            fail(exc)
        with server:
            passed = run(f"s3://{DEMO_BUCKET}/demo-{secrets.token_hex(4)}", server.storage_options)
    raise SystemExit(EXIT_OK if passed else EXIT_FAILED)


# ---------------------------------------------------------------------- ls


@main.command(short_help="List the committed epochs of a location.")
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
            str(len(manifest.nodes)),
            format_bytes(sum(record.size for record in manifest.nodes.values())),
            created,
            escape(manifest.run_id),
            "[bold green]latest[/]" if manifest.epoch == latest else "",
        )
    console.print(table)
    total = sum(record.size for manifest in manifests for record in manifest.nodes.values())
    console.print(
        f"{_count(len(manifests), 'committed epoch')}, {format_bytes(total)} of shards; a job resumes from epoch {latest}"
    )


async def _read_committed_manifests(location: str, options: dict[str, Any]) -> list[EpochManifest]:
    """The manifests of the committed epochs, ascending."""
    from .manager import MultiNodeCheckpointManager

    async with MultiNodeCheckpointManager(location, storage_options=options) as mgr:
        return await mgr.committed_manifests()


# ---------------------------------------------------------------------- gc


@main.command(short_help="Remove what interrupted or losing saves left in a location.")
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
            console.print(f"{verb} {_count(len(keys), noun)}:")
            for key in keys:
                console.print(f"  {escape(key)}", soft_wrap=True)
    if report.kept_recent:
        console.print(
            f"[yellow]kept {_count(report.kept_recent, 'object')} younger than {format_duration(grace)}[/]: "
            "a save may still be writing them"
        )
    if report.skipped_epochs:
        epochs = ", ".join(str(e) for e in report.skipped_epochs)
        console.print(
            f"[yellow]skipped {'epoch' if len(report.skipped_epochs) == 1 else 'epochs'} {epochs}[/]: "
            "the manifest exists but does not parse; left untouched"
        )
    garbage = [
        _count(n, noun) for n, noun in ((len(report.deleted), "object"), (len(report.aborted_uploads), "upload")) if n
    ]
    if not garbage:
        console.print("[green]✓[/] nothing to delete")
    elif dry_run:
        console.print(f"[green]✓[/] dry run: {' and '.join(garbage)} would go; run without --dry-run to remove them")
    else:
        console.print(f"[green]✓[/] removed {' and '.join(garbage)}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


async def _collect_garbage(location: str, options: dict[str, Any], grace: float, dry_run: bool) -> GcReport:
    from .manager import MultiNodeCheckpointManager

    async with MultiNodeCheckpointManager(location, storage_options=options) as mgr:
        return await mgr.gc(grace_period=grace, dry_run=dry_run)


# ---------------------------------------------------------------------- bench

from .bench import bench_command  # noqa: E402  (stdlib and click only at import time)

main.add_command(bench_command, "bench")
