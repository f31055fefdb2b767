"""A training job of several OS processes checkpointing with asyncckpt.

Every process holds some of the job's nodes and saves only their shards; an epoch is
committed through the bucket alone (the manifest appears once every node's receipt is
there), and every process's ``save`` returns once the commit is visible. Then all
processes "restart" as a new job incarnation (a new run id), resume from the latest
committed epoch, check their state and train on.

    python examples/multiprocess_job.py                      # embedded moto S3 server
    python examples/multiprocess_job.py --url s3://bucket/prefix [--endpoint-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import sys
import time
import uuid
from typing import Any

import numpy as np

from asyncckpt import MiB, MultiNodeCheckpointManager, job_from_env, split_nodes
from asyncckpt.testing.s3_server import embedded_bucket


def say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write per line: processes share the terminal
    sys.stdout.flush()


def node_state(node: str, epoch: int, mib: float) -> dict[str, Any]:
    """What ``node`` holds after ``epoch`` (deterministic, so a resume can be checked)."""
    weights = np.arange(int(mib * MiB) // 8, dtype=np.float64) + int(node.rpartition("-")[2]) + epoch
    return {"weights": weights, "epoch": epoch}


async def train(args: argparse.Namespace, options: dict[str, Any], resume: bool) -> None:
    job = job_from_env()  # ASYNCCKPT_RUN_ID / ASYNCCKPT_RANK / ASYNCCKPT_WORLD_SIZE (or torchrun's)
    assert job is not None, "no job identity in the environment"
    nodes = [f"node-{i}" for i in range(args.nodes)]
    mine = split_nodes(nodes, job.rank, job.world_size)
    who = f"[run {job.run_id} rank {job.rank} pid {os.getpid()}]"
    async with MultiNodeCheckpointManager(args.url, storage_options=options, run_id=job.run_id) as mgr:
        start = 0
        if resume:
            epoch = await mgr.get_resume_from_epoch_id()
            assert epoch is not None, "nothing to resume from"
            await mgr.init(nodes, retrieve_from_epoch=epoch, local_nodes=mine)
            await mgr.load(epoch)
            for node in mine:
                want = node_state(node, epoch, args.mib_per_node)
                got = mgr.workspace(node)
                assert got["epoch"] == epoch and np.array_equal(got["weights"], want["weights"]), node
            say(f"{who} resumed from epoch {epoch}: {', '.join(mine)} verified")
            start = epoch + 1
        else:
            await mgr.init(nodes, local_nodes=mine)
        for epoch in range(start, start + (1 if resume else args.epochs)):
            for node in mine:  # "training"
                mgr.workspace(node).update(node_state(node, epoch, args.mib_per_node))
            await mgr.save(epoch)  # returns once the epoch is committed, by whichever process
            stats = await mgr.report_checkpoint_stats("checkpoint_save")  # this process's nodes
            say(f"{who} saw epoch {epoch} committed; saved here: {', '.join(sorted(stats['nodes']))}")


def worker(env: dict[str, str], args: argparse.Namespace, options: dict[str, Any], resume: bool) -> None:
    """The entry point of one process: the launcher's environment, then its own event loop."""
    os.environ.update(env)
    asyncio.run(train(args, options, resume))


def run_job(args: argparse.Namespace, options: dict[str, Any], resume: bool) -> None:
    """Start one process per rank (spawn), join them by PID with a deadline, kill leftovers."""
    ctx = multiprocessing.get_context("spawn")
    run_id = f"job-{uuid.uuid4().hex[:8]}"  # a new incarnation every time
    procs = []
    try:
        for rank in range(args.processes):
            env = {"ASYNCCKPT_RUN_ID": run_id, "ASYNCCKPT_RANK": str(rank), "ASYNCCKPT_WORLD_SIZE": str(args.processes)}
            proc = ctx.Process(target=worker, args=(env, args, options, resume), name=f"rank-{rank}")
            proc.start()
            procs.append(proc)
        say(f"started {run_id}: pids {[p.pid for p in procs]}")
        deadline = time.monotonic() + args.timeout
        for proc in procs:
            proc.join(max(deadline - time.monotonic(), 0.0))
        failed = {p.pid: p.exitcode for p in procs if p.exitcode != 0}
        if failed:
            sys.exit(f"FAIL: worker process(es) {failed} (pid: exit code; None = still running at the deadline)")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()  # SIGKILL to that PID
                proc.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="s3://bucket/prefix (default: a bucket on an embedded moto server)")
    parser.add_argument("--endpoint-url", help="S3 endpoint (MinIO...); credentials come from the AWS environment")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mib-per-node", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each wave of processes may take")
    args = parser.parse_args()
    if args.url:
        options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
        run_both(args, options)
        return
    with contextlib.ExitStack() as stack:
        try:  # moto in a thread of this process; workers use loopback
            options = stack.enter_context(embedded_bucket("asyncckpt-example"))
        except RuntimeError as exc:
            parser.error(f"no --url and no embedded S3 server ({exc})")
        args.url = "s3://asyncckpt-example/multiprocess-job"
        run_both(args, options)


def run_both(args: argparse.Namespace, options: dict[str, Any]) -> None:
    say(f"{args.processes} processes x {args.nodes} nodes, {args.epochs} epochs -> {args.url}")
    run_job(args, options, resume=False)
    say("every process restarts as a new job incarnation and resumes:")
    run_job(args, options, resume=True)
    say("PASS")


if __name__ == "__main__":
    main()
