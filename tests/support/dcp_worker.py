"""One rank of a gloo job saving or loading DCP checkpoints, for tests/dcp (not a test module).

:func:`run_rank` is the target of a process forked from a multiprocessing forkserver that
imported this module (torch, DTensor, DCP and the plugin) once, so a rank starts in
milliseconds instead of seconds. It writes ``{"checked": [...]}`` (what it verified) or
the traceback of its failure to ``report`` and exits 0 or 1.

Arguments (a dict):

    url, options       the checkpoint location and its storage_options
    rank, world        this process's rank and the job's size
    init_file          a path every rank of the job shares (gloo's FileStore rendezvous)
    action             "save", "async_save" or "load"

The job's state (see :func:`global_state`) is DTensors sharded on dim 0 of a 1-D CPU mesh
of ``world`` ranks, so a load on another world size reads other ranks' shards
(resharding), plus a replicated tensor and a plain value.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from asyncckpt.dcp import StorageReader, StorageWriter


def global_state() -> dict[str, torch.Tensor]:
    """The whole (unsharded) state; ``ids`` has 10 rows, split 3, 3, 3, 1 on 4 ranks."""
    return {
        "weight": torch.arange(16 * 6, dtype=torch.float32).reshape(16, 6) / 7,
        "bf16": (torch.arange(12, dtype=torch.float32) - 5.5).to(torch.bfloat16),
        "ids": torch.arange(10 * 3, dtype=torch.int64).reshape(10, 3) * -3,
    }


def run_rank(args: dict[str, Any], report: str) -> None:
    try:
        checked = _run(args)
    except BaseException:
        with open(report, "w") as out:
            out.write(traceback.format_exc())
        sys.exit(1)
    with open(report, "w") as out:
        json.dump({"checked": checked}, out)


def _run(args: dict[str, Any]) -> list[str]:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    world = args["world"]
    dist.init_process_group("gloo", init_method=f"file://{args['init_file']}", rank=args["rank"], world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        expected = global_state()
        if args["action"] == "load":
            state: dict[str, Any] = {
                name: distribute_tensor(torch.zeros_like(value), mesh, [Shard(0)]) for name, value in expected.items()
            }
            state |= {"replicated": torch.zeros(4), "meta": {"step": 0}}
            dcp.load(state, storage_reader=StorageReader(args["url"], storage_options=args["options"]))
            for name, value in expected.items():
                shard = state[name]
                assert isinstance(shard, DTensor) and shard.device_mesh.size() == world, name
                assert torch.equal(shard.full_tensor().view(torch.uint8), value.view(torch.uint8)), name
            assert torch.equal(state["replicated"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
            assert state["meta"] == {"step": 100}
            return [*expected, "replicated", "meta"]
        state = {name: distribute_tensor(value, mesh, [Shard(0)]) for name, value in expected.items()}
        state |= {"replicated": torch.tensor([1.0, 2.0, 3.0, 4.0]), "meta": {"step": 100}}
        writer = StorageWriter(args["url"], storage_options=args["options"])
        if args["action"] == "async_save":
            dcp.async_save(state, storage_writer=writer).result(timeout=120)
        else:
            dcp.save(state, storage_writer=writer)
        return ["saved"]
    finally:
        dist.destroy_process_group()
