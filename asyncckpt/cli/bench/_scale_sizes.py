"""The sizes of ``asyncckpt bench --scale``: the full run (issue 9's numbers) and ``--quick``.

Cheap to import (the command's help shows the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_SCALE_BUDGET_S", "DEFAULT_SCALE_OP_TIMEOUT_S", "FULL", "QUICK", "ScaleSizes"]

DEFAULT_SCALE_BUDGET_S = 1800.0
DEFAULT_SCALE_OP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ScaleSizes:
    """The sizes of every section of the scale benchmark (see :mod:`._scale`)."""

    commit_nodes: int
    commit_blobs: tuple[int, ...]
    commit_epochs: int
    processes: tuple[int, ...]
    process_epochs: int
    partial_blobs: int
    partial_blob_elements: int
    partial_ks: tuple[int, ...]
    partial_reps: int
    memory_mib: tuple[float, ...]
    memory_tiny_blobs: int
    memory_nodes: int = 4
    memory_blobs_per_node: int = 8


FULL = ScaleSizes(
    commit_nodes=1024,
    commit_blobs=(10, 1000),
    commit_epochs=2,
    processes=(2, 8, 16, 32),
    process_epochs=3,
    partial_blobs=8000,
    partial_blob_elements=1024,
    partial_ks=(1000, 2000, 4000),
    partial_reps=5,
    memory_mib=(64, 256, 1024),
    memory_tiny_blobs=100_000,
)
QUICK = ScaleSizes(
    commit_nodes=64,
    commit_blobs=(10, 100),
    commit_epochs=2,
    processes=(2, 4),
    process_epochs=2,
    partial_blobs=400,
    partial_blob_elements=1024,
    partial_ks=(50, 100, 200),
    partial_reps=1,
    memory_mib=(16, 48),
    memory_tiny_blobs=10_000,
)
