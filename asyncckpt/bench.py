"""``asyncckpt bench``: asyncckpt against bare aioboto3 and boto3's s3transfer, on one machine.

:func:`run_bench` starts moto's S3 server (``moto_server``) on ``127.0.0.1`` as a
subprocess of its own, generates a multi-node numpy state (``nodes`` nodes of
``blobs_per_node`` float32/float64 arrays from a seeded RNG, plus two scalars per
node: the same bytes for every peer) and measures, on the same server and bytes:

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

Method (``/work/shared/reference/peers_bench.md`` section 3): one measurement is one
fresh client process (``python -m asyncckpt.bench --child OP ...``), which builds the
state before the timed region and prints one JSON line. Each child records wall time,
client CPU (``getrusage`` self + children), the op's peak RSS (``VmHWM`` after resetting
it through ``/proc/self/clear_refs`` just before the op; ``ru_maxrss`` is recorded too,
but a child started by a Python parent inherits the parent's high-water mark in it),
RSS before the op, the server's CPU (``/proc/PID/stat``), the requests the server
logged, and the body bytes asyncckpt received. Loads are verified against SHA-256
digests of the generated state. The peers run interleaved (the order rotates every
repetition) and the table shows medians over the repetitions. Every child runs under
a timeout and the whole run under a time budget: past it, the remaining measurements
are skipped and what was done is reported.

The server gets glibc's ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` tunables
(``env_lab.md`` section 4.6); the clients run with default glibc settings. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import hashlib
import io
import json
import math
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["OPS", "run_bench", "bench_command", "child_main"]

MiB = 1 << 20
BUCKET = "asyncckpt-bench"
REGION = "us-east-1"
EPOCH = 1
SCALARS = {"step": 1000, "lr": 3e-4}
DEFAULT_BUDGET_S = 900.0
DEFAULT_OP_TIMEOUT_S = 120.0
PARTIAL_FRACTION = 0.10
SERVER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Environment that would change what "botocore's default config" means, or point a
# client elsewhere: removed from every child's (and the server's) environment.
_SCRUBBED_ENV_PREFIXES = ("AWS_", "MALLOC_")
_SCRUBBED_ENV = ("GLIBC_TUNABLES",)


@dataclass(frozen=True)
class OpSpec:
    """One measured operation: which peer, and whether it writes or reads."""

    name: str
    peer: str  # memcpy | aio | s3t | ckpt
    kind: str  # copy | save | load | partial
    label: str
    group: str  # ops of a group run in order, on one prefix


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("memcpy", "memcpy", "copy", "numpy fresh np.copy of the state", "memcpy"),
        OpSpec("aio_save", "aio", "save", "aioboto3 upload_fileobj (default cfg)", "aio"),
        OpSpec("aio_load", "aio", "load", "aioboto3 get_object + read()", "aio"),
        OpSpec("s3t_save", "s3t", "save", "boto3 s3transfer upload", "s3t"),
        OpSpec("s3t_load", "s3t", "load", "boto3 s3transfer download", "s3t"),
        OpSpec("ckpt_save", "ckpt", "save", "asyncckpt save", "ckpt"),
        OpSpec("ckpt_load", "ckpt", "load", "asyncckpt load", "ckpt"),
        OpSpec("ckpt_partial", "ckpt", "partial", "asyncckpt load_blobs_locally (10%)", "ckpt"),
        OpSpec("ckpt_save_async", "ckpt", "save", "asyncckpt save_async", "ckpt_async"),
    )
}
GROUPS: dict[str, list[str]] = {}
for _spec in OPS.values():
    GROUPS.setdefault(_spec.group, []).append(_spec.name)
_GROUP_ORDER = list(GROUPS)


# ============================================================================ the state


@dataclass(frozen=True)
class BlobSpec:
    node: str
    name: str
    dtype: str
    count: int
    seed: int

    @property
    def nbytes(self) -> int:
        return self.count * (4 if self.dtype == "float32" else 8)


def node_names(nodes: int) -> list[str]:
    return [f"trainer_{i}" for i in range(nodes)]


def state_layout(state_mib: float, nodes: int, blobs_per_node: int) -> list[BlobSpec]:
    """Every array of the state: equal byte sizes, float32 and float64 alternating."""
    per_blob = int(state_mib * MiB) // (nodes * blobs_per_node)
    per_blob -= per_blob % 8
    if per_blob < 8:
        raise ValueError(f"state of {state_mib} MiB is too small for {nodes}x{blobs_per_node} blobs")
    out = []
    for i, node in enumerate(node_names(nodes)):
        for j in range(blobs_per_node):
            dtype = "float32" if j % 2 == 0 else "float64"
            count = per_blob // (4 if dtype == "float32" else 8)
            out.append(BlobSpec(node, f"w{j:02d}", dtype, count, 1000 + 1000 * i + j))
    return out


def build_state(layout: Sequence[BlobSpec]) -> dict[str, dict[str, Any]]:
    """The workspaces: ``{node: {blob: ndarray, "step": 1000, "lr": 3e-4}}`` (seeded)."""
    import numpy as np

    state: dict[str, dict[str, Any]] = {}
    for blob in layout:
        rng = np.random.default_rng(blob.seed)
        arr = rng.standard_normal(blob.count, dtype=np.dtype(blob.dtype))
        state.setdefault(blob.node, dict(SCALARS))[blob.name] = arr
    return state


def partial_selection(layout: Sequence[BlobSpec], fraction: float = PARTIAL_FRACTION) -> list[BlobSpec]:
    """About ``fraction`` of the blobs (at least one), spread evenly over the nodes."""
    k = max(1, round(fraction * len(layout)))
    return [layout[int(i * len(layout) / k)] for i in range(k)]


def _digest(arr: Any) -> str:
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


# ============================================================================ child side
# Everything below runs inside one fresh ``python -m asyncckpt.bench --child OP`` process.


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_self() -> float:
    user, system = _cpu_split()
    return user + system


def _cpu_split() -> tuple[float, float]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + c.ru_utime, s.ru_stime + c.ru_stime


def _faults() -> int:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_minflt + s.ru_majflt + c.ru_minflt + c.ru_majflt


def _proc_cpu(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3})')


def parse_server_log(text: str) -> dict[str, Any]:
    """Count moto's (werkzeug's) request lines: total, per method, per status."""
    methods: dict[str, int] = {}
    statuses: dict[str, int] = {}
    multipart_parts = 0
    total = 0
    for line in _ANSI.sub("", text).splitlines():
        m = _REQUEST.search(line)
        if not m:
            continue
        method, path, status = m.groups()
        total += 1
        methods[method] = methods.get(method, 0) + 1
        statuses[status] = statuses.get(status, 0) + 1
        if method == "PUT" and "partNumber=" in path:
            multipart_parts += 1
    return {"total": total, "methods": methods, "statuses": statuses, "upload_parts": multipart_parts}


class Meter:
    """Measures one operation of a child process (see the module docstring)."""

    def __init__(self, server_pid: int | None, server_log: str | None):
        self.server_pid = server_pid
        self.server_log = server_log
        self.laps: dict[str, dict[str, Any]] = {}

    def _log_size(self) -> int | None:
        try:
            return os.path.getsize(self.server_log) if self.server_log else None
        except OSError:
            return None

    def start(self) -> None:
        gc.collect()
        self.loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.rss_before_kib = _status_kib("VmRSS")
        self.ru_maxrss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.hwm_reset = _reset_hwm()
        self.log0 = self._log_size()
        self.srv0 = _proc_cpu(self.server_pid)
        self.faults0 = _faults()
        self.split0 = _cpu_split()
        self.cpu0 = _cpu_self()
        self.t0 = time.perf_counter()

    def lap(self, name: str) -> None:
        """An intermediate reading (e.g. when ``save_async`` returns)."""
        t = time.perf_counter()
        cpu = _cpu_self()
        self.laps[name] = {"wall_s": t - self.t0, "cpu_s": cpu - self.cpu0, "peak_rss_kib": _status_kib("VmHWM")}

    def stop(self) -> None:
        self.t1 = time.perf_counter()
        self.cpu1 = _cpu_self()
        self.split1 = _cpu_split()
        self.faults1 = _faults()
        self.srv1 = _proc_cpu(self.server_pid)
        self.hwm_kib = _status_kib("VmHWM")
        self.ru_maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.log1 = self._log_size()

    def result(self) -> dict[str, Any]:
        requests = None
        if self.log0 is not None and self.log1 is not None and self.server_log:
            with open(self.server_log, "rb") as f:
                f.seek(self.log0)
                requests = parse_server_log(f.read(self.log1 - self.log0).decode("utf-8", "replace"))
        peak = self.hwm_kib if self.hwm_reset and self.hwm_kib else self.ru_maxrss_kib
        return {
            "wall_s": self.t1 - self.t0,
            "cpu_s": self.cpu1 - self.cpu0,
            "cpu_user_s": self.split1[0] - self.split0[0],
            "cpu_sys_s": self.split1[1] - self.split0[1],
            "page_faults": self.faults1 - self.faults0,
            "server_cpu_s": (self.srv1 - self.srv0) if self.srv0 is not None and self.srv1 is not None else None,
            "rss_before_mib": (self.rss_before_kib or 0) / 1024,
            "peak_rss_mib": (peak or 0) / 1024,
            "peak_rss_source": "VmHWM" if self.hwm_reset and self.hwm_kib else "ru_maxrss",
            "ru_maxrss_mib": self.ru_maxrss_kib / 1024,
            "ru_maxrss_before_mib": self.ru_maxrss_before_kib / 1024,
            "requests": requests,
            "laps": self.laps,
            "loadavg_1m": self.loadavg,
        }


class ConcatReader(io.RawIOBase):
    """A seekable read-only file over several buffers, without copying them up front.

    ``read(n)`` returns ``n`` bytes (one copy, as ``BytesIO.read`` would make): the
    cheapest honest way to hand a node's arrays to ``upload_fileobj``.
    """

    def __init__(self, buffers: Sequence[Any]):
        super().__init__()
        self._views = [memoryview(b).cast("B") for b in buffers]
        self._starts: list[int] = []
        total = 0
        for v in self._views:
            self._starts.append(total)
            total += v.nbytes
        self._size = total
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._size - self._pos
        end = min(self._size, self._pos + size)
        pieces = []
        pos = self._pos
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end and i < len(self._views):
            start = self._starts[i]
            view = self._views[i]
            lo, hi = pos - start, min(view.nbytes, end - start)
            if hi > lo:
                pieces.append(view[lo:hi])
                pos += hi - lo
            i += 1
        self._pos = pos
        return b"".join(pieces)

    def readinto(self, b: Any) -> int:
        data = self.read(len(memoryview(b).cast("B")))
        memoryview(b).cast("B")[: len(data)] = data
        return len(data)


def _bare_index(layout: Sequence[BlobSpec], prefix: str) -> dict[str, Any]:
    """What a bare implementation stores next to the node objects to decode them."""
    nodes: dict[str, Any] = {}
    for blob in layout:
        entry = nodes.setdefault(
            blob.node, {"key": f"{prefix}/{blob.node}.bin", "blobs": {}, "scalars": SCALARS, "size": 0}
        )
        entry["blobs"][blob.name] = [entry["size"], blob.dtype, blob.count]
        entry["size"] += blob.nbytes
    return {"nodes": nodes}


def _decode_bare(index: Mapping[str, Any], bodies: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    import numpy as np

    out: dict[str, dict[str, Any]] = {}
    for node, entry in index["nodes"].items():
        ws = dict(entry["scalars"])
        for name, (offset, dtype, count) in entry["blobs"].items():
            ws[name] = np.frombuffer(bodies[node], dtype=dtype, count=count, offset=offset)
        out[node] = ws
    return out


def _verify(
    state: Mapping[str, Mapping[str, Any]], expected: Mapping[str, Any], wanted: Sequence[BlobSpec]
) -> str | None:
    """``None`` when every wanted blob (and each node's scalars) matches, else what is wrong."""
    for blob in wanted:
        arr = state.get(blob.node, {}).get(blob.name)
        if arr is None:
            return f"{blob.node}/{blob.name} missing"
        if str(arr.dtype) != blob.dtype or arr.size != blob.count:
            return f"{blob.node}/{blob.name}: dtype/size {arr.dtype}/{arr.size}"
        if _digest(arr) != expected[f"{blob.node}/{blob.name}"]:
            return f"{blob.node}/{blob.name}: SHA-256 mismatch"
    return None


def _verify_scalars(state: Mapping[str, Mapping[str, Any]], nodes: Sequence[str]) -> str | None:
    for node in nodes:
        for key, value in SCALARS.items():
            if state.get(node, {}).get(key) != value:
                return f"{node}/{key} != {value!r}"
    return None


@dataclass
class ChildContext:
    args: argparse.Namespace
    layout: list[BlobSpec]
    meter: Meter

    @property
    def state_bytes(self) -> int:
        return sum(b.nbytes for b in self.layout)

    @property
    def nodes(self) -> list[str]:
        return list(dict.fromkeys(b.node for b in self.layout))

    def expected(self) -> dict[str, str]:
        with open(self.args.expected) as f:
            return json.load(f)

    def transfer_config(self) -> Any:
        from .config import TransferConfig

        kwargs: dict[str, Any] = {}
        a = self.args
        if a.part_size_mib is not None:
            kwargs["part_size"] = int(a.part_size_mib * MiB)
        if a.range_size_mib is not None:
            kwargs["range_size"] = int(a.range_size_mib * MiB)
        if a.max_concurrency is not None:
            kwargs["max_concurrency"] = a.max_concurrency
        if a.max_bytes_in_flight_mib is not None:
            kwargs["max_bytes_in_flight"] = int(a.max_bytes_in_flight_mib * MiB)
        if a.checksum_mode is not None:
            kwargs["checksum_mode"] = a.checksum_mode
        if a.payload_signing is not None:
            kwargs["payload_signing"] = a.payload_signing == "on"
        return TransferConfig(**kwargs)

    def baseline_part_size(self) -> int:
        if self.args.baseline_part_size_mib is not None:
            return int(self.args.baseline_part_size_mib * MiB)
        return int(self.transfer_config().part_size)

    def baseline_concurrency(self) -> int:
        return int(self.transfer_config().max_concurrency)

    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.args.endpoint, "region_name": REGION, "addressing_style": "path"}

    def location(self) -> str:
        return f"s3://{self.args.bucket}/{self.args.prefix}"


