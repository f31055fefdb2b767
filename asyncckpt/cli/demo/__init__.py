"""``asyncckpt demo``: a simulated multi-node training job that checkpoints, crashes and resumes.

The job runs in this process (:func:`run_demo`) or in spawned worker processes
(:func:`run_multiprocess_demo`), on the location given with ``--url`` or, by default, on
an embedded S3 server (:class:`~asyncckpt.testing.s3_server.ThreadedS3Server`) with a
fresh prefix of bucket ``asyncckpt-demo``, which is removed at the end.

Modules: ``_model`` (each node's state, an epoch of training, comparisons), ``_single``
(one process), ``_multi`` (several processes), ``_render`` (results and their printing).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Coroutine
from typing import Any

import click
from rich.console import Console

from asyncckpt import StorageError
from asyncckpt.storage import parse_location
from asyncckpt.testing.s3_server import ThreadedS3Server, create_bucket, delete_bucket

from .. import EXIT_FAILED, EXIT_OK, fail, run_coroutine
from .._options import (
    endpoint_option,
    make_transfer_config,
    node_names,
    storage_options_for,
    transfer_options,
    validate_location,
)
from ._model import compare_workspaces, init_workspace, train_epoch
from ._multi import run_multiprocess_demo
from ._render import DemoResult, TransferStats
from ._single import run_demo

__all__ = [
    "DEMO_BUCKET",
    "DemoResult",
    "TransferStats",
    "compare_workspaces",
    "demo",
    "init_workspace",
    "node_names",
    "run_demo",
    "run_multiprocess_demo",
    "train_epoch",
]

DEMO_BUCKET = "asyncckpt-demo"

Job = Callable[[str, dict[str, Any]], Coroutine[Any, Any, DemoResult]]


@click.command(short_help="Simulate a multi-node training job: checkpoint, crash, resume, verify.")
@click.option(
    "--url",
    metavar="LOCATION",
    default=None,
    callback=validate_location,
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

    def job(location: str, options: dict[str, Any]) -> Coroutine[Any, Any, DemoResult]:
        if processes == 1:
            return run_demo(
                location,
                nodes=nodes,
                epochs=epochs,
                crash_after=crash_after,
                mib_per_node=mib_per_node,
                storage_options=options,
                config=config,
                console=Console(),
            )
        return run_multiprocess_demo(
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
        )

    if url is not None:
        result = run_coroutine(job(url, storage_options_for(url, endpoint_url)))
    else:
        server = ThreadedS3Server()
        try:
            server.start()
        except RuntimeError as exc:
            fail(exc)
        with server:
            result = run_coroutine(_on_embedded_server(server, job))
    raise SystemExit(EXIT_OK if result.passed else EXIT_FAILED)


async def _on_embedded_server(server: ThreadedS3Server, job: Job) -> DemoResult:
    """Run ``job`` on a fresh prefix of :data:`DEMO_BUCKET` on ``server``; the bucket is
    removed afterwards when it was created here (moto then frees its memory)."""
    async with server.admin_client() as admin:
        try:
            created = await create_bucket(admin, DEMO_BUCKET)
        except RuntimeError as exc:
            raise StorageError(f"embedded S3 server: {exc}", bucket=DEMO_BUCKET) from None
        try:
            return await job(f"s3://{DEMO_BUCKET}/demo-{secrets.token_hex(4)}", server.storage_options)
        finally:
            if created:
                await delete_bucket(admin, DEMO_BUCKET)
