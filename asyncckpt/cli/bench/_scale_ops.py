"""The measured operations of ``asyncckpt bench --scale``, each in a fresh process.

``python -m asyncckpt.cli.bench._scale_ops JOB`` (``JOB``: a :class:`ScaleJob` as JSON)
runs one op on an event loop of its own and prints one JSON line: what the op returned
and ``status`` (``ok``, ``mismatch`` when a load read back other values, or ``error``).
Exit code 0 when the status is ``ok``. Only :mod:`._scale` starts it.

Every op builds its state before the measured region and brackets exactly the operation
with a :class:`~._meters.Meter` (wall, client CPU, VmHWM reset before the op, moto's CPU);
the requests and response bytes come from the server's log (:mod:`._scale_log`).

``commit``
    N nodes x B tiny blobs in one process: encode, upload every shard
    (:func:`asyncckpt.transfer.upload_nodes`, as ``save``'s attempt does), then the measured
    commit with the real records: the index PUT, the create-only decision and the manifest
    (:mod:`asyncckpt.commit`, as ``save`` calls it). Repeated for each epoch.
``resume``
    a fresh manager: ``get_resume_from_epoch_id()``, then ``committed_epochs()``.
``job_worker``
    one process of a P-process job (one node, tiny state, the job's ``run_id``): prints
    ``ready``, waits for a line on stdin, then saves each epoch, counting its own requests.
``partial_prep`` / ``partial_load`` / ``full_load``
    one node of many small float32 blobs: save it; ``load_blobs_locally`` of k blobs spread
    evenly over it (the default ``coalesce_gap``, or the one given); ``load`` of the whole
    node. Loads are verified value by value.
``memory_save``
    ``save`` of 4 nodes of float32 arrays (or of many tiny blobs) with the default
    :class:`~asyncckpt.TransferConfig`, after a warm-up request; its extra RSS.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from asyncckpt import MiB, MultiNodeCheckpointManager, TransferConfig, layout
from asyncckpt.commit import decide_commit, publish_manifest, stage_commit
from asyncckpt.manifest import EpochIndex
from asyncckpt.staging import encode_workspaces
from asyncckpt.storage import ByteBudget, collect_request_stats, storage_for
from asyncckpt.testing.s3_server import REGION
from asyncckpt.transfer import upload_nodes

from .._options import node_names
from ._meters import Meter
from ._scale_log import read_requests, summarize_requests

__all__ = ["READY", "SCALE_OPS", "ScaleJob", "main", "partial_selection", "tiny_workspaces"]

READY = "ready"  # the line a job_worker prints once it waits for the start signal
TINY_ELEMENTS = 2  # a tiny blob: two float32 (8 bytes)
DB_TYPE = "msgpack"


@dataclass(frozen=True)
class ScaleJob:
    """One measurement as its process gets it: the op, where its objects go (``bucket``
    and ``prefix`` on ``endpoint``), the server to watch, and the op's arguments."""

    op: str
    endpoint: str
    bucket: str
    prefix: str
    server_pid: int | None = None
    server_log: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ScaleJob:
        return cls(**json.loads(text))

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """``storage_options`` for the server (credentials come from the environment)."""
        return {"endpoint_url": self.endpoint, "region_name": REGION, "addressing_style": "path"}

    def manager(self, **kwargs: Any) -> MultiNodeCheckpointManager:
        return MultiNodeCheckpointManager(self.location, storage_options=self.storage_options, **kwargs)

    def meter(self) -> Meter:
        return Meter(self.server_pid, self.server_log)


def measured(job: ScaleJob, meter: Meter) -> dict[str, Any]:
    """A stopped meter's readings, with the requests and response bytes the server logged
    in between (``server``) and the extra RSS (peak minus RSS before)."""
    raw = meter.result()
    out = {
        k: raw[k]
        for k in ("wall_s", "cpu_s", "cpu_user_s", "cpu_sys_s", "server_cpu_s", "rss_before_mib", "peak_rss_mib")
    }
    out["extra_rss_mib"] = raw["peak_rss_mib"] - raw["rss_before_mib"]
    out["peak_rss_source"] = raw["peak_rss_source"]
    if job.server_log and meter.log0 is not None and meter.log1 is not None:
        out["server"] = summarize_requests(read_requests(job.server_log, meter.log0, meter.log1))
    return out