# ---------------------------------------------------------------------------- the ops


def op_prep(ctx: ChildContext) -> dict[str, Any]:
    """Not measured against anything: build the state once and write its digests."""
    t0 = time.perf_counter()
    state = build_state(ctx.layout)
    build_s = time.perf_counter() - t0
    digests = {f"{b.node}/{b.name}": _digest(state[b.node][b.name]) for b in ctx.layout}
    with open(ctx.args.expected, "w") as f:
        json.dump(digests, f)
    return {"build_state_s": build_s, "blobs": len(digests), "state_bytes": ctx.state_bytes}


def op_memcpy(ctx: ChildContext) -> dict[str, Any]:
    import numpy as np

    state = build_state(ctx.layout)
    arrays = [(b.node, b.name) for b in ctx.layout]
    ctx.meter.start()
    copies = {key: np.copy(state[key[0]][key[1]]) for key in arrays}
    ctx.meter.stop()
    t0 = time.perf_counter()
    for key in arrays:
        np.copyto(copies[key], state[key[0]][key[1]])
    warm = time.perf_counter() - t0
    return {"bytes": ctx.state_bytes, "warm_copyto_s": warm}


def _aio_client(ctx: ChildContext) -> Any:
    import aioboto3
    from aiobotocore.config import AioConfig

    # botocore's defaults (checksums when_supported, payload signing over http), path style
    config = AioConfig(s3={"addressing_style": "path"}, max_pool_connections=ctx.baseline_concurrency())
    return aioboto3.Session().client("s3", endpoint_url=ctx.args.endpoint, region_name=REGION, config=config)


