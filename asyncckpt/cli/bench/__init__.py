"""``asyncckpt bench``: asyncckpt against bare aioboto3 and boto3's s3transfer, on one machine.

:func:`~._run.run_bench` starts moto's S3 server on ``127.0.0.1`` as a subprocess of its
own, generates a multi-node numpy state (``nodes`` nodes of ``blobs_per_node``
float32/float64 arrays from a seeded RNG, plus two scalars per node: the same bytes for
every peer) and measures, on the same server and bytes:

``memcpy``
    a fresh ``np.copy`` of the whole state (and a warm ``np.copyto`` into those copies);
``aio_save`` / ``aio_load``
    bare aioboto3 with botocore's default config (SigV4 payload signing over http, a
    CRC32 per upload): one ``upload_fileobj`` per node (multipart threshold and chunk
    size = asyncckpt's part size, ``max_concurrency`` = asyncckpt's) plus a JSON index
    object; loading is ``get_object`` + ``await Body.read()`` of every object;
``s3t_save`` / ``s3t_load``
    boto3's s3transfer (``upload``/``download`` of a ``TransferManager`` with the same
    part size and as many threads), boto3's default config;
``ckpt_save`` / ``ckpt_load`` / ``ckpt_partial`` / ``ckpt_save_async``
    asyncckpt as users get it (``TransferConfig()`` unless knobs are given):
    ``save``, ``load``, ``load_blobs_locally`` of 10% of the blobs, and ``save_async``
    (time until it returns = blocking time; time until the commit = total).

Method (``peers_bench.md``, section 3): one measurement is one fresh client process
(``python -m asyncckpt.cli.bench._child JOB``), which builds the state before the timed
region and prints one JSON line. Each child records wall time,
client CPU (``getrusage`` self + children), the op's peak RSS (``VmHWM`` after resetting
it through ``/proc/self/clear_refs`` just before the op; ``ru_maxrss`` is recorded too,
but a child started by a Python parent inherits the parent's high-water mark in it),
RSS before the op, the server's CPU (``/proc/PID/stat``), the requests the server
logged, and the bytes of the object bodies it sent (its log has each response's size). Loads are verified against SHA-256
digests of the generated state. The peers run interleaved (the order rotates every
repetition) and the table shows medians over the repetitions. Every child runs under
a timeout and the whole run under a time budget: past it, the remaining measurements
are skipped and what was done is reported.

The server gets glibc's ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` tunables
(``env_lab.md`` section 4.6); the clients run with default glibc settings. Loopback only.

``--peers`` runs the benchmark against asyncckpt's peers instead (:mod:`._peers_run`),
with the same method and meters, on moto and on localbucket: torch.save + one PUT / GET +
torch.load, PyTorch DCP over s3fs (save, async_save, load), s3torchconnector
(``S3Checkpoint`` and its DCP writer/reader), torchsnapshot, bare aioboto3, s3transfer and
asyncckpt (save, save_async, load, in-place load and the ``asyncckpt.dcp`` plugin, on numpy
state and on the same bytes as torch tensors), with ratios to the fastest and the leanest
peer and issue 12's targets. The peers are not dependencies of asyncckpt: ``make
bench-peers`` installs them into ``.venv-peers``; elsewhere the ones not installed are
skipped with the reason.

``--scale`` runs another benchmark instead (:mod:`._scale`): what the commit record,
resume, multi-process commits, partial loads and the memory of a save cost as nodes,
blobs and processes grow, with issue 9's targets. ``--incremental`` runs another
(:mod:`._incremental`): the first vs the second save of a state whose arrays are 90%
frozen, with issue 13's targets.

Modules: ``_state`` (ops, the state, settings), ``_ops`` (the measured operations),
``_child`` (a measurement's process), ``_meters`` (``/proc`` and log readings), ``_run``
(the driver), ``_report`` (medians, ratios, targets, the table); ``_peers`` (the peers'
ops and what each needs), ``_peer_ops`` (their measured operations), ``_servers`` (moto and
localbucket), ``_peers_run`` (their driver), ``_peers_report`` (ratios to the fastest and
leanest peer, issue 12's targets, the tables); ``_scale`` (the scale
benchmark's driver), ``_scale_ops`` (its measured operations and their process),
``_scale_log`` (the server's log, request by request), ``_scale_report`` (its targets
and tables).
"""

from __future__ import annotations

from pathlib import Path

import click

from .. import EXIT_ERROR, EXIT_OK, fail, run_coroutine
from ._scale_sizes import DEFAULT_SCALE_BUDGET_S, DEFAULT_SCALE_OP_TIMEOUT_S
from ._state import DEFAULT_BUDGET_S, DEFAULT_OP_TIMEOUT_S, DEFAULT_PEERS_BUDGET_S, OPS, BenchParams

