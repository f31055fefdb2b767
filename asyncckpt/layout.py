"""Key naming under a checkpoint root: the one module that knows where things go.

::

    <root>/epochs/<epoch:012d>/manifest.json                    the commit (create-only, last)
    <root>/epochs/<epoch:012d>/<writer id>/<node>.shard          one node's blobs
    <root>/epochs/<epoch:012d>/<writer id>/<node>.receipt.json   that shard's index and stats
    <root>/epochs/<epoch:012d>/<run id>.decision                 multi-process jobs: commit or abort

A writer id is ``<run id>.<attempt token>``: the run id names one job incarnation
(shared by all of its processes), the attempt token is new for every save attempt,
so a stale or concurrent writer can never overwrite the shards a manifest names.
"""

from __future__ import annotations

import hashlib
import re
import secrets

__all__ = [
    "EPOCHS_DIR",
    "MAX_EPOCH",
    "decision_key",
    "epoch_dir",
    "manifest_key",
    "attempt_token",
    "epoch_of_key",
    "new_run_id",
    "new_token_seed",
    "parse_epoch_dir",
    "parse_receipt_key",
    "receipt_key",
    "shard_key",
    "split_writer_id",
    "validate_epoch",
    "validate_node_name",
    "validate_run_id",
]

EPOCHS_DIR = "epochs"
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".shard"
RECEIPT_SUFFIX = ".receipt.json"
DECISION_SUFFIX = ".decision"
EPOCH_DIGITS = 12
MAX_EPOCH = 10**EPOCH_DIGITS - 1

_NODE_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9._\-]*$")
_RUN_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_EPOCH_DIR_RE = re.compile(rf"^\d{{{EPOCH_DIGITS}}}$")


def validate_node_name(name: object) -> str:
    """A node name: non-empty; letters, digits, ``.``, ``_``, ``-``; never ``/`` or ``..``.

    Raises :class:`TypeError` for a non-str, :class:`ValueError` for a bad name.
    """
    if not isinstance(name, str):
        raise TypeError(f"node names must be str, got {type(name).__name__} {name!r}")
    if not name or len(name) > 200 or not _NODE_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid node name {name!r}: use 1-200 letters, digits, '.', '_' or '-' (no '/', no '..', not starting with '.')"
        )
    return name


def validate_epoch(epoch: object) -> int:
    """An epoch: an int in ``[0, MAX_EPOCH]`` (``bool`` is refused)."""
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise TypeError(f"epoch must be an int, got {type(epoch).__name__} {epoch!r}")
    if not 0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be between 0 and {MAX_EPOCH}, got {epoch}")
    return epoch


def validate_run_id(run_id: object) -> str:
    if not isinstance(run_id, str) or not _RUN_RE.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}: use 1-64 letters, digits, '_' or '-'")
    return run_id


def new_run_id() -> str:
    return secrets.token_hex(8)


def new_token_seed() -> bytes:
    """A manager's secret seed for :func:`attempt_token`."""
    return secrets.token_bytes(16)


def attempt_token(seed: bytes, epoch: int, attempt: int) -> str:
    """The token of save attempt number ``attempt`` (0, 1, ...) of ``epoch`` by the manager
    holding ``seed``: as unique as a random token, yet known before the attempt starts."""
    return hashlib.blake2b(f"{epoch}.{attempt}".encode(), key=seed, digest_size=6).hexdigest()


def split_writer_id(writer_id: str) -> tuple[str, str]:
    run_id, _, token = writer_id.partition(".")
    return run_id, token


def epoch_dir(epoch: int) -> str:
    return f"{EPOCHS_DIR}/{epoch:0{EPOCH_DIGITS}d}/"


def epoch_of_key(key: str) -> int | None:
    """The epoch of a key inside an epoch's directory (``epochs/<epoch>/...``), or ``None``."""
    parts = key.split("/", 2)
    if len(parts) < 3 or parts[0] != EPOCHS_DIR:
        return None
    return parse_epoch_dir(parts[1])


def parse_epoch_dir(name: str) -> int | None:
    """The epoch of a directory name below ``epochs/``, or ``None`` if it is not one."""
    return int(name) if _EPOCH_DIR_RE.match(name) else None


def manifest_key(epoch: int) -> str:
    return epoch_dir(epoch) + MANIFEST_NAME


def shard_key(epoch: int, writer_id: str, node: str) -> str:
    return f"{epoch_dir(epoch)}{writer_id}/{node}{SHARD_SUFFIX}"


def receipt_key(epoch: int, writer_id: str, node: str) -> str:
    return f"{epoch_dir(epoch)}{writer_id}/{node}{RECEIPT_SUFFIX}"


def decision_key(epoch: int, run_id: str) -> str:
    """Where the processes of one job record, create-only, whether they commit or abort."""
    return f"{epoch_dir(epoch)}{run_id}{DECISION_SUFFIX}"


def parse_receipt_key(key: str) -> tuple[str, str] | None:
    """(writer id, node) of a receipt key, or ``None`` if ``key`` is not one."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != EPOCHS_DIR or not parts[3].endswith(RECEIPT_SUFFIX):
        return None
    node = parts[3][: -len(RECEIPT_SUFFIX)]
    return (parts[2], node) if node else None
