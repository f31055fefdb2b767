"""The peers' measured operations (``asyncckpt bench --peers``), each run once in a fresh child.

Same method as :mod:`._ops`: everything the op needs (imports, the state, clients, DCP
writers and readers, load targets) is built before the timed region, the meter brackets
exactly the save or load call, and every load is verified against the SHA-256 digests of
the generated state. The torch ops save the same bytes as torch tensors
(``torch.from_numpy`` of the generated arrays); loads that take a target (DCP,
torchsnapshot, asyncckpt in place) get tensors or arrays of the saved shapes, already
written to (resident), as a trainer's model is.

The peers' settings (``peers_bench.md``): botocore-based clients use path-style
addressing, checksums ``when_required`` and botocore's SigV4 payload signing;
``torch.save`` goes through one ``BytesIO`` and one ``put_object`` (boto3); DCP over
s3fs uses ``FsspecWriter(thread_count=4, sync_files=False)`` (one file per thread);
s3torchconnector uses its CRT client with ``force_path_style`` (its DCP writer and
reader take no endpoint, so their file system is replaced by one whose client has it,
through the private ``s3torchconnector._s3client.S3Client``); torchsnapshot's S3
plugin takes no endpoint either and is pointed at the server with
``AWS_ENDPOINT_URL_S3``. asyncckpt runs as users get it (``TransferConfig()``).

An op whose asyncckpt feature is missing in this version (torch tensors as blobs,
in-place restore) returns ``status: unavailable`` with the reason, found by a probe on
``memory://`` before the timed region (feature detection, not a version check).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from asyncckpt import MultiNodeCheckpointManager
from asyncckpt.testing.s3_server import REGION

from ._ops import ChildContext, as_numpy, ckpt_load, ckpt_save, ckpt_save_async, verify_state
from ._state import SCALARS, BlobSpec, build_state

__all__ = ["PEER_CHILD_OPS"]

DCP_THREADS = 4


def torch_state(layout: Sequence[BlobSpec]) -> dict[str, dict[str, Any]]:
    """The generated state with every array as a torch tensor over the same memory."""
    import torch

    return {
        node: {k: (torch.from_numpy(v) if hasattr(v, "dtype") else v) for k, v in ws.items()}
        for node, ws in build_state(layout).items()
    }


def torch_targets(layout: Sequence[BlobSpec]) -> dict[str, dict[str, Any]]:
    """Load targets: zero-filled (resident) tensors of the state's dtypes and shapes, and placeholder scalars."""
    import torch

    out: dict[str, dict[str, Any]] = {}
    for blob in layout:
        ws = out.setdefault(blob.node, {key: type(value)() for key, value in SCALARS.items()})
        ws[blob.name] = torch.zeros(blob.count, dtype=getattr(torch, blob.dtype))
    return out


def numpy_targets(layout: Sequence[BlobSpec]) -> dict[str, dict[str, Any]]:
    """Load targets: zero-filled (resident) numpy arrays of the state's dtypes and shapes."""
    import numpy as np

    out: dict[str, dict[str, Any]] = {}
    for blob in layout:
        arr = np.empty(blob.count, dtype=blob.dtype)
        arr.fill(0)  # np.zeros would map untouched pages
        out.setdefault(blob.node, {})[blob.name] = arr
    return out


def _loaded(ctx: ChildContext, state: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    problem = verify_state(ctx, as_numpy(state))
    return {"bytes": ctx.state_bytes, "verified": problem is None, "problem": problem}


def _key(ctx: ChildContext, name: str) -> str:
    return f"{ctx.job.prefix}/{name}"


def _uri(ctx: ChildContext, name: str) -> str:
    return f"s3://{ctx.job.bucket}/{_key(ctx, name)}"


# ---------------------------------------------------------------------- torch.save + one PUT


def _boto3_client(ctx: ChildContext) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=ctx.job.endpoint, region_name=REGION, config=config)


def op_torchsave_save(ctx: ChildContext) -> dict[str, Any]:
    import torch

    state = torch_state(ctx.layout)
    client = _boto3_client(ctx)
    ctx.meter.start()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    client.put_object(Bucket=ctx.job.bucket, Key=_key(ctx, "state.pt"), Body=buffer.getvalue())
    ctx.meter.stop()
    client.close()
    return {"bytes": ctx.state_bytes}