__all__ = ["OPS", "bench"]


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state-mib",
    "--size",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="State size in MiB (the same bytes for every peer).  [default: 192; --quick: 32]",
)
@click.option("--nodes", type=click.IntRange(min=1), default=4, show_default=True, help="Simulated nodes.")
@click.option(
    "--blobs-per-node",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Arrays per node (float32/float64).",
)
@click.option(
    "--reps",
    type=click.IntRange(min=1),
    default=None,
    help="Repetitions (medians are shown).  [default: 3; --quick: 1]",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write every measurement, the medians, ratios and targets here.",
)
@click.option("--quick", is_flag=True, help="A small, fast run: 32 MiB and 1 repetition (explicit options win).")
@click.option(
    "--scale",
    is_flag=True,
    help="Run the scale benchmark instead: commit record, resume, multi-process commit, partial loads and save "
    "memory at 1024 nodes x 1000 blobs, 2-32 processes, 8000 blobs, 64 MiB-1 GiB (--quick: small sizes). "
    "Only --quick, --json, --budget-s and --op-timeout-s apply to it.",
)
@click.option(
    "--incremental",
    is_flag=True,
    help="Run the incremental-save benchmark instead: 10 arrays, 9 frozen; the first vs the second save's wall "
    "time and bytes uploaded (and the second without incremental, and with every array changed). "
    "Only --state-mib, --reps, --quick and --json apply to it.",
)
@click.option(
    "--peers",
    is_flag=True,
    help="Run the peers benchmark instead: torch.save + one PUT, DCP over s3fs (save, async_save, load), "
    "s3torchconnector (S3Checkpoint, DCP writer/reader), torchsnapshot, bare aioboto3, s3transfer and asyncckpt "
    "(save, save_async, load, in-place load, the DCP plugin; numpy state and torch tensors) on each of --servers; "
    "ratios to the fastest and the leanest peer and issue 12's targets. Peers that are not installed are skipped "
    "with the reason (`make bench-peers` installs them into .venv-peers). Applies --state-mib/--size, --nodes, "
    "--blobs-per-node, --reps, --json, --quick, --budget-s and --op-timeout-s.",
)
@click.option(
    "--servers",
    default="moto,localbucket",
    show_default=True,
    help="With --peers: the S3 servers to run on, in order, comma-separated (moto, localbucket), each on 127.0.0.1.",
)
@click.option(
    "--part-size-mib",
    type=click.FloatRange(min=5),
    default=None,
    help="asyncckpt TransferConfig.part_size (also the baselines' part size).  [default: TransferConfig's]",
)
@click.option(
    "--range-size-mib",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="asyncckpt TransferConfig.range_size.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="asyncckpt TransferConfig.max_concurrency (also the baselines').",
)
@click.option(
    "--max-bytes-in-flight-mib",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="asyncckpt TransferConfig.max_bytes_in_flight.",
)
@click.option(
    "--checksum-mode",
    type=click.Choice(["when_required", "when_supported"]),
    default=None,
    help="asyncckpt TransferConfig.checksum_mode.",
)
@click.option("--payload-signing/--no-payload-signing", default=None, help="asyncckpt TransferConfig.payload_signing.")
@click.option(
    "--baseline-part-size-mib",
    type=click.FloatRange(min=5),
    default=None,
    help="Part size of the aioboto3/s3transfer baselines.  [default: asyncckpt's part size]",
)
@click.option(
    "--budget-s",
    type=click.FloatRange(min=1),
    default=None,
    help=f"Total time budget; past it the remaining measurements are skipped.  [default: {DEFAULT_BUDGET_S:g}; "
    f"--scale: {DEFAULT_SCALE_BUDGET_S:g}; --peers: {DEFAULT_PEERS_BUDGET_S:g}, shared evenly by the servers]",
)
@click.option(
    "--op-timeout-s",
    type=click.FloatRange(min=1),
    default=None,
    help=f"Timeout of one measured operation.  [default: {DEFAULT_OP_TIMEOUT_S:g}; --scale: "
    f"{DEFAULT_SCALE_OP_TIMEOUT_S:g}]",
)
def bench(
    state_mib: float | None,
    nodes: int,
    blobs_per_node: int,
    reps: int | None,
    json_path: Path | None,
    quick: bool,
    scale: bool,
    incremental: bool,
    peers: bool,
    servers: str,
    part_size_mib: float | None,
    range_size_mib: float | None,
    max_concurrency: int | None,
    max_bytes_in_flight_mib: float | None,
    checksum_mode: str | None,
    payload_signing: bool | None,
    baseline_part_size_mib: float | None,
    budget_s: float | None,
    op_timeout_s: float | None,
) -> None:
    """Benchmark asyncckpt against bare aioboto3 and boto3's s3transfer on a local S3
    server (moto_server on 127.0.0.1, started and stopped here), on the same bytes.

    Each measurement runs in a fresh process; prints a table of wall time, MB/s, client
    CPU, peak RSS and server CPU with ratios to the baselines, and the targets met or
    missed. Exit code 0 when the benchmark ran (targets are reported, not asserted),
    2 when it could not run.
    """
    from rich.console import Console

    if scale:
        _bench_scale(quick, json_path, budget_s, op_timeout_s)
        return
    if incremental:
        _bench_incremental(state_mib or (32 if quick else 192), reps or (1 if quick else 3), json_path)
        return
    if peers:
        params = BenchParams(
            state_mib=(32 if quick else 192) if state_mib is None else state_mib,
            nodes=nodes,
            blobs_per_node=blobs_per_node,
            reps=(1 if quick else 3) if reps is None else reps,
            budget_s=DEFAULT_PEERS_BUDGET_S if budget_s is None else budget_s,
            op_timeout_s=DEFAULT_OP_TIMEOUT_S if op_timeout_s is None else op_timeout_s,
        )
        _bench_peers(params, [s.strip() for s in servers.split(",") if s.strip()], json_path)
        return
    from ._run import run_bench  # the driver and its report: loaded when the command runs

    if state_mib is None:
        state_mib = 32 if quick else 192
    if reps is None:
        reps = 1 if quick else 3
    console = Console(width=max(Console().width, 200))
    try:
        result = run_coroutine(
            run_bench(
                state_mib=state_mib,
                nodes=nodes,
                blobs_per_node=blobs_per_node,
                reps=reps,
                out_json=json_path,
                console=console,
                part_size_mib=part_size_mib,
                range_size_mib=range_size_mib,
                max_concurrency=max_concurrency,
                max_bytes_in_flight_mib=max_bytes_in_flight_mib,
                checksum_mode=checksum_mode,
                payload_signing=payload_signing,
                baseline_part_size_mib=baseline_part_size_mib,
                budget_s=DEFAULT_BUDGET_S if budget_s is None else budget_s,
                op_timeout_s=DEFAULT_OP_TIMEOUT_S if op_timeout_s is None else op_timeout_s,
            )
        )
    except (RuntimeError, ValueError, OSError) as exc:
        fail(exc)
    ran = any(r.get("n") for r in result["rows"].values())
    raise SystemExit(EXIT_OK if ran else EXIT_ERROR)


def _bench_incremental(state_mib: float, reps: int, json_path: Path | None) -> None:
    """``bench --incremental``: run :func:`~._incremental.run_incremental`."""
    from rich.console import Console

    from ._incremental import run_incremental  # loaded when the command runs

    try:
        run_coroutine(run_incremental(state_mib=state_mib, reps=reps, out_json=json_path, console=Console()))
    except (RuntimeError, ValueError, OSError) as exc:
        fail(exc)
    raise SystemExit(EXIT_OK)


def _bench_peers(params: BenchParams, servers: list[str], json_path: Path | None) -> None:
    """``bench --peers``: run :func:`~._peers_run.run_peers`; exit 0 when asyncckpt and a peer ran on some server."""
    from rich.console import Console

    from ._peers_run import run_peers  # loaded when the command runs

    console = Console(width=max(Console().width, 120))
    try:
        result = run_coroutine(run_peers(servers=servers, params=params, out_json=json_path, console=console))
    except (RuntimeError, ValueError, OSError) as exc:
        fail(exc)
    ran = any(
        row.get("n") for part in result["servers"].values() if part["status"] == "ok" for row in part["rows"].values()
    )
    raise SystemExit(EXIT_OK if ran else EXIT_ERROR)


def _bench_scale(quick: bool, json_path: Path | None, budget_s: float | None, op_timeout_s: float | None) -> None:
    """``bench --scale``: run :func:`~._scale.run_scale`; exit 0 when every section ran."""
    from rich.console import Console

    from ._scale import run_scale  # loaded when the command runs

    console = Console(width=max(Console().width, 160))
    try:
        result = run_coroutine(
            run_scale(
                quick=quick,
                out_json=json_path,
                console=console,
                budget_s=DEFAULT_SCALE_BUDGET_S if budget_s is None else budget_s,
                op_timeout_s=DEFAULT_SCALE_OP_TIMEOUT_S if op_timeout_s is None else op_timeout_s,
            )
        )
    except (RuntimeError, ValueError, OSError) as exc:
        fail(exc)
    measured = [t for t in result["targets"] if t["met"] is not None]
    raise SystemExit(EXIT_OK if measured else EXIT_ERROR)
