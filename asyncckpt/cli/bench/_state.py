"""What the benchmark measures, on which bytes, with which settings.

:data:`OPS` names every measured operation; :func:`state_layout` and :func:`build_state`
make the multi-node numpy state (seeded: every peer gets the same bytes);
:class:`BenchParams` holds the user's choices; :class:`ChildJob` is one measurement as
handed to a child process (JSON on its command line).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from asyncckpt import MiB, TransferConfig

from .._options import node_names

__all__ = [
    "BUCKET",
    "DEFAULT_BUDGET_S",
    "DEFAULT_OP_TIMEOUT_S",
    "DEFAULT_PEERS_BUDGET_S",
    "EPOCH",
    "GROUPS",
    "GROUP_ORDER",
    "OPS",
    "PARTIAL_FRACTION",
    "SCALARS",
    "BenchParams",
    "BlobSpec",
    "ChildJob",
    "OpSpec",
    "build_state",
    "digest",
    "partial_selection",
    "state_layout",
]

BUCKET = "asyncckpt-bench"
EPOCH = 1
SCALARS = {"step": 1000, "lr": 3e-4}
DEFAULT_BUDGET_S = 900.0
DEFAULT_PEERS_BUDGET_S = 3600.0
DEFAULT_OP_TIMEOUT_S = 120.0
PARTIAL_FRACTION = 0.10


@dataclass(frozen=True)
class OpSpec:
    """One measured operation: which peer, and whether it writes or reads."""

    name: str
    peer: str  # memcpy | aio | s3t | ckpt; --peers adds torchsave, dcp, s3tc, tsnap, ckpt_torch, ckpt_dcp
    kind: str  # copy | save | load | partial
    label: str
    group: str  # ops of a group run in order, on one prefix
    state: str = "numpy"  # the state the op saves or loads: numpy arrays or the same bytes as torch tensors


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("memcpy", "memcpy", "copy", "numpy fresh np.copy of the state", "memcpy"),
        OpSpec("aio_save", "aio", "save", "aioboto3 upload_fileobj (default cfg)", "aio"),
        OpSpec("aio_load", "aio", "load", "aioboto3 get_object + read()", "aio"),
        OpSpec("s3t_save", "s3t", "save", "boto3 s3transfer upload", "s3t"),
        OpSpec("s3t_load", "s3t", "load", "boto3 s3transfer download", "s3t"),
        OpSpec("ckpt_save", "ckpt", "save", "asyncckpt save", "ckpt"),
        OpSpec("ckpt_load", "ckpt", "load", "asyncckpt load", "ckpt"),
        OpSpec("ckpt_partial", "ckpt", "partial", "asyncckpt load_blobs_locally (10%)", "ckpt"),
        OpSpec("ckpt_save_async", "ckpt", "save", "asyncckpt save_async", "ckpt_async"),
    )
}
GROUPS: dict[str, list[str]] = {}
for _spec in OPS.values():
    GROUPS.setdefault(_spec.group, []).append(_spec.name)
GROUP_ORDER = list(GROUPS)


# ---------------------------------------------------------------------- the state


@dataclass(frozen=True)
class BlobSpec:
    """One array of the state: its node and name, dtype, element count, and RNG seed."""

    node: str
    name: str
    dtype: str
    count: int
    seed: int

    @property
    def nbytes(self) -> int:
        return self.count * (4 if self.dtype == "float32" else 8)


def state_layout(state_mib: float, nodes: int, blobs_per_node: int) -> list[BlobSpec]:
    """Every array of the state: equal byte sizes, float32 and float64 alternating."""
    per_blob = int(state_mib * MiB) // (nodes * blobs_per_node)
    per_blob -= per_blob % 8
    if per_blob < 8:
        raise ValueError(f"state of {state_mib} MiB is too small for {nodes}x{blobs_per_node} blobs")
    out = []
    for i, node in enumerate(node_names(nodes)):
        for j in range(blobs_per_node):
            dtype = "float32" if j % 2 == 0 else "float64"
            count = per_blob // (4 if dtype == "float32" else 8)
            out.append(BlobSpec(node, f"w{j:02d}", dtype, count, 1000 + 1000 * i + j))
    return out


def build_state(layout: Sequence[BlobSpec]) -> dict[str, dict[str, Any]]:
    """The workspaces: ``{node: {blob: ndarray, "step": 1000, "lr": 3e-4}}`` (seeded)."""
    import numpy as np

    state: dict[str, dict[str, Any]] = {}
    for blob in layout:
        rng = np.random.default_rng(blob.seed)
        arr = rng.standard_normal(blob.count, dtype=np.dtype(blob.dtype))
        state.setdefault(blob.node, dict(SCALARS))[blob.name] = arr
    return state


def partial_selection(layout: Sequence[BlobSpec], fraction: float = PARTIAL_FRACTION) -> list[BlobSpec]:
    """About ``fraction`` of the blobs (at least one), spread evenly over the nodes."""
    k = max(1, round(fraction * len(layout)))
    return [layout[int(i * len(layout) / k)] for i in range(k)]


def digest(arr: Any) -> str:
    """SHA-256 of an array's bytes (hex)."""
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


