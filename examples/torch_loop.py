"""A PyTorch training loop that checkpoints its model, AdamW, StepLR and RNG as they are.

The workspace holds the live objects: ``model``, ``optimizer`` and ``scheduler`` are saved as
their ``state_dict()`` and restored with ``load_state_dict()`` on the same objects (their
tensors are written in place), and the RNG through a four-line stateful wrapper. The loop
saves every epoch in the background while the next one trains, stops half-way as if the job
were preempted, starts again from the latest committed epoch, and must end with exactly the
weights of a run that was never interrupted (dropout draws from the restored RNG).

    python examples/torch_loop.py              # an embedded moto S3 server on 127.0.0.1
    python examples/torch_loop.py /some/dir    # a local directory
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import torch
from torch import nn

from asyncckpt import SyncCheckpointManager

EPOCHS = 6


class GlobalRNG:
    """torch's global RNG as a stateful value: saved and restored with the rest."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> float:
    data = torch.Generator().manual_seed(epoch)
    x = torch.randn(256, 16, generator=data)
    y = x @ torch.linspace(-1.0, 1.0, 16, dtype=x.dtype).unsqueeze(1)
    model.train()
    for batch in range(0, len(x), 32):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[batch : batch + 32]), y[batch : batch + 32])
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def train(location: str, options: dict[str, Any] | None, stop_after: int | None = None) -> nn.Module:
    """Train up to EPOCHS, resuming from the latest committed epoch; ``stop_after`` ends the
    run early, as a preemption would."""
    model, optimizer, scheduler = build()
    workspace = {"model": model, "optim": optimizer, "sched": scheduler, "rng": GlobalRNG(), "epoch": 0}
    with SyncCheckpointManager(location, storage_options=options) as ckpt:
        ckpt.init({"trainer": workspace})
        resume = ckpt.get_resume_from_epoch_id()  # the latest committed epoch, or None
        if resume is not None:
            ckpt.load(resume)  # into the same model, optimizer, scheduler; the RNG is set
            print(f"resumed from epoch {workspace['epoch']} (lr {scheduler.get_last_lr()[0]:g})")
        pending = None
        for epoch in range(workspace["epoch"] + 1, EPOCHS + 1):
            loss = train_one_epoch(model, optimizer, epoch)
            scheduler.step()
            workspace["epoch"] = epoch
            if pending is not None:
                pending.result()  # the previous epoch is committed (its error raised here)
            pending = ckpt.save_async(epoch, metrics={"loss": loss})  # returns once the state is copied
            print(f"epoch {epoch}: loss {loss:.4f}, saving in the background")
            if epoch == stop_after:
                break
        if pending is not None:
            pending.result()
    return model


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
        run("s3://asyncckpt-example/torch-loop", options)


def run(location: str, options: dict[str, Any] | None) -> None:
    print(f"training {EPOCHS} epochs -> {location}; the job stops after epoch 3")
    train(location, options, stop_after=3)
    print("the job starts again:")
    resumed = train(location, options)
    model, optimizer, scheduler = build()  # the same training, never interrupted, no checkpoints
    for epoch in range(1, EPOCHS + 1):
        train_one_epoch(model, optimizer, epoch)
        scheduler.step()
    expected, got = model.state_dict(), resumed.state_dict()
    if not all(torch.equal(expected[name], got[name]) for name in expected):
        sys.exit("FAIL: the resumed run ended with other weights than an uninterrupted one")
    print("PASS")


if __name__ == "__main__":
    main()
