"""The ``asyncckpt`` command line (also ``python -m asyncckpt``).

Each command is one function of the :func:`main` group. This module is the only place
that creates an event loop (:func:`run_coroutine`). Exit codes, for every command:

* 0: success;
* 1: the command ran and its check failed (e.g. the demo's state comparison);
* 2: it could not run: a usage error, or a storage/environment error, printed as
  one red line without a traceback.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from . import __version__
from .config import MiB, TransferConfig
from .errors import CheckpointError
from .storage import parse_location, storage_for

__all__ = ["main", "demo", "run_coroutine", "EXIT_OK", "EXIT_FAILED", "EXIT_ERROR"]

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
@transfer_options
def demo(
    url: str | None,
    endpoint_url: str | None,
    nodes: int,
    epochs: int,
    crash_after: int,
    mib_per_node: float,
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
      asyncckpt demo --url /tmp/ckpt-demo             # a local directory
      asyncckpt demo --url s3://my-bucket/demo --endpoint-url http://127.0.0.1:9000
    """
    if crash_after >= epochs:
        raise click.BadParameter(f"must be below --epochs ({epochs})", param_hint="'--crash-after'")
    if url is None and endpoint_url is not None:
        raise click.UsageError("--endpoint-url needs --url s3://bucket/prefix (without --url the demo starts its own S3 server)")
    config = make_transfer_config(part_size_mib, checksum_mode)
    from .demo import run_demo  # numpy work lives there; keep `asyncckpt --help` quick

    def run(location: str, options: dict[str, Any]) -> bool:
        result = run_coroutine(
            run_demo(
                location,
                nodes=nodes,
                epochs=epochs,
                crash_after=crash_after,
                mib_per_node=mib_per_node,
                storage_options=options,
                config=config,
                console=Console(),
            )
        )
        return result.passed

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
