"""What the commands share: click options, their parameter types, and formatting helpers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from asyncckpt import EpochManifest, MiB, TransferConfig
from asyncckpt.storage import parse_location, storage_for

from . import fail

__all__ = [
    "Duration",
    "count",
    "endpoint_option",
    "epoch_summary",
    "existing_location_options",
    "format_bytes",
    "format_duration",
    "format_metrics",
    "format_time",
    "json_option",
    "make_transfer_config",
    "node_names",
    "print_json",
    "storage_options_for",
    "transfer_options",
    "validate_location",
]

F = TypeVar("F", bound=Callable[..., Any])


# ---------------------------------------------------------------------- options


def validate_location(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback: reject a malformed location before anything starts (builds the storage, no I/O)."""
    if value is None:
        return None
    try:
        storage_for(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def transfer_options(func: F) -> F:
    """The options that build a :class:`~asyncckpt.TransferConfig` (see :func:`make_transfer_config`)."""
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
    """``--endpoint-url``: the S3 endpoint of an s3:// location (see :func:`storage_options_for`)."""
    return click.option(
        "--endpoint-url",
        metavar="URL",
        default=None,
        help="S3 endpoint for s3:// locations, e.g. http://127.0.0.1:9000 for the MinIO of "
        "docker-compose.yml. Default: AWS_ENDPOINT_URL or AWS S3 itself; credentials and "
        "region always come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_PROFILE...).",
    )(func)


def storage_options_for(url: str, endpoint_url: str | None) -> dict[str, Any]:
    """The ``storage_options`` of ``url`` given ``--endpoint-url`` (a usage error unless ``url`` is s3://)."""
    if endpoint_url is None:
        return {}
    if parse_location(url)[0] != "s3":
        raise click.BadParameter("applies to s3:// locations only", param_hint="'--endpoint-url'")
    return {"endpoint_url": endpoint_url}


def existing_location_options(location: str, endpoint_url: str | None, command: str) -> dict[str, Any]:
    """Check the LOCATION of a command that reads what is already there and return its
    ``storage_options``; a bad one ends the command with one red line (exit 2).

    Refused: a malformed location, ``memory://`` (it lives inside one process), and a
    directory that does not exist or is a file, so that a mistyped path is an error and
    never "no committed epoch". A missing bucket is found by the command's first
    request (a :class:`~asyncckpt.StorageError` naming it).
    """
    try:
        kind, where, _ = parse_location(location)
        storage_for(location)  # bucket-name rules and the like
    except ValueError as exc:
        fail(f"invalid location: {exc}")
    if kind == "memory":
        fail(
            f"{location}: a memory:// location lives inside one process; `asyncckpt {command}` needs s3:// or a directory"
        )
    if kind == "file":
        path = Path(where).expanduser()
        if not path.exists():
            fail(f"{location}: no such directory")
        if not path.is_dir():
            fail(f"{location}: not a directory")
    return storage_options_for(location, endpoint_url)


def json_option(func: F) -> F:
    """``--json``: print one JSON document on stdout instead of tables (see :func:`print_json`)."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print one JSON document on stdout (nothing else goes there; errors still go to stderr).",
    )(func)


def print_json(document: Any) -> None:
    """Print ``document`` as the command's one JSON document on stdout."""
    click.echo(json.dumps(document, indent=2, sort_keys=False))


class Duration(click.ParamType[float]):
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


# ---------------------------------------------------------------------- formatting and names


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


def format_time(unix: float) -> str:
    """Seconds since the epoch as UTC, to the second: ``"2025-01-31 12:00:00"``."""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``{"loss": 0.31, "acc": 0.9}`` -> ``"acc=0.9 loss=0.31"`` (sorted by name)."""
    return " ".join(f"{name}={value:g}" for name, value in sorted(metrics.items()))


def epoch_summary(manifest: EpochManifest) -> dict[str, Any]:
    """What the JSON of ``ls``, ``show`` and ``verify`` says of a committed epoch."""
    return {
        "epoch": manifest.epoch,
        "nodes": manifest.node_count,
        "bytes": manifest.total_bytes,
        "reused_bytes": manifest.reused_bytes,
        "created": datetime.fromtimestamp(manifest.created_unix, UTC).isoformat(timespec="milliseconds"),
        "created_unix": manifest.created_unix,
        "run_id": manifest.run_id,
        "writer_id": manifest.writer_id,
        "metrics": dict(manifest.metrics),
    }


def count(n: int, noun: str) -> str:
    """``count(1, "object")`` -> ``"1 object"``, ``count(3, "object")`` -> ``"3 objects"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def node_names(nodes: int) -> list[str]:
    """The nodes of a simulated job (demo and bench): ``["trainer_0", "trainer_1", ...]``."""
    return [f"trainer_{i}" for i in range(nodes)]
