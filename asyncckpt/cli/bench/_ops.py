"""The measured operations, each run once in a fresh child process (see :mod:`._child`).

Every op builds what it needs before the timed region, brackets exactly the operation
with the context's :class:`~._meters.Meter`, verifies what a load read back against the
SHA-256 digests of the generated state, and returns a JSON-ready dict.

``memcpy``: a fresh ``np.copy`` of the state (and a warm ``np.copyto``). ``aio_*``: bare
aioboto3 with botocore's default configuration, one ``upload_fileobj`` per node plus a
JSON index; loads are ``get_object`` + ``read()``. ``s3t_*``: boto3's s3transfer.
``ckpt_*``: asyncckpt as users get it: ``save``, ``load``, ``load_blobs_locally`` of
10% of the blobs, ``save_async`` (blocking time and total).
"""

from __future__ import annotations

import asyncio
import bisect
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from asyncckpt import MultiNodeCheckpointManager, TransferConfig
from asyncckpt.testing.s3_server import REGION

from ._meters import Meter
from ._state import EPOCH, SCALARS, BenchParams, BlobSpec, ChildJob, build_state, digest, partial_selection

if TYPE_CHECKING:
    from aiobotocore.session import ClientCreatorContext
    from mypy_boto3_s3.client import S3Client as SyncS3Client
    from s3transfer.manager import TransferManager
    from types_aiobotocore_s3.client import S3Client

__all__ = [
    "CHILD_OPS",
    "ChildContext",
    "ConcatReader",
    "as_numpy",
    "ckpt_load",
    "ckpt_save",
    "ckpt_save_async",
    "verify_state",
]


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
        if digest(arr) != expected[f"{blob.node}/{blob.name}"]:
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
    """What an op needs: its job, the state's layout, and the meter for the timed region."""

    job: ChildJob
    layout: list[BlobSpec]
    meter: Meter

    @property
    def params(self) -> BenchParams:
        return self.job.params

    @property
    def state_bytes(self) -> int:
        return sum(b.nbytes for b in self.layout)

    @property
    def nodes(self) -> list[str]:
        return list(dict.fromkeys(b.node for b in self.layout))

    def expected(self) -> dict[str, str]:
        """The SHA-256 digest of every blob, ``"node/blob" -> hex`` (written by the prep op)."""
        with open(self.job.expected) as f:
            digests: dict[str, str] = json.load(f)
        return digests

    def storage_options(self) -> dict[str, Any]:
        """asyncckpt's ``storage_options`` for the server (credentials from the environment)."""
        return {"endpoint_url": self.job.endpoint, "region_name": REGION, "addressing_style": "path"}

    def location(self) -> str:
        return f"s3://{self.job.bucket}/{self.job.prefix}"


# ---------------------------------------------------------------------- the ops


def op_prep(ctx: ChildContext) -> dict[str, Any]:
    """Not measured against anything: build the state once and write its digests."""
    t0 = time.perf_counter()
    state = build_state(ctx.layout)
    build_s = time.perf_counter() - t0
    digests = {f"{b.node}/{b.name}": digest(state[b.node][b.name]) for b in ctx.layout}
    with open(ctx.job.expected, "w") as f:
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


def _aio_client(ctx: ChildContext) -> ClientCreatorContext[S3Client]:
    import aioboto3
    from aiobotocore.config import AioConfig

    # botocore's defaults (checksums when_supported, payload signing over http), path style
    config = AioConfig(s3={"addressing_style": "path"}, max_pool_connections=ctx.params.baseline_concurrency())
    return aioboto3.Session().client("s3", endpoint_url=ctx.job.endpoint, region_name=REGION, config=config)


async def op_aio_save(ctx: ChildContext) -> dict[str, Any]:
    from boto3.s3.transfer import TransferConfig as S3TransferConfig

    state = build_state(ctx.layout)
    index = _bare_index(ctx.layout, ctx.job.prefix)
    part = ctx.params.baseline_part_size()
    tcfg = S3TransferConfig(
        multipart_threshold=part, multipart_chunksize=part, max_concurrency=ctx.params.baseline_concurrency()
    )
    bucket = ctx.job.bucket
    async with _aio_client(ctx) as client:
        ctx.meter.start()
        async with asyncio.TaskGroup() as tg:
            for node, entry in index["nodes"].items():
                body = ConcatReader([state[node][name] for name in entry["blobs"]])
                # the stubs ask for typing.IO; upload_fileobj reads any file-like object, as ConcatReader is
                tg.create_task(client.upload_fileobj(body, bucket, entry["key"], Config=tcfg))  # type: ignore[arg-type]
            tg.create_task(
                client.put_object(Bucket=bucket, Key=f"{ctx.job.prefix}/index.json", Body=json.dumps(index).encode())
            )
        ctx.meter.stop()
    return {"bytes": ctx.state_bytes, "part_size": part}