async def op_aio_save(ctx: ChildContext) -> dict[str, Any]:
    from boto3.s3.transfer import TransferConfig as S3TransferConfig

    state = build_state(ctx.layout)
    index = _bare_index(ctx.layout, ctx.args.prefix)
    part = ctx.baseline_part_size()
    tcfg = S3TransferConfig(
        multipart_threshold=part, multipart_chunksize=part, max_concurrency=ctx.baseline_concurrency()
    )
    bucket = ctx.args.bucket
    async with _aio_client(ctx) as client:
        ctx.meter.start()
        uploads = [
            client.upload_fileobj(
                ConcatReader([state[node][name] for name in entry["blobs"]]), bucket, entry["key"], Config=tcfg
            )
            for node, entry in index["nodes"].items()
        ]
        uploads.append(
            client.put_object(Bucket=bucket, Key=f"{ctx.args.prefix}/index.json", Body=json.dumps(index).encode())
        )
        await asyncio.gather(*uploads)
        ctx.meter.stop()
    return {"bytes": ctx.state_bytes, "part_size": part}


async def op_aio_load(ctx: ChildContext) -> dict[str, Any]:
    bucket = ctx.args.bucket
    index_guess = _bare_index(ctx.layout, ctx.args.prefix)  # keys follow a convention

    async with _aio_client(ctx) as client:

        async def get(key: str) -> bytes:
            response = await client.get_object(Bucket=bucket, Key=key)
            return await response["Body"].read()

        ctx.meter.start()
        keys = [f"{ctx.args.prefix}/index.json"] + [e["key"] for e in index_guess["nodes"].values()]
        bodies = await asyncio.gather(*(get(k) for k in keys))
        index = json.loads(bodies[0])
        state = _decode_bare(index, dict(zip(index["nodes"], bodies[1:])))
        ctx.meter.stop()
    problem = _verify(state, ctx.expected(), ctx.layout) or _verify_scalars(state, ctx.nodes)
    return {"bytes": ctx.state_bytes, "verified": problem is None, "problem": problem}


def _s3t(ctx: ChildContext) -> tuple[Any, Any]:
    import boto3
    from boto3.s3.transfer import TransferConfig as S3TransferConfig
    from boto3.s3.transfer import create_transfer_manager
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", endpoint_url=ctx.args.endpoint, region_name=REGION, config=Config(s3={"addressing_style": "path"})
    )
    part = ctx.baseline_part_size()
    tcfg = S3TransferConfig(
        multipart_threshold=part, multipart_chunksize=part, max_concurrency=ctx.baseline_concurrency()
    )
    return client, create_transfer_manager(client, tcfg)


def op_s3t_save(ctx: ChildContext) -> dict[str, Any]:
    state = build_state(ctx.layout)
    index = _bare_index(ctx.layout, ctx.args.prefix)
    client, manager = _s3t(ctx)
    bucket = ctx.args.bucket
    with manager:
        ctx.meter.start()
        futures = [
            manager.upload(ConcatReader([state[node][name] for name in entry["blobs"]]), bucket, entry["key"])
            for node, entry in index["nodes"].items()
        ]
        client.put_object(Bucket=bucket, Key=f"{ctx.args.prefix}/index.json", Body=json.dumps(index).encode())
        for future in futures:
            future.result()
        ctx.meter.stop()
    client.close()
    return {"bytes": ctx.state_bytes, "part_size": ctx.baseline_part_size()}


def op_s3t_load(ctx: ChildContext) -> dict[str, Any]:
    index_guess = _bare_index(ctx.layout, ctx.args.prefix)
    client, manager = _s3t(ctx)
    bucket = ctx.args.bucket
    with manager:
        ctx.meter.start()
        outs = {node: io.BytesIO() for node in index_guess["nodes"]}
        futures = [manager.download(bucket, e["key"], outs[node]) for node, e in index_guess["nodes"].items()]
        index = json.loads(client.get_object(Bucket=bucket, Key=f"{ctx.args.prefix}/index.json")["Body"].read())
        for future in futures:
            future.result()
        state = _decode_bare(index, {node: out.getbuffer() for node, out in outs.items()})
        ctx.meter.stop()
    client.close()
    problem = _verify(state, ctx.expected(), ctx.layout) or _verify_scalars(state, ctx.nodes)
    return {"bytes": ctx.state_bytes, "verified": problem is None, "problem": problem}


