"""Sample workspaces with every kind of supported blob, and a comparable form of them."""

from __future__ import annotations

from typing import Any

import numpy as np

TWO_NODES = ("trainer_0", "trainer_1")
THREE_NODES = ("trainer_0", "trainer_1", "trainer_2")


def plain(value: Any) -> Any:
    """A comparable form of a blob that keeps types, dtypes and shapes apart."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return ("scalar", value.dtype.str, value.tobytes())
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, tuple):
        return ("tuple", tuple(plain(item) for item in value))
    return (type(value).__name__, value)


def snapshot(workspaces: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {node: plain(dict(ws)) for node, ws in workspaces.items()}


def sample_blobs(seed: int) -> dict[str, Any]:
    """One node's workspace with every kind of supported blob."""
    rng = np.random.default_rng(seed)
    return {
        "weights": rng.standard_normal((4, 3)).astype(np.float32),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3) * (seed + 1)),
        "empty": np.zeros((0, 2), dtype=np.float64),
        "step": np.int64(seed),
        "total": np.array([100 + seed], dtype=np.int64),
        "raw": bytes([seed]) * 5,
        "name": f"node-{seed}",
        "count": 2**70 + seed,
        "lr": 0.25,
        "done": False,
        "nothing": None,
        "history": [1, 2.5, "three", [4]],
        "pair": (seed, "x"),
        "config": {"layers": [64, 32], "nested": {"dropout": 0.1}},
    }


def sample_workspaces(nodes: tuple[str, ...] = TWO_NODES) -> dict[str, dict[str, Any]]:
    return {node: sample_blobs(i) for i, node in enumerate(nodes)}