def op_torchsave_load(ctx: ChildContext) -> dict[str, Any]:
    import torch

    client = _boto3_client(ctx)
    ctx.meter.start()
    body = client.get_object(Bucket=ctx.job.bucket, Key=_key(ctx, "state.pt"))["Body"].read()
    state = torch.load(io.BytesIO(body), weights_only=True)
    ctx.meter.stop()
    client.close()
    return _loaded(ctx, state)


# ---------------------------------------------------------------------- DCP over s3fs


def _fsspec_options(ctx: ChildContext) -> dict[str, Any]:
    """s3fs's options (``FsspecWriter``/``Reader`` pass them to ``s3fs.S3FileSystem``)."""
    return {
        "client_kwargs": {"endpoint_url": ctx.job.endpoint, "region_name": REGION},
        "config_kwargs": {
            "s3": {"addressing_style": "path"},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        },
    }


def _fsspec_writer(ctx: ChildContext) -> Any:
    # torch 2.13 does not re-export FsspecWriter from torch.distributed.checkpoint
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(_uri(ctx, "dcp"), thread_count=DCP_THREADS, sync_files=False, **_fsspec_options(ctx))


def op_dcp_save(ctx: ChildContext) -> dict[str, Any]:
    from torch.distributed.checkpoint import state_dict_saver

    state = torch_state(ctx.layout)
    writer = _fsspec_writer(ctx)
    ctx.meter.start()
    state_dict_saver.save(state, storage_writer=writer, no_dist=True)
    ctx.meter.stop()
    return {"bytes": ctx.state_bytes}


def op_dcp_async_save(ctx: ChildContext) -> dict[str, Any]:
    from torch.distributed.checkpoint import state_dict_saver

    state = torch_state(ctx.layout)
    writer = _fsspec_writer(ctx)
    ctx.meter.start()
    future = state_dict_saver.async_save(state, storage_writer=writer, no_dist=True)
    ctx.meter.lap("blocking")
    assert isinstance(future, Future)  # not an AsyncSaveResponse: no async_stager was given
    future.result()
    ctx.meter.stop()
    return {"bytes": ctx.state_bytes}


def op_dcp_load(ctx: ChildContext) -> dict[str, Any]:
    from torch.distributed.checkpoint import state_dict_loader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    target = torch_targets(ctx.layout)
    reader = FsspecReader(_uri(ctx, "dcp"), **_fsspec_options(ctx))
    ctx.meter.start()
    state_dict_loader.load(target, storage_reader=reader, no_dist=True)
    ctx.meter.stop()
    return _loaded(ctx, target)


# ---------------------------------------------------------------------- s3torchconnector


def _s3tc_config() -> Any:
    from s3torchconnector import S3ClientConfig

    return S3ClientConfig(force_path_style=True)


def _s3tc_checkpoint(ctx: ChildContext) -> Any:
    from s3torchconnector import S3Checkpoint

    return S3Checkpoint(REGION, endpoint=ctx.job.endpoint, s3client_config=_s3tc_config())


def op_s3tc_save(ctx: ChildContext) -> dict[str, Any]:
    import torch

    state = torch_state(ctx.layout)
    checkpoint = _s3tc_checkpoint(ctx)
    ctx.meter.start()
    with checkpoint.writer(_uri(ctx, "state.pt")) as writer:
        torch.save(state, writer)
    ctx.meter.stop()
    return {"bytes": ctx.state_bytes}


def op_s3tc_load(ctx: ChildContext) -> dict[str, Any]:
    import torch

    checkpoint = _s3tc_checkpoint(ctx)
    ctx.meter.start()
    reader = checkpoint.reader(_uri(ctx, "state.pt"))
    state = torch.load(reader, weights_only=True)
    reader.close()
    ctx.meter.stop()
    return _loaded(ctx, state)


def _s3tc_file_system(ctx: ChildContext, **kwargs: Any) -> Any:
    """s3torchconnector's DCP file system with a client on the server's endpoint."""
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    client = S3Client(REGION, endpoint=ctx.job.endpoint, s3client_config=_s3tc_config())
    return S3FileSystem(REGION, s3_client=client, **kwargs)