class _ReceivedBytes:
    """Counts the body bytes asyncckpt's S3 backend reports receiving (instrumentation only)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self.installed = False

    def install(self) -> None:
        from .storage import _s3 as s3mod

        original = getattr(s3mod, "record_request", None)
        if original is None:
            return

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.bytes += int(kwargs.get("received", 0) or 0)
            self.requests += 1
            return original(*args, **kwargs)

        s3mod.record_request = counting  # type: ignore[assignment]
        self.installed = True


async def op_ckpt_save(ctx: ChildContext) -> dict[str, Any]:
    from .manager import MultiNodeCheckpointManager

    state = build_state(ctx.layout)
    config = ctx.transfer_config()
    async with MultiNodeCheckpointManager(ctx.location(), storage_options=ctx.storage_options(), config=config) as mgr:
        await mgr.init(state)
        ctx.meter.start()
        await mgr.save(EPOCH)
        ctx.meter.stop()
        report = await mgr.report_checkpoint_stats("checkpoint_save")
    return {"bytes": ctx.state_bytes, "report": _short_report(report), "config": _config_json(config)}


async def op_ckpt_load(ctx: ChildContext) -> dict[str, Any]:
    from .manager import MultiNodeCheckpointManager

    counter = _ReceivedBytes()
    counter.install()
    config = ctx.transfer_config()
    async with MultiNodeCheckpointManager(ctx.location(), storage_options=ctx.storage_options(), config=config) as mgr:
        await mgr.init(ctx.nodes)
        ctx.meter.start()
        await mgr.load(EPOCH)
        ctx.meter.stop()
        report = await mgr.report_checkpoint_stats("checkpoint_load")
        state = {node: mgr.workspace(node) for node in ctx.nodes}
        problem = _verify(state, ctx.expected(), ctx.layout) or _verify_scalars(state, ctx.nodes)
    return {
        "bytes": ctx.state_bytes,
        "verified": problem is None,
        "problem": problem,
        "received_bytes": counter.bytes if counter.installed else None,
        "report": _short_report(report),
    }


async def op_ckpt_partial(ctx: ChildContext) -> dict[str, Any]:
    from .manager import MultiNodeCheckpointManager

    wanted = partial_selection(ctx.layout)
    names = [f"{b.node}/{b.name}" for b in wanted]
    counter = _ReceivedBytes()
    counter.install()
    config = ctx.transfer_config()
    session: dict[str, Any] = {}
    async with MultiNodeCheckpointManager(ctx.location(), storage_options=ctx.storage_options(), config=config) as mgr:
        await mgr.init(ctx.nodes)
        ctx.meter.start()
        found = await mgr.load_blobs_locally(ctx.nodes, names, EPOCH, session)
        ctx.meter.stop()
        report = await mgr.report_checkpoint_stats("checkpoint_partial_load")
    nested: dict[str, dict[str, Any]] = {}
    for key, value in session.items():
        node, _, blob = key.partition("/")
        nested.setdefault(node, {})[blob] = value
    problem = None if found else "load_blobs_locally returned False"
    problem = problem or _verify(nested, ctx.expected(), wanted)
    if problem is None and set(session) != set(names):
        problem = f"session holds {sorted(session)}, expected {names}"
    requested = sum(b.nbytes for b in wanted)
    return {
        "bytes": requested,
        "requested_bytes": requested,
        "report_bytes": report.get("bytes"),
        "received_bytes": counter.bytes if counter.installed else None,
        "blobs": names,
        "verified": problem is None,
        "problem": problem,
        "report": _short_report(report),
    }


async def op_ckpt_save_async(ctx: ChildContext) -> dict[str, Any]:
    from .manager import MultiNodeCheckpointManager

    if not callable(getattr(MultiNodeCheckpointManager, "save_async", None)):
        return {"status": "n/a", "reason": "MultiNodeCheckpointManager.save_async does not exist in this version"}
    state = build_state(ctx.layout)
    config = ctx.transfer_config()
    async with MultiNodeCheckpointManager(ctx.location(), storage_options=ctx.storage_options(), config=config) as mgr:
        await mgr.init(state)
        ctx.meter.start()
        handle = await mgr.save_async(EPOCH)
        ctx.meter.lap("blocking")
        await _wait_handle(handle)
        ctx.meter.stop()
        report = await mgr.report_checkpoint_stats("checkpoint_save")
        # A trainer checkpoints again and again: a second save_async in the same
        # process shows the steady state (staging buffers warm). Not part of the
        # measured op above; timed on its own.
        t0 = time.perf_counter()
        handle2 = await mgr.save_async(EPOCH + 1)
        blocking2 = time.perf_counter() - t0
        await _wait_handle(handle2)
        total2 = time.perf_counter() - t0
    return {
        "bytes": ctx.state_bytes,
        "report": _short_report(report),
        "config": _config_json(config),
        "handle_blocking_s": getattr(handle, "blocking_seconds", None),
        "second_blocking_s": blocking2,
        "second_total_s": total2,
    }


async def _wait_handle(handle: Any) -> None:
    waiter = getattr(handle, "wait", None)
    if callable(waiter):
        await waiter()
    else:
        await handle


def _short_report(report: Mapping[str, Any]) -> dict[str, Any]:
    nodes = report.get("nodes") or {}
    return {
        "seconds": report.get("seconds"),
        "bytes": report.get("bytes"),
        "slowest_node": report.get("slowest_node"),
        "requests": sum(int(n.get("requests", 0)) for n in nodes.values()),
        "retries": sum(int(n.get("retries", 0)) for n in nodes.values()),
    }


def _config_json(config: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(config)


CHILD_OPS: dict[str, Callable[[ChildContext], Any]] = {
    "prep": op_prep,
    "memcpy": op_memcpy,
    "aio_save": op_aio_save,
    "aio_load": op_aio_load,
    "s3t_save": op_s3t_save,
    "s3t_load": op_s3t_load,
    "ckpt_save": op_ckpt_save,
    "ckpt_load": op_ckpt_load,
    "ckpt_partial": op_ckpt_partial,
    "ckpt_save_async": op_ckpt_save_async,
}


def _child_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m asyncckpt.bench", description="Run ONE measured op; print one JSON line."
    )
    p.add_argument("--child", required=True, choices=sorted(CHILD_OPS))
    p.add_argument("--endpoint", default=None)
    p.add_argument("--bucket", default=BUCKET)
    p.add_argument("--prefix", default="bench")
    p.add_argument("--server-pid", type=int, default=None)
    p.add_argument("--server-log", default=None)
    p.add_argument("--expected", required=True, help="JSON file of SHA-256 digests (written by --child prep)")
    p.add_argument("--state-mib", type=float, default=192)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--blobs-per-node", type=int, default=8)
    p.add_argument("--part-size-mib", type=float, default=None)
    p.add_argument("--range-size-mib", type=float, default=None)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--max-bytes-in-flight-mib", type=float, default=None)
    p.add_argument("--checksum-mode", choices=["when_required", "when_supported"], default=None)
    p.add_argument("--payload-signing", choices=["on", "off"], default=None)
    p.add_argument("--baseline-part-size-mib", type=float, default=None)
    return p


def child_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m asyncckpt.bench --child OP``: one op, one JSON line."""
    warnings.simplefilter("ignore")  # e.g. aiohttp's ResourceWarning about large raw bodies
    args = _child_parser().parse_args(argv)
    rss_libs = _status_kib("VmRSS")
    layout = state_layout(args.state_mib, args.nodes, args.blobs_per_node)
    ctx = ChildContext(args, layout, Meter(args.server_pid, args.server_log))
    out: dict[str, Any] = {"op": args.child, "prefix": args.prefix, "pid": os.getpid()}
    try:
        fn = CHILD_OPS[args.child]
        extra = asyncio.run(fn(ctx)) if asyncio.iscoroutinefunction(fn) else fn(ctx)
        out.update(extra)
        out.setdefault("status", "ok")
        if out["status"] == "ok" and args.child != "prep":
            out.update(ctx.meter.result())
            if out.get("verified") is False:
                out["status"] = "mismatch"
    except BaseException as exc:  # report, never hang the parent
        out.update(status="error", error=f"{type(exc).__name__}: {exc}")
    out["rss_libs_mib"] = (rss_libs or 0) / 1024
    print(json.dumps(out), flush=True)
    return 0 if out["status"] in ("ok", "n/a") else 1


