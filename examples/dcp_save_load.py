"""torch.distributed.checkpoint (DCP) with asyncckpt's storage plugin, in one process.

A model and its AdamW optimizer train 3 steps and are saved with ``dcp.save``; training
goes on and step 6 is saved in the background with ``dcp.async_save``. A fresh model and
optimizer then load step 3, train 3 steps and must end bit-exact where the first run did.
The same code runs in every rank of a multi-process job.

    python examples/dcp_save_load.py                       # a temporary directory
    python examples/dcp_save_load.py /some/dir             # a directory
    python examples/dcp_save_load.py s3://bucket/run --endpoint-url http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from asyncckpt.dcp import StorageReader, StorageWriter

# without a process group DCP says it saves "in a single process": that is the intent here
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class TrainingState(Stateful):
    """What a checkpoint holds: the model's and the optimizer's state (DCP calls these)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optimizer_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
        )


def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        batch = torch.randn(16, 32, generator=torch.Generator().manual_seed(step))
        loss = (model(batch) - batch.sum(dim=1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("location", nargs="?", help="s3://bucket/prefix or a directory (default: a temporary one)")
    parser.add_argument("--endpoint-url", help="the S3 endpoint (MinIO, Ceph, a local moto server...)")
    args = parser.parse_args()
    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    with tempfile.TemporaryDirectory() as scratch:
        root = (args.location or scratch).rstrip("/")
        run(root, options)


def run(root: str, options: dict[str, Any] | None) -> None:
    model, optimizer = fresh()
    train(model, optimizer, range(0, 3))
    dcp.save(
        {"app": TrainingState(model, optimizer)},
        storage_writer=StorageWriter(f"{root}/step-3", storage_options=options),
    )
    print(f"saved step 3 to {root}/step-3")
    train(model, optimizer, range(3, 6))
    pending = dcp.async_save(
        {"app": TrainingState(model, optimizer)},
        storage_writer=StorageWriter(f"{root}/step-6", storage_options=options),
    )
    pending.result()  # a training loop would go on and check it before the next save
    print(f"saved step 6 to {root}/step-6 in the background")

    resumed_model, resumed_optimizer = fresh()
    state = {"app": TrainingState(resumed_model, resumed_optimizer)}
    dcp.load(state, storage_reader=StorageReader(f"{root}/step-3", storage_options=options))
    print("loaded step 3 into a fresh model and optimizer")
    train(resumed_model, resumed_optimizer, range(3, 6))
    for name, value in model.state_dict().items():
        if not torch.equal(resumed_model.state_dict()[name], value):
            sys.exit(f"FAIL: {name} differs after resuming from step 3")
    print("PASS")


if __name__ == "__main__":
    main()
