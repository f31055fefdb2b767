"""A two-node training job driven by JobRunner: resume, cadence, background saves.

``JobRunner`` resumes from the latest committed epoch (or saves epoch 0), calls
``train_epoch`` for each remaining epoch, saves every second epoch in the background
while the next one trains, and always saves the last. The first run is preempted (an
exception in epoch 5); the second resumes from epoch 4 and must end with exactly the
state of a run that was never interrupted.

    python examples/job_runner.py              # an embedded moto S3 server on 127.0.0.1
    python examples/job_runner.py /some/dir    # a local directory
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

import numpy as np

from asyncckpt import JobRunner, MultiNodeCheckpointManager

EPOCHS = 8


class Preempted(Exception):
    """Stands in for the end of a spot instance."""


def fresh_state() -> dict[str, dict[str, Any]]:
    return {node: {"w": np.full(32, float(i)), "step": 0} for i, node in enumerate(("trainer_0", "trainer_1"))}


def step(workspaces: dict[str, dict[str, Any]], epoch: int) -> dict[str, float]:
    """One epoch of "training" on every node, in place; returns the epoch's metrics."""
    for i, ws in enumerate(workspaces.values()):
        ws["w"] = 0.5 * ws["w"] + np.random.default_rng([epoch, i]).standard_normal(32)
        ws["step"] += 1
    return {"loss": float(np.mean([np.mean(ws["w"] ** 2) for ws in workspaces.values()]))}


async def train(location: str, options: dict[str, Any] | None, preempt_at: int | None = None) -> dict[str, Any]:
    workspaces = fresh_state()
    async with MultiNodeCheckpointManager(location, storage_options=options) as mgr:
        await mgr.init(workspaces)  # the nodes and their workspaces; JobRunner does the rest

        def train_epoch(epoch: int) -> dict[str, float]:  # a plain function: runs in a worker thread
            if epoch == preempt_at:
                raise Preempted(f"preempted during epoch {epoch}")
            metrics = step(workspaces, epoch)
            print(f"epoch {epoch}: loss {metrics['loss']:.4f}")
            return metrics  # kept in the epoch's commit record when it is saved

        runner = JobRunner(mgr, save_every=2)
        try:
            last = await runner.run(train_epoch, EPOCHS)
        finally:
            if runner.resumed_from is not None:
                print(f"(this run resumed from epoch {runner.resumed_from})")
            for failed in runner.failed_saves:  # saves that failed while training went on
                print(f"the save of epoch {failed.epoch} failed: {failed.error}")
            print("committed epochs:", await mgr.committed_epochs())
        print(f"done: epoch {last} is the last, and it is committed")
    return workspaces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("location", nargs="?", help="a directory (default: a bucket on an embedded moto S3 server)")
    args = parser.parse_args()
    if args.location:
        asyncio.run(run(args.location, None))
        return
    from asyncckpt.testing.s3_server import embedded_bucket

    with contextlib.ExitStack() as stack:
        try:
            options = stack.enter_context(embedded_bucket("asyncckpt-example"))
        except RuntimeError as exc:
            parser.error(f"no location and no embedded S3 server ({exc})")
        asyncio.run(run("s3://asyncckpt-example/job-runner", options))


async def run(location: str, options: dict[str, Any] | None) -> None:
    print(f"{EPOCHS} epochs, a save every 2 -> {location}")
    try:
        await train(location, options, preempt_at=5)
    except Preempted as exc:
        print(f"the job stops: {exc}")
    print("the job starts again:")
    workspaces = await train(location, options)
    expected = fresh_state()
    for epoch in range(1, EPOCHS + 1):  # the same training, never interrupted, no checkpoints
        step(expected, epoch)
    for node, want in expected.items():
        if workspaces[node]["step"] != want["step"] or not np.array_equal(workspaces[node]["w"], want["w"]):
            sys.exit(f"FAIL: {node} ended with another state than an uninterrupted run")
    print("PASS")


if __name__ == "__main__":
    main()