# ============================================================================ parent side


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES) and k not in _SCRUBBED_ENV}
    env.update(TEST_CREDENTIALS)
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env.update(extra)
    return env


class MotoServer:
    """``moto_server -H 127.0.0.1 -p PORT`` as a subprocess with its own PID."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.log_path = workdir / "moto_server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> None:
        exe = Path(sys.executable).with_name("moto_server")
        cmd = (
            [str(exe)]
            if exe.exists()
            else [sys.executable, "-c", "import sys; from moto.server import main; sys.exit(main())"]
        )
        tmp = self.workdir / "moto-tmp"
        tmp.mkdir(exist_ok=True)
        self.port = _free_port()
        env = _clean_env({**SERVER_MALLOC_ENV, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.1)
        raise RuntimeError(f"moto_server did not accept connections on 127.0.0.1:{self.port} within {timeout:g} s")

    def rss_mib(self) -> float | None:
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()  # by PID: our own subprocess
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _admin_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    ).client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": 3},
        ),
    )


def _delete_prefix(client: Any, bucket: str, prefix: str) -> None:
    """Remove a peer's objects (and unfinished uploads) so the server's memory stays flat."""
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


@dataclass
class BenchParams:
    state_mib: float = 192
    nodes: int = 4
    blobs_per_node: int = 8
    reps: int = 3
    part_size_mib: float | None = None
    range_size_mib: float | None = None
    max_concurrency: int | None = None
    max_bytes_in_flight_mib: float | None = None
    checksum_mode: str | None = None
    payload_signing: bool | None = None
    baseline_part_size_mib: float | None = None
    budget_s: float = DEFAULT_BUDGET_S
    op_timeout_s: float = DEFAULT_OP_TIMEOUT_S

    def child_args(self) -> list[str]:
        out = [
            "--state-mib",
            str(self.state_mib),
            "--nodes",
            str(self.nodes),
            "--blobs-per-node",
            str(self.blobs_per_node),
        ]
        for flag, value in (
            ("--part-size-mib", self.part_size_mib),
            ("--range-size-mib", self.range_size_mib),
            ("--max-concurrency", self.max_concurrency),
            ("--max-bytes-in-flight-mib", self.max_bytes_in_flight_mib),
            ("--checksum-mode", self.checksum_mode),
            ("--baseline-part-size-mib", self.baseline_part_size_mib),
        ):
            if value is not None:
                out += [flag, str(value)]
        if self.payload_signing is not None:
            out += ["--payload-signing", "on" if self.payload_signing else "off"]
        return out


def _run_child(
    op: str, prefix: str, params: BenchParams, server: MotoServer, expected: Path, timeout: float
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "asyncckpt.bench",
        "--child",
        op,
        "--endpoint",
        server.endpoint,
        "--bucket",
        BUCKET,
        "--prefix",
        prefix,
        "--server-pid",
        str(server.pid),
        "--server-log",
        str(server.log_path),
        "--expected",
        str(expected),
        *params.child_args(),
    ]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, timeout=timeout, env=_clean_env({}), stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired:
        return {"op": op, "prefix": prefix, "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    result: dict[str, Any] | None = None
    for line in reversed(proc.stdout.decode("utf-8", "replace").splitlines()):
        with contextlib.suppress(ValueError):
            candidate = json.loads(line)
            if isinstance(candidate, dict) and "op" in candidate:
                result = candidate
                break
    if result is None:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        result = {"op": op, "prefix": prefix, "status": "error", "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    result["process_s"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------- summary


def _median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(runs: Sequence[Mapping[str, Any]], state_bytes: int) -> dict[str, dict[str, Any]]:
    """Per op: medians over the successful runs (and min/max wall)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, spec in OPS.items():
        mine = [r for r in runs if r.get("op") == name]
        ok = [r for r in mine if r.get("status") == "ok"]
        row: dict[str, Any] = {
            "op": name,
            "label": spec.label,
            "peer": spec.peer,
            "kind": spec.kind,
            "n": len(ok),
            "attempts": len(mine),
            "status": "ok" if ok else (mine[-1].get("status", "missing") if mine else "not run"),
        }
        if not ok:
            reasons = [r.get("reason") or r.get("error") for r in mine if r.get("reason") or r.get("error")]
            row["reason"] = reasons[-1] if reasons else None
            rows[name] = row
            continue
        walls = [r["wall_s"] for r in ok]
        nbytes = ok[0].get("bytes") or state_bytes
        cpu = _median([r["cpu_s"] for r in ok])
        row.update(
            bytes=nbytes,
            wall_s=_median(walls),
            wall_min_s=min(walls),
            wall_max_s=max(walls),
            mb_s=nbytes / _median(walls) / 1e6,
            cpu_s=cpu,
            cpu_s_per_gb=cpu / (nbytes / 1e9) if cpu is not None else None,
            cpu_user_s=_median([r.get("cpu_user_s") for r in ok]),
            cpu_sys_s=_median([r.get("cpu_sys_s") for r in ok]),
            page_faults=_median([r.get("page_faults") for r in ok]),
            peak_rss_mib=_median([r["peak_rss_mib"] for r in ok]),
            rss_before_mib=_median([r["rss_before_mib"] for r in ok]),
            rss_delta_mib=_median([r["peak_rss_mib"] - r["rss_before_mib"] for r in ok]),
            rss_libs_mib=_median([r.get("rss_libs_mib") for r in ok]),
            server_cpu_s=_median([r.get("server_cpu_s") for r in ok]),
            requests=_median([(r.get("requests") or {}).get("total") for r in ok]),
        )
        if name == "memcpy":
            row["warm_copyto_s"] = _median([r.get("warm_copyto_s") for r in ok])
        if name == "ckpt_save_async":
            blocking = [r["laps"]["blocking"] for r in ok if "blocking" in r.get("laps", {})]
            row["blocking_s"] = _median([b["wall_s"] for b in blocking])
            row["blocking_cpu_s"] = _median([b["cpu_s"] for b in blocking])
            row["second_blocking_s"] = _median([r.get("second_blocking_s") for r in ok])
            row["second_total_s"] = _median([r.get("second_total_s") for r in ok])
        if name in ("ckpt_load", "ckpt_partial"):
            row["received_bytes"] = _median([r.get("received_bytes") for r in ok])
        if name == "ckpt_partial":
            row["requested_bytes"] = ok[0].get("requested_bytes")
            row["report_bytes"] = ok[0].get("report_bytes")
            row["blobs"] = ok[0].get("blobs")
        rows[name] = row
    return rows