def op_s3tc_dcp_save(ctx: ChildContext) -> dict[str, Any]:
    from s3torchconnector.dcp import S3StorageWriter
    from torch.distributed.checkpoint import state_dict_saver

    state = torch_state(ctx.layout)
    writer = S3StorageWriter(REGION, _uri(ctx, "dcp"), s3client_config=_s3tc_config(), thread_count=DCP_THREADS)
    writer.fs = _s3tc_file_system(ctx)
    writer.path = writer.fs.init_path(_uri(ctx, "dcp"))
    ctx.meter.start()
    state_dict_saver.save(state, storage_writer=writer, no_dist=True)
    ctx.meter.stop()
    return {"bytes": ctx.state_bytes}


def op_s3tc_dcp_load(ctx: ChildContext) -> dict[str, Any]:
    from s3torchconnector.dcp import S3StorageReader
    from torch.distributed.checkpoint import state_dict_loader

    target = torch_targets(ctx.layout)
    reader = S3StorageReader(REGION, _uri(ctx, "dcp"), s3client_config=_s3tc_config())
    reader.fs = _s3tc_file_system(ctx, reader_constructor=reader._reader_constructor)
    reader.path = reader.fs.init_path(_uri(ctx, "dcp"))
    ctx.meter.start()
    state_dict_loader.load(target, storage_reader=reader, no_dist=True)
    ctx.meter.stop()
    return _loaded(ctx, target)


# ---------------------------------------------------------------------- torchsnapshot


def _torchsnapshot_env(ctx: ChildContext) -> None:
    """torchsnapshot's S3 plugin makes its clients with no endpoint: botocore reads these."""
    os.environ["AWS_ENDPOINT_URL_S3"] = ctx.job.endpoint
    os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] = "when_required"
    os.environ["AWS_RESPONSE_CHECKSUM_VALIDATION"] = "when_required"


def op_tsnap_save(ctx: ChildContext) -> dict[str, Any]:
    _torchsnapshot_env(ctx)
    from torchsnapshot import Snapshot, StateDict

    app_state = {"state": StateDict(torch_state(ctx.layout))}
    ctx.meter.start()
    Snapshot.take(path=_uri(ctx, "tsnap"), app_state=app_state)
    ctx.meter.stop()
    return {"bytes": ctx.state_bytes}


def op_tsnap_load(ctx: ChildContext) -> dict[str, Any]:
    _torchsnapshot_env(ctx)
    from torchsnapshot import Snapshot, StateDict

    target = StateDict(torch_targets(ctx.layout))
    snapshot = Snapshot(path=_uri(ctx, "tsnap"))
    ctx.meter.start()
    snapshot.restore(app_state={"state": target})
    ctx.meter.stop()
    return _loaded(ctx, dict(target))


# ---------------------------------------------------------------------- asyncckpt: torch state, in place, DCP


async def _probe_restore(make: Callable[[], Any], in_place: bool) -> str | None:
    """Why this asyncckpt cannot save ``make()`` as a blob and load it back (in place when
    ``in_place``: into a workspace already holding a value of the same shape), or None."""
    location = f"memory://asyncckpt-bench-probe-{os.getpid()}"
    saved = make()
    kind = f"{type(saved).__module__}.{type(saved).__name__}"
    async with MultiNodeCheckpointManager(location) as mgr:
        await mgr.init({"node": {"w": saved}})
        try:
            await mgr.save(1)
        except TypeError as exc:
            return f"this asyncckpt cannot save a {kind} ({exc})"
    target = make()
    async with MultiNodeCheckpointManager(location) as mgr:
        await mgr.init({"node": {"w": target}} if in_place else ["node"])
        await mgr.load(1)
        loaded = mgr.workspace("node")["w"]
    if type(loaded) is not type(saved):
        return f"this asyncckpt loads a {kind} back as a {type(loaded).__name__}"
    if in_place and loaded is not target:
        return f"this asyncckpt's load replaces the workspace's {kind} (no in-place restore)"
    return None


