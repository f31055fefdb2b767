"""The demo's "model": the state each simulated node holds, how an epoch changes it, and
how two states are compared.

Every node ("trainer_0", ...) holds the state of a small model in its workspace: an
embedding table (most of the bytes), a dense layer, the optimizer state, a step counter,
a data cursor, the learning rate and the state of its random generator. Each epoch updates
every array deterministically, so the state of any node after any epoch can be recomputed
from scratch and compared bit for bit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np

from asyncckpt import MiB

from .._options import node_names

__all__ = [
    "Workspace",
    "compare_workspaces",
    "init_all",
    "init_workspace",
    "recompute",
    "reference_run",
    "train_all",
    "train_epoch",
]

SEED = 1_2024_0611
EMBED_DIM = 64
DENSE_DIM = 64
STEPS_PER_EPOCH = 1
BATCH_SIZE = 512
LR_START = 0.05
LR_DECAY = 0.9
MOMENTUM = 0.9

Workspace = dict[str, Any]


def init_workspace(node_index: int, mib_per_node: float) -> Workspace:
    """The freshly initialised state of one node: about ``mib_per_node`` MiB of weights."""
    rng = np.random.default_rng([SEED, node_index])
    dense_w = rng.standard_normal((DENSE_DIM, DENSE_DIM)) * 0.1  # float64
    dense_b = np.zeros(DENSE_DIM, dtype=np.float32)
    rest = int(mib_per_node * MiB) - dense_w.nbytes - dense_b.nbytes
    rows = max(1, rest // (EMBED_DIM * np.dtype(np.float32).itemsize))
    embedding = rng.random((rows, EMBED_DIM), dtype=np.float32)
    embedding -= np.float32(0.5)
    embedding *= np.float32(0.02)
    return {
        "model.embedding": embedding,
        "model.dense_w": dense_w,
        "model.dense_b": dense_b,
        "optim.embedding_sq_sum": np.zeros(rows, dtype=np.float32),  # row-wise Adagrad
        "optim.dense_momentum": np.zeros_like(dense_w),
        "step": np.int64(0),
        "data_cursor": 0,
        "lr": LR_START,
        "rng_state": rng.bit_generator.state,  # a dict holding 128-bit ints
    }


def train_epoch(ws: Workspace) -> None:
    """One deterministic epoch: the gradients come from the node's own generator,
    whose state lives in the workspace, so a restored workspace continues exactly."""
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = ws["rng_state"]
    emb, sq_sum = ws["model.embedding"], ws["optim.embedding_sq_sum"]
    dense_w, dense_b, momentum = ws["model.dense_w"], ws["model.dense_b"], ws["optim.dense_momentum"]
    lr = ws["lr"]
    for _ in range(STEPS_PER_EPOCH):
        grad = rng.random(emb.shape, dtype=np.float32)  # uniform: cheaper than normal, as good here
        grad -= np.float32(0.5)
        sq_sum += np.einsum("ij,ij->i", grad, grad)
        grad *= (lr / (np.sqrt(sq_sum) + np.float32(1e-6)))[:, None]
        emb -= grad
        momentum *= MOMENTUM
        momentum += rng.standard_normal(dense_w.shape)
        dense_w -= lr * momentum
        dense_b -= np.float32(lr) * rng.standard_normal(DENSE_DIM, dtype=np.float32)
        ws["step"] = ws["step"] + np.int64(1)
        ws["data_cursor"] += BATCH_SIZE
    ws["lr"] = lr * LR_DECAY
    ws["rng_state"] = rng.bit_generator.state


def init_all(nodes: int, mib_per_node: float) -> dict[str, Workspace]:
    """Every node of a job of ``nodes`` nodes, freshly initialised, by name."""
    return {name: init_workspace(i, mib_per_node) for i, name in enumerate(node_names(nodes))}


def recompute(node_indices: Mapping[str, int], epochs: int, mib_per_node: float) -> dict[str, Workspace]:
    """The state of the given nodes (name -> index) after ``epochs`` epochs, from scratch."""
    workspaces = {name: init_workspace(i, mib_per_node) for name, i in node_indices.items()}
    for ws in workspaces.values():
        for _ in range(epochs):
            train_epoch(ws)
    return workspaces


def reference_run(nodes: int, epochs: int, mib_per_node: float) -> dict[str, Workspace]:
    """The uninterrupted job, in memory: the state every node must end with."""
    return recompute({name: i for i, name in enumerate(node_names(nodes))}, epochs, mib_per_node)


async def train_all(workspaces: Mapping[str, Workspace]) -> None:
    """One epoch on every node, off the event loop (numpy releases the GIL)."""
    async with asyncio.TaskGroup() as tg:
        for ws in workspaces.values():
            tg.create_task(asyncio.to_thread(train_epoch, ws))


# ---------------------------------------------------------------------- checks


def _blob_difference(expected: Any, actual: Any) -> str | None:
    """Why ``actual`` is not exactly ``expected`` (same type, dtype, shape, bits), or None."""
    if type(actual) is not type(expected):
        return f"type {type(actual).__name__}, expected {type(expected).__name__}"
    if isinstance(expected, np.ndarray):
        if actual.dtype != expected.dtype:
            return f"dtype {actual.dtype}, expected {expected.dtype}"
        if actual.shape != expected.shape:
            return f"shape {actual.shape}, expected {expected.shape}"
        if not np.array_equal(actual, expected):
            count = int(np.count_nonzero(actual != expected))
            return f"{count} of {expected.size} elements differ"
        return None
    return None if actual == expected else f"{actual!r:.60}, expected {expected!r:.60}"


def compare_workspaces(
    expected: Mapping[str, Mapping[str, Any]], actual: Mapping[str, Mapping[str, Any]]
) -> tuple[int, list[str]]:
    """Compare every blob of every node; returns (blobs compared, problems)."""
    compared, problems = 0, []
    for node, exp in expected.items():
        act = actual.get(node)
        if act is None:
            problems.append(f"{node}: node missing")
            continue
        for name in sorted(set(exp) | set(act)):
            if name not in act:
                problems.append(f"{node}/{name}: missing")
            elif name not in exp:
                problems.append(f"{node}/{name}: unexpected blob")
            else:
                compared += 1
                why = _blob_difference(exp[name], act[name])
                if why:
                    problems.append(f"{node}/{name}: {why}")
    return compared, problems