_BASELINES = {"save": ("aio_save", "s3t_save"), "load": ("aio_load", "s3t_load")}


def add_ratios(rows: dict[str, dict[str, Any]], runs: Sequence[Mapping[str, Any]]) -> None:
    """Ratio fields of every row: wall and client CPU vs bare aioboto3 and vs s3transfer
    (medians' ratio, and the median of the per-repetition paired ratios)."""
    for name, row in rows.items():
        base = _BASELINES.get(row["kind"])
        for peer in ("aio", "s3t"):
            for metric in ("wall", "cpu"):
                key = f"{metric}_vs_{peer}"
                row[key] = None
                row[key + "_paired"] = None
                if base is None or row.get("n", 0) == 0:
                    continue
                ref_name = base[0] if peer == "aio" else base[1]
                ref = rows.get(ref_name, {})
                field = "wall_s" if metric == "wall" else "cpu_s_per_gb"
                row[key] = _ratio(row.get(field), ref.get(field))
                row[key + "_paired"] = _paired_ratio(runs, name, ref_name, metric)


def _per_gb(r: Mapping[str, Any]) -> float | None:
    return r["cpu_s"] / (r["bytes"] / 1e9) if r.get("bytes") else None


def _paired_ratio(runs: Sequence[Mapping[str, Any]], op: str, ref: str, metric: str) -> float | None:
    by_rep: dict[int, dict[str, Mapping[str, Any]]] = {}
    for r in runs:
        if r.get("status") == "ok":
            by_rep.setdefault(int(r.get("rep", 0)), {})[r["op"]] = r
    ratios = []
    for rep in by_rep.values():
        if op in rep and ref in rep:
            a, b = (
                (rep[op]["wall_s"], rep[ref]["wall_s"]) if metric == "wall" else (_per_gb(rep[op]), _per_gb(rep[ref]))
            )
            if a is not None and b:
                ratios.append(a / b)
    return _median(ratios)


def evaluate_targets(rows: Mapping[str, Mapping[str, Any]], state_bytes: int) -> list[dict[str, Any]]:
    """The issue's targets, as measured ratios (never assertions)."""

    def get(op: str, field: str) -> float | None:
        return rows.get(op, {}).get(field)

    state_mib = state_bytes / MiB
    rss_limit = state_mib + 256
    partial_moved = get("ckpt_partial", "received_bytes")
    partial_requested = get("ckpt_partial", "requested_bytes")
    targets = [
        (
            "save wall <= 1.05x bare aioboto3 multipart",
            _ratio(get("ckpt_save", "wall_s"), get("aio_save", "wall_s")),
            1.05,
            "x",
        ),
        ("save wall <= 0.8x s3transfer", _ratio(get("ckpt_save", "wall_s"), get("s3t_save", "wall_s")), 0.8, "x"),
        (
            "load wall <= 0.8x bare aioboto3 get_object+read()",
            _ratio(get("ckpt_load", "wall_s"), get("aio_load", "wall_s")),
            0.8,
            "x",
        ),
        (
            "save client CPU s/GB <= 0.5x bare aioboto3",
            _ratio(get("ckpt_save", "cpu_s_per_gb"), get("aio_save", "cpu_s_per_gb")),
            0.5,
            "x",
        ),
        (
            "load client CPU s/GB <= 0.5x bare aioboto3",
            _ratio(get("ckpt_load", "cpu_s_per_gb"), get("aio_load", "cpu_s_per_gb")),
            0.5,
            "x",
        ),
        (
            "save_async blocking <= 1.5x numpy copy",
            _ratio(get("ckpt_save_async", "blocking_s"), get("memcpy", "wall_s")),
            1.5,
            "x",
        ),
        (
            f"peak RSS during save <= state + 256 MiB ({rss_limit:.0f} MiB)",
            get("ckpt_save", "peak_rss_mib"),
            rss_limit,
            "MiB",
        ),
        (
            f"peak RSS during load <= state + 256 MiB ({rss_limit:.0f} MiB)",
            get("ckpt_load", "peak_rss_mib"),
            rss_limit,
            "MiB",
        ),
        ("partial load (10% of blobs) moves <= 1.05x their bytes", _ratio(partial_moved, partial_requested), 1.05, "x"),
    ]
    out = []
    for name, value, limit, unit in targets:
        out.append(
            {
                "target": name,
                "measured": value,
                "limit": limit,
                "unit": unit,
                "met": None if value is None else bool(value <= limit),
            }
        )
    return out


# ---------------------------------------------------------------------------- output


def _fmt(value: Any, spec: str = ".2f", none: str = "n/a") -> str:
    if value is None:
        return none
    return format(value, spec)


TABLE_COLUMNS = [
    "op",
    "n",
    "wall s (min-max)",
    "MB/s",
    "CPU s",
    "CPU s/GB",
    "peak RSS MiB",
    "RSS Δ MiB",
    "server CPU s",
    "reqs",
    "wall ×aio",
    "wall ×s3t",
    "CPU/GB ×aio",
    "CPU/GB ×s3t",
]