async def op_aio_load(ctx: ChildContext) -> dict[str, Any]:
    bucket = ctx.job.bucket
    index_guess = _bare_index(ctx.layout, ctx.job.prefix)  # keys follow a convention

    async with _aio_client(ctx) as client:

        async def get(key: str) -> bytes:
            response = await client.get_object(Bucket=bucket, Key=key)
            return await response["Body"].read()

        ctx.meter.start()
        keys = [f"{ctx.job.prefix}/index.json"] + [e["key"] for e in index_guess["nodes"].values()]
        async with asyncio.TaskGroup() as tg:
            gets = [tg.create_task(get(key)) for key in keys]
        bodies = [task.result() for task in gets]
        index = json.loads(bodies[0])
        state = _decode_bare(index, dict(zip(index["nodes"], bodies[1:])))
        ctx.meter.stop()
    problem = _verify(state, ctx.expected(), ctx.layout) or _verify_scalars(state, ctx.nodes)
    return {"bytes": ctx.state_bytes, "verified": problem is None, "problem": problem}


def _s3t(ctx: ChildContext) -> tuple[SyncS3Client, TransferManager]:
    import boto3
    from boto3.s3.transfer import TransferConfig as S3TransferConfig
    from boto3.s3.transfer import create_transfer_manager
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", endpoint_url=ctx.job.endpoint, region_name=REGION, config=Config(s3={"addressing_style": "path"})
    )
    part = ctx.params.baseline_part_size()
    tcfg = S3TransferConfig(
        multipart_threshold=part, multipart_chunksize=part, max_concurrency=ctx.params.baseline_concurrency()
    )
    return client, create_transfer_manager(client, tcfg)


def op_s3t_save(ctx: ChildContext) -> dict[str, Any]:
    state = build_state(ctx.layout)
    index = _bare_index(ctx.layout, ctx.job.prefix)
    client, manager = _s3t(ctx)
    bucket = ctx.job.bucket
    with manager:
        ctx.meter.start()
        futures = []
        for node, entry in index["nodes"].items():
            body = ConcatReader([state[node][name] for name in entry["blobs"]])
            # the stubs ask for typing.IO; upload reads any file-like object, as ConcatReader is
            futures.append(manager.upload(body, bucket, entry["key"]))  # type: ignore[arg-type]
        client.put_object(Bucket=bucket, Key=f"{ctx.job.prefix}/index.json", Body=json.dumps(index).encode())
        for future in futures:
            future.result()
        ctx.meter.stop()
    client.close()
    return {"bytes": ctx.state_bytes, "part_size": ctx.params.baseline_part_size()}


def op_s3t_load(ctx: ChildContext) -> dict[str, Any]:
    index_guess = _bare_index(ctx.layout, ctx.job.prefix)
    client, manager = _s3t(ctx)
    bucket = ctx.job.bucket
    with manager:
        ctx.meter.start()
        outs = {node: io.BytesIO() for node in index_guess["nodes"]}
        futures = [manager.download(bucket, e["key"], outs[node]) for node, e in index_guess["nodes"].items()]
        index = json.loads(client.get_object(Bucket=bucket, Key=f"{ctx.job.prefix}/index.json")["Body"].read())
        for future in futures:
            future.result()
        state = _decode_bare(index, {node: out.getbuffer() for node, out in outs.items()})
        ctx.meter.stop()
    client.close()
    problem = _verify(state, ctx.expected(), ctx.layout) or _verify_scalars(state, ctx.nodes)
    return {"bytes": ctx.state_bytes, "verified": problem is None, "problem": problem}


async def op_ckpt_save(ctx: ChildContext) -> dict[str, Any]:
    return await ckpt_save(ctx, build_state(ctx.layout))


async def ckpt_save(ctx: ChildContext, state: Mapping[str, Any]) -> dict[str, Any]:
    """asyncckpt's ``save`` of ``state`` (the workspaces), timed."""
    config = ctx.params.transfer_config()
    async with MultiNodeCheckpointManager(ctx.location(), storage_options=ctx.storage_options(), config=config) as mgr:
        await mgr.init(state)
        ctx.meter.start()
        await mgr.save(EPOCH)
        ctx.meter.stop()
        report = await mgr.report_checkpoint_stats("checkpoint_save")
    return {"bytes": ctx.state_bytes, "report": _short_report(report), "config": _config_json(config)}


