"""A plain, synchronous PyTorch-style training loop checkpointing with SyncCheckpointManager.

numpy stands in for torch (a torch user checkpoints ``tensor.detach().cpu().numpy()``).
The loop saves every epoch in the background while the next one trains, stops half-way
as if the job were preempted, then starts again: it resumes from the latest committed
epoch and must end with exactly the weights of a run that was never interrupted.

    python examples/sync_loop.py              # an embedded moto S3 server on 127.0.0.1
    python examples/sync_loop.py /some/dir    # a local directory
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import numpy as np

from asyncckpt import SyncCheckpointManager

EPOCHS = 6


def train_one_epoch(model: dict[str, Any], optimizer: dict[str, Any], epoch: int) -> float:
    """One epoch of SGD with momentum on a least-squares toy problem, in place."""
    rng = np.random.default_rng(epoch)
    x = rng.standard_normal((256, model["w"].size))
    y = x @ np.linspace(-1.0, 1.0, model["w"].size)
    for batch in range(0, len(x), 32):
        xb, yb = x[batch : batch + 32], y[batch : batch + 32]
        grad = 2 * xb.T @ (xb @ model["w"] - yb) / len(xb)
        optimizer["momentum"] *= 0.9
        optimizer["momentum"] += grad
        model["w"] -= optimizer["lr"] * optimizer["momentum"]
        optimizer["step"] += 1
    return float(np.mean((x @ model["w"] - y) ** 2))


def train(location: str, options: dict[str, Any] | None, stop_after: int | None = None) -> np.ndarray:
    """Train up to EPOCHS, resuming from the latest committed epoch; ``stop_after`` ends
    the run early, as a preemption would."""
    model = {"w": np.zeros(16)}
    optimizer = {"momentum": np.zeros(16), "lr": 0.01, "step": 0}
    with SyncCheckpointManager(location, storage_options=options) as ckpt:
        ckpt.init({"model": model, "optimizer": optimizer})  # the same dicts, restored in place by load
        resume = ckpt.get_resume_from_epoch_id()  # the latest committed epoch, or None
        if resume is None:
            ckpt.save(0)  # epoch 0: the state before training
            first = 1
        else:
            ckpt.load(resume)
            first = resume + 1
            print(f"resumed from epoch {resume} (optimizer step {optimizer['step']})")
        pending = None
        for epoch in range(first, EPOCHS + 1):
            loss = train_one_epoch(model, optimizer, epoch)
            if pending is not None:
                pending.result()  # the previous epoch is committed (its error raised here)
            pending = ckpt.save_async(epoch, metrics={"loss": loss})  # returns once the state is copied
            print(f"epoch {epoch}: loss {loss:.4f}, saving in the background")
            if epoch == stop_after:
                break
        if pending is not None:
            pending.result()
        print("committed epochs:", ckpt.committed_epochs())
    return model["w"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("location", nargs="?", help="a directory (default: a bucket on an embedded moto S3 server)")
    args = parser.parse_args()
    if args.location:
        run(args.location, None)
        return
    from asyncckpt.testing.s3_server import embedded_bucket

    with contextlib.ExitStack() as stack:
        try:
            options = stack.enter_context(embedded_bucket("asyncckpt-example"))
        except RuntimeError as exc:
            parser.error(f"no location and no embedded S3 server ({exc})")
        run("s3://asyncckpt-example/sync-loop", options)


def run(location: str, options: dict[str, Any] | None) -> None:
    print(f"training {EPOCHS} epochs -> {location}; the job stops after epoch 3")
    train(location, options, stop_after=3)
    print("the job starts again:")
    weights = train(location, options)
    model, optimizer = {"w": np.zeros(16)}, {"momentum": np.zeros(16), "lr": 0.01, "step": 0}
    for epoch in range(1, EPOCHS + 1):  # the same training, never interrupted, no checkpoints
        train_one_epoch(model, optimizer, epoch)
    if not np.array_equal(weights, model["w"]):
        sys.exit("FAIL: the resumed run ended with other weights than an uninterrupted one")
    print("PASS")


if __name__ == "__main__":
    main()