# ---------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BenchParams:
    """The user's choices: the state's shape, asyncckpt's knobs (``None``: the library's
    default), the baselines' part size, and the time limits."""

    state_mib: float = 192
    nodes: int = 4
    blobs_per_node: int = 8
    reps: int = 3
    part_size_mib: float | None = None
    range_size_mib: float | None = None
    max_concurrency: int | None = None
    max_bytes_in_flight_mib: float | None = None
    checksum_mode: str | None = None
    payload_signing: bool | None = None
    baseline_part_size_mib: float | None = None
    budget_s: float = DEFAULT_BUDGET_S
    op_timeout_s: float = DEFAULT_OP_TIMEOUT_S

    def layout(self) -> list[BlobSpec]:
        """Every array of the state (see :func:`state_layout`)."""
        return state_layout(self.state_mib, self.nodes, self.blobs_per_node)

    def transfer_config(self) -> TransferConfig:
        """asyncckpt's configuration: :class:`~asyncckpt.TransferConfig` with the knobs that were given."""
        kwargs: dict[str, Any] = {}
        if self.part_size_mib is not None:
            kwargs["part_size"] = int(self.part_size_mib * MiB)
        if self.range_size_mib is not None:
            kwargs["range_size"] = int(self.range_size_mib * MiB)
        if self.max_concurrency is not None:
            kwargs["max_concurrency"] = self.max_concurrency
        if self.max_bytes_in_flight_mib is not None:
            kwargs["max_bytes_in_flight"] = int(self.max_bytes_in_flight_mib * MiB)
        if self.checksum_mode is not None:
            kwargs["checksum_mode"] = self.checksum_mode
        if self.payload_signing is not None:
            kwargs["payload_signing"] = self.payload_signing
        return TransferConfig(**kwargs)

    def baseline_part_size(self) -> int:
        """The part size of the aioboto3/s3transfer baselines: their own, or asyncckpt's."""
        if self.baseline_part_size_mib is not None:
            return int(self.baseline_part_size_mib * MiB)
        return self.transfer_config().part_size

    def baseline_concurrency(self) -> int:
        """The baselines' concurrency: asyncckpt's ``max_concurrency``."""
        return self.transfer_config().max_concurrency


@dataclass(frozen=True)
class ChildJob:
    """One measurement, as a child process gets it: the op, where its objects go (bucket
    and prefix on ``endpoint``), the server to watch, the digests to verify against."""

    op: str
    prefix: str
    endpoint: str
    expected: str  # JSON file of SHA-256 digests, written by the "prep" op
    server_pid: int | None = None
    server_log: str | None = None
    bucket: str = BUCKET
    params: BenchParams = field(default_factory=BenchParams)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChildJob:
        fields = json.loads(text)
        return cls(**{**fields, "params": BenchParams(**fields["params"])})