def tiny_workspaces(nodes: list[str], blobs_per_node: int) -> dict[str, dict[str, Any]]:
    """``blobs_per_node`` tiny float32 arrays per node, each a view into one array per node."""
    out: dict[str, dict[str, Any]] = {}
    for i, node in enumerate(nodes):
        values = np.arange(blobs_per_node * TINY_ELEMENTS, dtype=np.float32).reshape(-1, TINY_ELEMENTS) + i
        out[node] = {f"b{j:06d}": values[j] for j in range(blobs_per_node)}
    return out


def partial_selection(blobs: int, k: int) -> list[int]:
    """``k`` blob numbers of ``blobs``, spread evenly (``k = blobs / 2``: every other one)."""
    return [i * blobs // k for i in range(k)]


def _partial_blob(i: int, elements: int) -> np.ndarray[Any, Any]:
    """Blob ``i`` of the partial-load node: distinct values at every position (exact in float32)."""
    return np.arange(i * elements, (i + 1) * elements, dtype=np.float32)


def _partial_name(i: int) -> str:
    return f"p{i:06d}"


# ---------------------------------------------------------------------- the ops


async def op_commit(job: ScaleJob) -> dict[str, Any]:
    nodes = node_names(job.args["nodes"])
    blobs, epochs = job.args["blobs_per_node"], job.args["epochs"]
    started = time.perf_counter()
    workspaces = tiny_workspaces(nodes, blobs)
    encoded = await asyncio.to_thread(encode_workspaces, workspaces)
    build_s = time.perf_counter() - started
    config = TransferConfig()
    storage = storage_for(job.location, options=job.storage_options, config=config)
    await storage.open()
    run_id, seed = layout.new_run_id(), layout.new_token_seed()
    out: dict[str, Any] = {"build_and_encode_s": build_s, "epochs": []}
    try:
        for epoch in range(1, epochs + 1):
            writer_id = layout.solo_writer_id(run_id, layout.attempt_token(seed, epoch, 0))
            upload = job.meter()
            upload.start()
            records = await upload_nodes(
                storage, ByteBudget(config.max_bytes_in_flight), epoch, writer_id, encoded, config.max_nodes_in_flight
            )
            upload.stop()
            commit = job.meter()
            commit.start()
            manifest = await stage_commit(storage, EpochIndex(epoch, writer_id, records), DB_TYPE)
            await decide_commit(storage, manifest)
            await publish_manifest(storage, manifest)
            commit.stop()
            out["epochs"].append(
                {
                    "epoch": epoch,
                    "upload": measured(job, upload),
                    "commit": measured(job, commit),
                    "index_bytes": manifest.index_size,
                    "manifest_bytes": len(manifest.to_json()),
                    "shard_bytes": manifest.total_bytes,
                }
            )
    finally:
        await storage.close()
    return out


async def op_resume(job: ScaleJob) -> dict[str, Any]:
    async with job.manager() as mgr:
        resume = job.meter()
        resume.start()
        epoch = await mgr.get_resume_from_epoch_id()
        resume.stop()
        listing = job.meter()
        listing.start()
        epochs = await mgr.committed_epochs()
        listing.stop()
    return {
        "resume_epoch": epoch,
        "resume": measured(job, resume),
        "committed_epochs": epochs,
        "listing": measured(job, listing),
    }


async def op_job_worker(job: ScaleJob) -> dict[str, Any]:
    nodes, rank, epochs = job.args["nodes"], job.args["rank"], job.args["epochs"]
    node = nodes[rank]
    workspace = {"w": np.arange(16, dtype=np.float32) + rank}
    async with job.manager(run_id=job.args["run_id"]) as mgr:
        await mgr.init(nodes, local_nodes={node: workspace})
        await mgr.cp_accessible()  # warm-up (client, connection) before the start signal
        print(READY, flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        per_epoch = []
        for epoch in range(1, epochs + 1):
            cpu0, t0 = _cpu(), time.perf_counter()
            with collect_request_stats() as counted:
                await mgr.save(epoch)
            per_epoch.append(
                {
                    "epoch": epoch,
                    "wall_s": time.perf_counter() - t0,
                    "cpu_s": _cpu() - cpu0,
                    "requests": counted.requests,
                }
            )
    return {"node": node, "committer": rank == 0, "per_epoch": per_epoch}


def _cpu() -> float:
    return time.process_time()


async def op_partial_prep(job: ScaleJob) -> dict[str, Any]:
    blobs, elements = job.args["blobs"], job.args["elements"]
    workspace = {_partial_name(i): _partial_blob(i, elements) for i in range(blobs)}
    async with job.manager() as mgr:
        await mgr.init({"node": workspace})
        t0 = time.perf_counter()
        await mgr.save(1)
    return {"save_s": time.perf_counter() - t0, "state_bytes": blobs * elements * 4}


async def op_partial_load(job: ScaleJob) -> dict[str, Any]:
    blobs, elements, k = job.args["blobs"], job.args["elements"], job.args["k"]
    wanted = partial_selection(blobs, k)
    names = [_partial_name(i) for i in wanted]
    session: dict[str, Any] = {}
    gap = job.args.get("coalesce_gap")
    config = TransferConfig() if gap is None else TransferConfig(coalesce_gap=gap)
    async with job.manager(config=config) as mgr:
        await mgr.cp_accessible()  # warm-up
        meter = job.meter()
        meter.start()
        found = await mgr.load_blobs_locally(["node"], names, 1, session)
        meter.stop()
    verified = (
        found
        and len(session) == k
        and all(np.array_equal(session[_partial_name(i)], _partial_blob(i, elements)) for i in wanted)
    )
    return {"k": k, "coalesce_gap": config.coalesce_gap, "verified": verified, **measured(job, meter)}


async def op_full_load(job: ScaleJob) -> dict[str, Any]:
    blobs, elements = job.args["blobs"], job.args["elements"]
    async with job.manager() as mgr:
        await mgr.init(["node"])
        await mgr.cp_accessible()  # warm-up
        meter = job.meter()
        meter.start()
        await mgr.load(1)
        meter.stop()
        workspace = mgr.workspace("node")
        verified = len(workspace) == blobs and all(
            np.array_equal(workspace[_partial_name(i)], _partial_blob(i, elements)) for i in range(blobs)
        )
    return {"k": blobs, "verified": verified, **measured(job, meter)}


async def op_memory_save(job: ScaleJob) -> dict[str, Any]:
    nodes = node_names(job.args["nodes"])
    tiny = job.args.get("tiny_blobs")
    if tiny:
        workspaces = tiny_workspaces(nodes, tiny // len(nodes))
        state_bytes = (tiny // len(nodes)) * len(nodes) * TINY_ELEMENTS * 4
    else:
        per_blob = int(job.args["state_mib"] * MiB) // (len(nodes) * job.args["blobs_per_node"]) // 4
        rng = np.random.default_rng(0)
        workspaces = {
            node: {
                f"w{j:02d}": rng.standard_normal(per_blob, dtype=np.float32) for j in range(job.args["blobs_per_node"])
            }
            for node in nodes
        }
        state_bytes = per_blob * 4 * len(nodes) * job.args["blobs_per_node"]
    config = TransferConfig()
    async with job.manager(config=config) as mgr:
        await mgr.init(workspaces)
        await mgr.cp_accessible()  # warm-up: client and connection exist before the op
        meter = job.meter()
        meter.start()
        await mgr.save(1)
        meter.stop()
    return {"state_bytes": state_bytes, "max_bytes_in_flight": config.max_bytes_in_flight, **measured(job, meter)}


SCALE_OPS: Mapping[str, Callable[[ScaleJob], Coroutine[Any, Any, dict[str, Any]]]] = {
    "commit": op_commit,
    "resume": op_resume,
    "job_worker": op_job_worker,
    "partial_prep": op_partial_prep,
    "partial_load": op_partial_load,
    "full_load": op_full_load,
    "memory_save": op_memory_save,
}


def main(argv: list[str]) -> int:
    """Run the op of ``argv[0]`` (a JSON :class:`ScaleJob`); print its one JSON line."""
    warnings.simplefilter("ignore")  # e.g. aiohttp's ResourceWarning about large raw bodies
    job = ScaleJob.from_json(argv[0])
    out: dict[str, Any] = {"op": job.op, "prefix": job.prefix, "pid": os.getpid()}
    try:
        out.update(asyncio.run(SCALE_OPS[job.op](job)))
        out.setdefault("status", "ok")
        if out.get("verified") is False:
            out["status"] = "mismatch"
    except BaseException as exc:  # report, never hang the parent
        out.update(status="error", error=f"{type(exc).__name__}: {exc}")
    print(json.dumps(out), flush=True)
    return 0 if out["status"] == "ok" else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(
            "usage: python -m asyncckpt.cli.bench._scale_ops JOB (a JSON job; `asyncckpt bench --scale` starts this)"
        )
    sys.exit(main(sys.argv[1:]))