def table_rows(rows: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    out = []
    for name in OPS:
        row = rows.get(name)
        if row is None:
            continue
        label = f"{name}: {row['label']}"
        if not row.get("n"):
            out.append([label, "0", row.get("status", "n/a")] + ["n/a"] * (len(TABLE_COLUMNS) - 3))
            continue
        wall = f"{row['wall_s']:.3f} ({row['wall_min_s']:.2f}-{row['wall_max_s']:.2f})"
        cells = [
            label,
            str(row["n"]),
            wall,
            _fmt(row["mb_s"], ".0f"),
            _fmt(row["cpu_s"]),
            _fmt(row["cpu_s_per_gb"]),
            _fmt(row["peak_rss_mib"], ".0f"),
            _fmt(row["rss_delta_mib"], "+.0f"),
            _fmt(row["server_cpu_s"]),
            _fmt(row["requests"], ".0f"),
            _fmt(row.get("wall_vs_aio"), none="—"),
            _fmt(row.get("wall_vs_s3t"), none="—"),
            _fmt(row.get("cpu_vs_aio"), none="—"),
            _fmt(row.get("cpu_vs_s3t"), none="—"),
        ]
        out.append(cells)
        if name == "ckpt_save_async" and row.get("blocking_s") is not None:
            out.append(
                [
                    f"{name}: blocking (until save_async returns)",
                    str(row["n"]),
                    f"{row['blocking_s']:.3f}",
                    "",
                    _fmt(row["blocking_cpu_s"]),
                ]
                + [""] * (len(TABLE_COLUMNS) - 5)
            )
        if name == "ckpt_save_async" and row.get("second_blocking_s") is not None:
            out.append(
                [f"{name}: 2nd save_async in the process, blocking", str(row["n"]), f"{row['second_blocking_s']:.3f}"]
                + [""] * (len(TABLE_COLUMNS) - 3)
            )
            out.append(
                [f"{name}: 2nd save_async in the process, total", str(row["n"]), f"{row['second_total_s']:.3f}",
                 _fmt(row["bytes"] / row["second_total_s"] / 1e6, ".0f")]
                + [""] * (len(TABLE_COLUMNS) - 4)
            )  # fmt: skip
        if name == "memcpy" and row.get("warm_copyto_s") is not None:
            warm = row["warm_copyto_s"]
            out.append(
                [
                    "memcpy: warm np.copyto (reference)",
                    str(row["n"]),
                    f"{warm:.3f}",
                    _fmt(row["bytes"] / warm / 1e6, ".0f"),
                ]
                + [""] * (len(TABLE_COLUMNS) - 4)
            )
    return out


def markdown_table(rows: Mapping[str, Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {_target_value(t)} | {_target_limit(t)} | {_target_status(t)} |")
    return "\n".join(lines)


def _target_value(t: Mapping[str, Any]) -> str:
    if t["measured"] is None:
        return "n/a"
    return f"{t['measured']:.0f} MiB" if t["unit"] == "MiB" else f"{t['measured']:.2f}x"


def _target_limit(t: Mapping[str, Any]) -> str:
    return f"{t['limit']:.0f} MiB" if t["unit"] == "MiB" else f"{t['limit']:.2f}x"


def _target_status(t: Mapping[str, Any]) -> str:
    return "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")


def render(console: Console, result: Mapping[str, Any]) -> None:
    from rich.table import Table

    meta = result["meta"]
    rows = result["rows"]
    title = (
        f"asyncckpt bench: {meta['state_mib']:g} MiB state ({meta['state_bytes'] / 1e6:.1f} MB), "
        f"{meta['nodes']} nodes x {meta['blobs_per_node']} blobs, moto on 127.0.0.1, "
        f"medians of {meta['reps_done']}/{meta['reps']} reps"
    )
    table = Table(title=title, show_lines=False)
    for i, col in enumerate(TABLE_COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for cells in table_rows(rows):
        table.add_row(*cells)
    console.print(table)
    console.print(
        "ratios: wall and client CPU s/GB of each save vs aio_save / s3t_save and of each load vs aio_load / "
        "s3t_load (ratio of medians). Peak RSS: VmHWM during the op (absolute); RSS Δ: peak minus RSS just "
        "before the op. Server CPU: moto's CPU during the op.",
        highlight=False,
    )
    targets = Table(title="targets (measured, not asserted)")
    for col in ("target", "measured", "limit", "status"):
        targets.add_column(col)
    for t in result["targets"]:
        status = _target_status(t)
        style = "green" if t["met"] else ("red" if t["met"] is False else "yellow")
        targets.add_row(t["target"], _target_value(t), _target_limit(t), f"[{style}]{status}[/]")
    console.print(targets)
    if meta.get("aborted"):
        console.print(f"[yellow]stopped early: {meta['aborted']}[/]")
    if meta.get("busy_warning"):
        console.print(f"[yellow]warning: {meta['busy_warning']}[/]")


# ---------------------------------------------------------------------------- driver


def run_bench(
    *,
    state_mib: float = 192,
    nodes: int = 4,
    blobs_per_node: int = 8,
    reps: int = 3,
    server: str = "moto",
    out_json: Path | None = None,
    console: Console | None = None,
    part_size_mib: float | None = None,
    range_size_mib: float | None = None,
    max_concurrency: int | None = None,
    max_bytes_in_flight_mib: float | None = None,
    checksum_mode: str | None = None,
    payload_signing: bool | None = None,
    baseline_part_size_mib: float | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
    ops: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); print the table; return (and write
    to ``out_json``) every raw measurement, the per-op medians with their ratio fields,
    and the targets."""
    if console is None:
        from rich.console import Console

        console = Console()
    if server != "moto":
        raise ValueError(f"unsupported server {server!r}: only 'moto' (moto_server on 127.0.0.1)")
    if reps < 1 or nodes < 1 or blobs_per_node < 1:
        raise ValueError("reps, nodes and blobs_per_node must be positive")
    selected = list(OPS) if ops is None else list(ops)
    unknown = [o for o in selected if o not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; known: {list(OPS)}")
    params = BenchParams(
        state_mib, nodes, blobs_per_node, reps, part_size_mib, range_size_mib, max_concurrency,
        max_bytes_in_flight_mib, checksum_mode, payload_signing, baseline_part_size_mib, budget_s, op_timeout_s,
    )  # fmt: skip
    layout = state_layout(state_mib, nodes, blobs_per_node)
    state_bytes = sum(b.nbytes for b in layout)
    started_wall = time.time()
    t_start = time.monotonic()
    runs: list[dict[str, Any]] = []
    aborted: str | None = None
    reps_done = 0
    meta: dict[str, Any] = {
        "state_mib": state_mib,
        "state_bytes": state_bytes,
        "nodes": nodes,
        "blobs_per_node": blobs_per_node,
        "blob_bytes": layout[0].nbytes,
        "reps": reps,
        "server": "moto_server (subprocess, MALLOC_* tunables on the server only)",
        "budget_s": budget_s,
        "op_timeout_s": op_timeout_s,
        "params": {k: v for k, v in vars(params).items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_wall)),
        "machine": _machine_info(),
        "versions": _versions(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="asyncckpt-bench-"))
    expected = workdir / "expected.json"
    moto = MotoServer(workdir)
    admin = None
    try:
        moto.start()
        meta["server_pid"] = moto.pid
        meta["endpoint"] = moto.endpoint
        admin = _admin_client(moto.endpoint)
        admin.create_bucket(Bucket=BUCKET)
        console.print(
            f"moto_server pid {moto.pid} on {moto.endpoint}; state {state_bytes / MiB:.1f} MiB", highlight=False
        )
        prep = _run_child("prep", "prep", params, moto, expected, max(op_timeout_s, 60))
        if prep.get("status") != "ok":
            raise RuntimeError(f"could not build the state: {prep.get('error')}")
        meta["build_state_s"] = prep.get("build_state_s")
        meta["ckpt_config"] = None
        for rep in range(reps):
            order = _GROUP_ORDER[rep % len(_GROUP_ORDER) :] + _GROUP_ORDER[: rep % len(_GROUP_ORDER)]
            for group in order:
                group_ops = [o for o in GROUPS[group] if o in selected]
                if not group_ops:
                    continue
                prefix = f"r{rep}-{group}"
                failed_write = False
                for op in group_ops:
                    remaining = budget_s - (time.monotonic() - t_start)
                    if remaining <= 0:
                        aborted = f"time budget of {budget_s:g} s used up during rep {rep + 1}/{reps}"
                        break
                    if failed_write and OPS[op].kind in ("load", "partial"):
                        runs.append({"op": op, "rep": rep, "status": "skipped", "reason": "its save failed"})
                        continue
                    result = _run_child(op, prefix, params, moto, expected, min(op_timeout_s, max(remaining, 5.0)))
                    result["rep"] = rep
                    runs.append(result)
                    if OPS[op].kind == "save" and result.get("status") != "ok":
                        failed_write = True
                    if meta["ckpt_config"] is None and result.get("config"):
                        meta["ckpt_config"] = result["config"]
                    console.print(_progress_line(rep, reps, result), highlight=False)
                if group != "memcpy":
                    with contextlib.suppress(Exception):
                        _delete_prefix(admin, BUCKET, prefix)
                if aborted:
                    break
            if aborted:
                console.print(f"[yellow]{aborted}: remaining measurements skipped[/]")
                break
            reps_done = rep + 1
        meta["server_rss_mib_end"] = moto.rss_mib()
    finally:
        if admin is not None:
            admin.close()
        moto.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    meta["reps_done"] = reps_done
    meta["aborted"] = aborted
    loads = [r["loadavg_1m"] for r in runs if r.get("loadavg_1m") is not None]
    meta["loadavg_1m_median"] = _median(loads)
    cpus = os.cpu_count() or 1
    if loads and meta["loadavg_1m_median"] > 1.5 * cpus:
        meta["busy_warning"] = (
            f"the machine was busy (median 1-min load average {meta['loadavg_1m_median']:.1f} on {cpus} CPUs "
            "while measuring): wall times are inflated and noisy; client CPU and RSS are more trustworthy"
        )
    meta["elapsed_s"] = time.monotonic() - t_start
    meta["partial_blobs"] = [f"{b.node}/{b.name}" for b in partial_selection(layout)]
    rows = summarize(runs, state_bytes)
    add_ratios(rows, runs)
    targets = evaluate_targets(rows, state_bytes)
    result = {
        "meta": meta,
        "rows": rows,
        "targets": targets,
        "runs": runs,
        "markdown": markdown_table(rows, targets),
    }
    if out_json is not None:  # first, so a broken console never loses the measurements
        Path(out_json).write_text(json.dumps(result, indent=2, default=str))
    render(console, result)
    if out_json is not None:
        console.print(f"wrote {out_json}", highlight=False)
    return result


def _progress_line(rep: int, reps: int, r: Mapping[str, Any]) -> str:
    head = f"rep {rep + 1}/{reps}  {r['op']:<16}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}: {r.get('reason') or r.get('error')}"
    extra = ""
    if "blocking" in r.get("laps", {}):
        extra = f"  blocking {r['laps']['blocking']['wall_s']:.3f} s"
    srv = r.get("server_cpu_s")
    return (
        f"{head} {r['wall_s']:7.3f} s  cpu {r['cpu_s']:.2f} s  peak {r['peak_rss_mib']:.0f} MiB "
        f"(Δ {r['peak_rss_mib'] - r['rss_before_mib']:+.0f})  server cpu {srv if srv is None else round(srv, 2)}{extra}"
    )


def _machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = os.getloadavg()
    return info


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("asyncckpt", "aioboto3", "aiobotocore", "aiohttp", "boto3", "botocore", "s3transfer", "moto", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


# ---------------------------------------------------------------------------- CLI


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state-mib",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="State size in MiB.  [default: 192; --quick: 32]",
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
    default=DEFAULT_BUDGET_S,
    show_default=True,
    help="Total time budget; past it the remaining measurements are skipped.",
)
@click.option(
    "--op-timeout-s",
    type=click.FloatRange(min=1),
    default=DEFAULT_OP_TIMEOUT_S,
    show_default=True,
    help="Timeout of one measured operation.",
)
def bench_command(
    state_mib: float | None,
    nodes: int,
    blobs_per_node: int,
    reps: int | None,
    json_path: Path | None,
    quick: bool,
    part_size_mib: float | None,
    range_size_mib: float | None,
    max_concurrency: int | None,
    max_bytes_in_flight_mib: float | None,
    checksum_mode: str | None,
    payload_signing: bool | None,
    baseline_part_size_mib: float | None,
    budget_s: float,
    op_timeout_s: float,
) -> None:
    """Benchmark asyncckpt against bare aioboto3 and boto3's s3transfer on a local S3
    server (moto_server on 127.0.0.1, started and stopped here), on the same bytes.

    Each measurement runs in a fresh process; prints a table of wall time, MB/s, client
    CPU, peak RSS and server CPU with ratios to the baselines, and the targets met or
    missed. Exit code 0 when the benchmark ran (targets are reported, not asserted),
    2 when it could not run.
    """
    from rich.console import Console

    if state_mib is None:
        state_mib = 32 if quick else 192
    if reps is None:
        reps = 1 if quick else 3
    console = Console(width=max(Console().width, 200))
    try:
        result = run_bench(
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
            budget_s=budget_s,
            op_timeout_s=op_timeout_s,
        )
    except (RuntimeError, ValueError, OSError) as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        raise SystemExit(2) from None
    ran = any(r.get("n") for r in result["rows"].values())
    raise SystemExit(0 if ran else 2)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--child" in argv or any(a.startswith("--child=") for a in argv):
        return child_main(argv)
    bench_command.main(args=argv, prog_name="python -m asyncckpt.bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
