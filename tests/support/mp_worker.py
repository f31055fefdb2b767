"""One process of a multi-process job, for tests/test_multiprocess.py (not a test module).

Run as ``python tests/support/mp_worker.py '<json>'``; prints one JSON object per line on stdout
(``{"event": ...}``) and exits 0 on success, 2 when a save raised a CheckpointError.

Arguments (a JSON object):

    url, endpoint          checkpoint location (s3://bucket/prefix) and the S3 endpoint
    run_id                 the job incarnation (shared by every process of one job)
    nodes, local           every node of the job, and the nodes this process holds
    seed                   the job's state is expected_state(seed, node, epoch)
    epochs                 epochs to save, in order (default [])
    commit_timeout         TransferConfig.commit_timeout (default 60 s)
    resume                 resume: get_resume_from_epoch_id + init(retrieve_from_epoch) + load
    elastic                {"old_nodes": [...], "blobs": [...]}: after init, load_blobs_locally
                           "old/blob" of the latest epoch into the first local node's workspace
    barrier                print {"event": "ready"} and wait for a line on stdin before saving
    stop_before            before saving this epoch print {"event": "blocked"} and block on
                           stdin (the parent SIGKILLs us there, or sends "continue")

The expected values are defined here so the parent test checks the same thing.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import zlib
from typing import Any

import numpy as np

BLOBS = ("weights", "step", "meta")


def expected_state(seed: int, node: str, epoch: int) -> dict[str, Any]:
    """The state of ``node`` at ``epoch`` of a job seeded with ``seed`` (exact integers)."""
    base = np.random.default_rng([seed, zlib.crc32(node.encode())]).integers(0, 10**6, 512, dtype=np.int64)
    return {"weights": base + epoch, "step": epoch, "meta": {"node": node, "seed": seed}}


def same_state(got: Any, want: dict[str, Any]) -> bool:
    return (
        isinstance(got.get("weights"), np.ndarray)
        and np.array_equal(got["weights"], want["weights"])
        and got.get("step") == want["step"]
        and got.get("meta") == want["meta"]
    )


def emit(**event: Any) -> None:
    print(json.dumps({**event, "t": round(time.time(), 3)}), flush=True)


async def run(args: dict[str, Any]) -> int:
    from asyncckpt import CheckpointError, MultiNodeCheckpointManager, TransferConfig

    options = {"endpoint_url": args["endpoint"], "region_name": "us-east-1", "addressing_style": "path"}
    config = TransferConfig(commit_timeout=float(args.get("commit_timeout", 60.0)))
    nodes, local, seed = args["nodes"], args["local"], args["seed"]
    async with MultiNodeCheckpointManager(
        args["url"], storage_options=options, config=config, run_id=args["run_id"]
    ) as mgr:
        if args.get("resume"):
            epoch = await mgr.get_resume_from_epoch_id()
            await mgr.init(nodes, retrieve_from_epoch=epoch, local_nodes=local)
            await mgr.load(epoch)
            ok = all(same_state(mgr.workspace(n), expected_state(seed, n, epoch)) for n in local)
            emit(event="resumed", epoch=epoch, ok=ok)
        else:
            await mgr.init(nodes, local_nodes=local)
            for node in local:
                mgr.workspace(node).update(expected_state(seed, node, 0))
        if args.get("elastic"):
            old_nodes = args["elastic"]["old_nodes"]
            epoch = await mgr.get_resume_from_epoch_id()
            names = [f"{old}/{blob}" for old in old_nodes for blob in BLOBS]
            session = mgr.workspace(local[0])
            found = await mgr.load_blobs_locally(old_nodes, names, epoch, session)
            ok = found and all(
                same_state({b: session.get(f"{old}/{b}") for b in BLOBS}, expected_state(seed, old, epoch))
                for old in old_nodes
            )
            report = await mgr.report_checkpoint_stats("checkpoint_partial_load")
            emit(event="elastic", epoch=epoch, found=found, ok=ok, keys=sorted(session), nodes=sorted(report["nodes"]))
        if args.get("barrier"):
            emit(event="ready")
            sys.stdin.readline()
        for epoch in args.get("epochs", []):
            if epoch == args.get("stop_before"):
                emit(event="blocked", epoch=epoch)
                if sys.stdin.readline().strip() != "continue":  # the parent kills us, or lets us go on
                    return 1
            for node in local:
                ws = mgr.workspace(node)
                if "step" in ws:  # advance the state (restored or fresh) to this epoch
                    ws["weights"] = ws["weights"] + (epoch - ws["step"])
                    ws["step"] = epoch
            try:
                await mgr.save(epoch)
            except CheckpointError as exc:
                emit(
                    event="error",
                    epoch=epoch,
                    type=type(exc).__name__,
                    message=str(exc),
                    missing_nodes=getattr(exc, "missing_nodes", None),
                )
                return 2
            report = await mgr.report_checkpoint_stats("checkpoint_save")
            emit(event="saved", epoch=epoch, nodes=sorted(report["nodes"]), slowest_node=report["slowest_node"])
    emit(event="closed")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(run(json.loads(sys.argv[1]))))