async def op_ckpt_load(ctx: ChildContext) -> dict[str, Any]:
    return await ckpt_load(ctx, None)


async def ckpt_load(ctx: ChildContext, targets: Mapping[str, dict[str, Any]] | None) -> dict[str, Any]:
    """asyncckpt's ``load``, timed: into new workspaces, or into ``targets`` (workspaces that
    already hold arrays or tensors of the saved shapes). The loaded values are verified
    (torch tensors through their numpy view); ``in_place`` says whether every loaded array
    is the object the workspace held before."""
    config = ctx.params.transfer_config()
    before = {(n, k): v for n, ws in (targets or {}).items() for k, v in ws.items() if hasattr(v, "shape")}
    async with MultiNodeCheckpointManager(ctx.location(), storage_options=ctx.storage_options(), config=config) as mgr:
        await mgr.init(targets if targets is not None else ctx.nodes)
        ctx.meter.start()
        await mgr.load(EPOCH)
        ctx.meter.stop()
        report = await mgr.report_checkpoint_stats("checkpoint_load")
        state = {node: dict(mgr.workspace(node)) for node in ctx.nodes}
    in_place = all(state[n].get(k) is v for (n, k), v in before.items()) if before else None
    problem = verify_state(ctx, as_numpy(state))
    return {
        "bytes": ctx.state_bytes,
        "verified": problem is None,
        "problem": problem,
        "in_place": in_place,
        "report": _short_report(report),
    }


def as_numpy(state: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``state`` with every torch tensor replaced by its numpy view (no copy for CPU tensors)."""
    return {
        node: {k: (v.numpy() if type(v).__module__.startswith("torch") else v) for k, v in ws.items()}
        for node, ws in state.items()
    }


def verify_state(ctx: ChildContext, state: Mapping[str, Mapping[str, Any]]) -> str | None:
    """``None`` when ``state`` (numpy arrays) holds every blob and scalar of the generated state."""
    return _verify(state, ctx.expected(), ctx.layout) or _verify_scalars(state, ctx.nodes)


async def op_ckpt_partial(ctx: ChildContext) -> dict[str, Any]:
    wanted = partial_selection(ctx.layout)
    names = [f"{b.node}/{b.name}" for b in wanted]
    config = ctx.params.transfer_config()
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
        "blobs": names,
        "verified": problem is None,
        "problem": problem,
        "report": _short_report(report),
    }


async def op_ckpt_save_async(ctx: ChildContext) -> dict[str, Any]:
    return await ckpt_save_async(ctx, build_state(ctx.layout))


async def ckpt_save_async(ctx: ChildContext, state: Mapping[str, Any]) -> dict[str, Any]:
    """asyncckpt's ``save_async`` of ``state``: the lap ``blocking`` until it returns, the
    op until the commit; then a second one in the same process, timed on its own."""
    config = ctx.params.transfer_config()
    async with MultiNodeCheckpointManager(ctx.location(), storage_options=ctx.storage_options(), config=config) as mgr:
        await mgr.init(state)
        ctx.meter.start()
        handle = await mgr.save_async(EPOCH)
        ctx.meter.lap("blocking")
        await handle.wait()
        ctx.meter.stop()
        report = await mgr.report_checkpoint_stats("checkpoint_save")
        # A trainer checkpoints again and again: a second save_async in the same
        # process shows the steady state (staging buffers warm). Not part of the
        # measured op above; timed on its own.
        t0 = time.perf_counter()
        handle2 = await mgr.save_async(EPOCH + 1)
        blocking2 = time.perf_counter() - t0
        await handle2.wait()
        total2 = time.perf_counter() - t0
    return {
        "bytes": ctx.state_bytes,
        "report": _short_report(report),
        "config": _config_json(config),
        "handle_blocking_s": handle.blocking_seconds,
        "second_blocking_s": blocking2,
        "second_total_s": total2,
    }


def _short_report(report: Mapping[str, Any]) -> dict[str, Any]:
    nodes = report.get("nodes") or {}
    return {
        "seconds": report.get("seconds"),
        "bytes": report.get("bytes"),
        "slowest_node": report.get("slowest_node"),
        "requests": sum(int(n.get("requests", 0)) for n in nodes.values()),
        "retries": sum(int(n.get("retries", 0)) for n in nodes.values()),
    }


def _config_json(config: TransferConfig) -> dict[str, Any]:
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
