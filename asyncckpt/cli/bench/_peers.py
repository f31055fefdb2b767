"""What ``asyncckpt bench --peers`` measures: every peer's ops, their groups, what each needs.

:data:`PEER_OPS` names each measured operation (an :class:`~._state.OpSpec`; the
asyncckpt ones have ``peer`` ``ckpt``, ``ckpt_torch`` or ``ckpt_dcp``), :data:`PEER_GROUPS`
the ops that run in order on one prefix, and :func:`missing_requirement` says why a group
cannot run in this environment (a peer that is not installed), so the driver skips it with
that reason instead of starting its children. The peers' own settings are in
:mod:`._peer_ops`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

from ._state import OPS, OpSpec

__all__ = [
    "ASYNCCKPT_PEERS",
    "PEER_GROUPS",
    "PEER_OPS",
    "REFERENCE_PEERS",
    "is_peer",
    "missing_requirement",
]

#: The rows that are asyncckpt itself, and the reference rows (not a peer to beat).
ASYNCCKPT_PEERS = ("ckpt", "ckpt_torch", "ckpt_dcp")
REFERENCE_PEERS = ("memcpy",)


def _core(name: str, label: str) -> OpSpec:
    """An op of the core benchmark (:data:`~._state.OPS`) under a label that fits the peers' table."""
    return replace(OPS[name], label=label)


PEER_OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        _core("memcpy", "fresh np.copy (reference)"),
        _core("aio_save", "aioboto3 upload_fileobj"),
        _core("aio_load", "aioboto3 get_object+read"),
        _core("s3t_save", "boto3 s3transfer upload"),
        _core("s3t_load", "boto3 s3transfer download"),
        OpSpec("torchsave_save", "torchsave", "save", "torch.save + 1 PUT (boto3)", "torchsave", "torch"),
        OpSpec("torchsave_load", "torchsave", "load", "1 GET + torch.load", "torchsave", "torch"),
        OpSpec("dcp_save", "dcp", "save", "DCP save (s3fs, 4 thr.)", "dcp", "torch"),
        OpSpec("dcp_load", "dcp", "load", "DCP load (s3fs)", "dcp", "torch"),
        OpSpec("dcp_async_save", "dcp", "save", "DCP async_save (total)", "dcp_async", "torch"),
        OpSpec("s3tc_save", "s3tc", "save", "s3tc S3Checkpoint save", "s3tc", "torch"),
        OpSpec("s3tc_load", "s3tc", "load", "s3tc S3Checkpoint load", "s3tc", "torch"),
        OpSpec("s3tc_dcp_save", "s3tc", "save", "s3tc DCP writer (4 thr.)", "s3tc_dcp", "torch"),
        OpSpec("s3tc_dcp_load", "s3tc", "load", "s3tc DCP reader", "s3tc_dcp", "torch"),
        OpSpec("tsnap_save", "tsnap", "save", "torchsnapshot take", "tsnap", "torch"),
        OpSpec("tsnap_load", "tsnap", "load", "torchsnapshot restore", "tsnap", "torch"),
        OpSpec("ckpt_save", "ckpt", "save", "asyncckpt save", "ckpt"),
        OpSpec("ckpt_load", "ckpt", "load", "asyncckpt load", "ckpt"),
        OpSpec("ckpt_inplace_load", "ckpt", "load", "asyncckpt load in place", "ckpt"),
        OpSpec("ckpt_save_async", "ckpt", "save", "asyncckpt save_async (total)", "ckpt_async"),
        OpSpec("ckpt_torch_save", "ckpt_torch", "save", "asyncckpt save", "ckpt_torch", "torch"),
        OpSpec("ckpt_torch_load", "ckpt_torch", "load", "asyncckpt load", "ckpt_torch", "torch"),
        OpSpec("ckpt_torch_inplace_load", "ckpt_torch", "load", "asyncckpt load in place", "ckpt_torch", "torch"),
        OpSpec(
            "ckpt_torch_save_async", "ckpt_torch", "save", "asyncckpt save_async (total)", "ckpt_torch_async", "torch"
        ),
        OpSpec("ckpt_dcp_save", "ckpt_dcp", "save", "DCP save (asyncckpt.dcp)", "ckpt_dcp", "torch"),
        OpSpec("ckpt_dcp_load", "ckpt_dcp", "load", "DCP load (asyncckpt.dcp)", "ckpt_dcp", "torch"),
    )
}
PEER_GROUPS: dict[str, list[str]] = {}
for _spec in PEER_OPS.values():
    PEER_GROUPS.setdefault(_spec.group, []).append(_spec.name)

# The modules a group imports (one fresh child per op: checked here, in the driver, first).
_REQUIRES: dict[str, tuple[str, ...]] = {
    "torchsave": ("torch",),
    "dcp": ("torch", "s3fs"),
    "dcp_async": ("torch", "s3fs"),
    "s3tc": ("torch", "s3torchconnector"),
    "s3tc_dcp": ("torch", "s3torchconnector", "tenacity"),  # s3torchconnector[dcp]
    "tsnap": ("torch", "torchsnapshot", "aiobotocore"),
    "ckpt_torch": ("torch",),
    "ckpt_torch_async": ("torch",),
    "ckpt_dcp": ("torch", "asyncckpt.dcp"),
}


def is_peer(spec: OpSpec) -> bool:
    """Whether ``spec`` is another library's op (not asyncckpt's, not a reference)."""
    return spec.peer not in ASYNCCKPT_PEERS and spec.peer not in REFERENCE_PEERS


def missing_requirement(group: str) -> tuple[str, str] | None:
    """Why ``group`` cannot run here (a module that is not importable) as (status, reason):
    ``unavailable`` for a feature this asyncckpt lacks, ``skipped`` for a peer that is not
    installed; None when it can run."""
    for module in _REQUIRES.get(group, ()):
        if importlib.util.find_spec(module) is None:
            if module.startswith("asyncckpt."):
                return "unavailable", f"this asyncckpt has no {module}"
            return "skipped", f"{module} is not installed (`make bench-peers` installs the peers into .venv-peers)"
    return None