def _small_tensor() -> Any:
    import torch

    return torch.arange(4, dtype=torch.float32)


def _small_array() -> Any:
    import numpy as np

    return np.arange(4, dtype=np.float32)


async def op_ckpt_inplace_load(ctx: ChildContext) -> dict[str, Any]:
    reason = await _probe_restore(_small_array, in_place=True)
    if reason is not None:
        return {"status": "unavailable", "reason": reason}
    return await ckpt_load(ctx, {n: {**SCALARS, **ws} for n, ws in numpy_targets(ctx.layout).items()})


async def op_ckpt_torch_save(ctx: ChildContext) -> dict[str, Any]:
    reason = await _probe_restore(_small_tensor, in_place=False)
    if reason is not None:
        return {"status": "unavailable", "reason": reason}
    return await ckpt_save(ctx, torch_state(ctx.layout))


async def op_ckpt_torch_load(ctx: ChildContext) -> dict[str, Any]:
    reason = await _probe_restore(_small_tensor, in_place=False)
    if reason is not None:
        return {"status": "unavailable", "reason": reason}
    return await ckpt_load(ctx, None)


async def op_ckpt_torch_inplace_load(ctx: ChildContext) -> dict[str, Any]:
    reason = await _probe_restore(_small_tensor, in_place=True)
    if reason is not None:
        return {"status": "unavailable", "reason": reason}
    return await ckpt_load(ctx, torch_targets(ctx.layout))


async def op_ckpt_torch_save_async(ctx: ChildContext) -> dict[str, Any]:
    reason = await _probe_restore(_small_tensor, in_place=False)
    if reason is not None:
        return {"status": "unavailable", "reason": reason}
    return await ckpt_save_async(ctx, torch_state(ctx.layout))


def op_ckpt_dcp_save(ctx: ChildContext) -> dict[str, Any]:
    from torch.distributed.checkpoint import state_dict_saver

    from asyncckpt.dcp import StorageWriter  # type: ignore[import-not-found,unused-ignore]

    state = torch_state(ctx.layout)
    writer = StorageWriter(ctx.location() + "/dcp", storage_options=ctx.storage_options())
    ctx.meter.start()
    state_dict_saver.save(state, storage_writer=writer, no_dist=True)
    ctx.meter.stop()
    _close(writer)
    return {"bytes": ctx.state_bytes}


def op_ckpt_dcp_load(ctx: ChildContext) -> dict[str, Any]:
    from torch.distributed.checkpoint import state_dict_loader

    from asyncckpt.dcp import StorageReader  # type: ignore[import-not-found,unused-ignore]

    target = torch_targets(ctx.layout)
    reader = StorageReader(ctx.location() + "/dcp", storage_options=ctx.storage_options())
    ctx.meter.start()
    state_dict_loader.load(target, storage_reader=reader, no_dist=True)
    ctx.meter.stop()
    _close(reader)
    return _loaded(ctx, target)


def _close(plugin: Any) -> None:
    close = getattr(plugin, "close", None)
    if callable(close):
        close()


PEER_CHILD_OPS: dict[str, Callable[[ChildContext], Any]] = {
    "torchsave_save": op_torchsave_save,
    "torchsave_load": op_torchsave_load,
    "dcp_save": op_dcp_save,
    "dcp_load": op_dcp_load,
    "dcp_async_save": op_dcp_async_save,
    "s3tc_save": op_s3tc_save,
    "s3tc_load": op_s3tc_load,
    "s3tc_dcp_save": op_s3tc_dcp_save,
    "s3tc_dcp_load": op_s3tc_dcp_load,
    "tsnap_save": op_tsnap_save,
    "tsnap_load": op_tsnap_load,
    "ckpt_inplace_load": op_ckpt_inplace_load,
    "ckpt_torch_save": op_ckpt_torch_save,
    "ckpt_torch_load": op_ckpt_torch_load,
    "ckpt_torch_inplace_load": op_ckpt_torch_inplace_load,
    "ckpt_torch_save_async": op_ckpt_torch_save_async,
    "ckpt_dcp_save": op_ckpt_dcp_save,
    "ckpt_dcp_load": op_ckpt_dcp_load,
}
