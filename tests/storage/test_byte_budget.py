"""ByteBudget: buffers leased out and warm buffers kept for reuse count against one limit,
so the part buffers of uploads, in flight or pooled, never hold more memory than
``max_bytes_in_flight``."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import numpy as np

from asyncckpt import codec
from asyncckpt.config import MiB, TransferConfig
from asyncckpt.storage import ByteBudget, S3Storage
from asyncckpt.transfer import upload_nodes


async def test_a_buffer_given_back_stays_warm_counted_and_is_leased_again() -> None:
    budget = ByteBudget(10 * MiB)
    buf = await budget.lease(4 * MiB)
    assert len(buf) == 4 * MiB and (budget.in_use, budget.pooled) == (4 * MiB, 0)
    budget.give_back(buf)
    assert (budget.in_use, budget.pooled) == (0, 4 * MiB)  # idle, yet it still holds its bytes
    again = await budget.lease(3 * MiB)  # a warm buffer of at most twice the size is reused
    assert again is buf and (budget.in_use, budget.pooled) == (4 * MiB, 0)
    budget.give_back(again)
    budget.drop_warm_buffers()
    assert (budget.in_use, budget.pooled) == (0, 0)


async def test_warm_buffers_make_room_instead_of_making_anyone_wait() -> None:
    budget = ByteBudget(10 * MiB)
    first, second = await budget.lease(4 * MiB), await budget.lease(4 * MiB)
    budget.give_back(first)
    budget.give_back(second)
    assert budget.pooled == 8 * MiB
    await asyncio.wait_for(budget.acquire(6 * MiB), 1)  # fits only once a warm buffer is dropped
    assert (budget.in_use, budget.pooled) == (6 * MiB, 4 * MiB)
    assert budget.in_use + budget.pooled <= budget.limit
    budget.release(6 * MiB)


async def test_a_buffer_given_back_while_someone_waits_goes_to_them_warm_or_as_room() -> None:
    budget = ByteBudget(10 * MiB)
    held = await budget.lease(8 * MiB)
    same_size = asyncio.ensure_future(budget.lease(8 * MiB))
    await asyncio.sleep(0)
    assert not same_size.done()
    budget.give_back(held)  # handed over warm: no new buffer
    assert await asyncio.wait_for(same_size, 1) is held
    other_size = asyncio.ensure_future(budget.lease(3 * MiB))
    await asyncio.sleep(0)
    assert not other_size.done()
    budget.give_back(held)  # of no use to the waiter: dropped, its room goes to them
    buf = await asyncio.wait_for(other_size, 1)
    assert buf is not held and len(buf) == 3 * MiB
    assert (budget.in_use, budget.pooled) == (3 * MiB, 0)
    budget.give_back(buf)


async def test_held_bytes_never_pass_the_limit_while_leases_come_and_go() -> None:
    budget = ByteBudget(16 * MiB)
    most = 0

    async def user(i: int) -> None:
        nonlocal most
        for round_ in range(20):
            buf = await budget.lease((1 + (i + round_) % 5) * MiB)
            most = max(most, budget.in_use + budget.pooled)
            await asyncio.sleep(0)
            budget.give_back(buf)

    async with asyncio.TaskGroup() as tg:
        for i in range(6):
            tg.create_task(user(i))
    assert 0 < most <= budget.limit
    assert budget.in_use == 0 and budget.pooled <= budget.limit


class WatchedBudget(ByteBudget):
    """A budget that checks, at every lease, that the buffers it ever handed out which
    are still alive (in flight, warm, or kept by anyone else) fit in its limit."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.alive: weakref.WeakSet[Any] = weakref.WeakSet()
        self.most_alive = 0
        self.most_held = 0
        self.fresh = 0

    async def lease(self, size: int) -> Any:
        buf = await super().lease(size)
        if buf not in self.alive:
            self.fresh += 1
        self.alive.add(buf)
        self.most_alive = max(self.most_alive, sum(len(b) for b in self.alive))
        self.most_held = max(self.most_held, self.in_use + self.pooled)
        return buf


async def test_part_buffers_of_a_four_node_save_in_flight_or_warm_never_pass_the_budget(
    s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    config = TransferConfig(part_size=5 * MiB, max_bytes_in_flight=16 * MiB)
    budget = WatchedBudget(config.max_bytes_in_flight)
    rng = np.random.default_rng(0)
    state = {f"trainer_{i}": {"w": rng.integers(0, 255, 12 * MiB, dtype=np.uint8), "step": i} for i in range(4)}
    encoded = {node: codec.encode_blobs(node, blobs) for node, blobs in state.items()}
    storage = S3Storage(s3_bucket, "ckpt", options=s3_options, config=config)
    async with storage:
        for epoch in (1, 2):
            await upload_nodes(storage, budget, epoch, "run.0", encoded, max_nodes=4)
            assert budget.in_use == 0
            assert budget.pooled <= budget.limit
        assert budget.most_held <= budget.limit
        assert budget.most_alive <= budget.limit
        # the shards' arrays are lent to the writer and sent as they lie: no part buffer
        # was made (copying writers are held to the budget in test_s3_transport.py)
        assert budget.fresh == 0
    assert budget.pooled == 0  # closing the storage drops the warm buffers
