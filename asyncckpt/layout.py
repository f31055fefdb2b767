"""Key naming under a checkpoint root: the one module that knows where things go.

::

    <root>/epochs/<epoch:012d>/manifest.json            the commit record (create-only, last)
    <root>/epochs/<epoch:012d>/<writer>.decision        the writer's verdict (create-only)
    <root>/epochs/<epoch:012d>/<writer>/index.json      every node's record of the commit
    <root>/epochs/<epoch:012d>/<writer>/<node>.shard    one node's blobs (one process)
    <root>/epochs/<epoch:012d>/<writer>/<token>/<node>.shard          (several processes)
    <root>/epochs/<epoch:012d>/<writer>/<token>/<node>.receipt.json   that node's record

A *writer* is one attempt at committing an epoch, and everything of it lives under its
name. A save by one process is its own writer, ``<run id>.<attempt token>``: new for
every attempt, so a stale or concurrent writer can never overwrite what a manifest names.
The processes of a multi-process job share one writer, ``<run id>`` (the job
incarnation), and each keeps its shards under its own attempt token.
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
    "parse_record_key",
    "receipt_key",
    "shard_key",
    "solo_writer_id",
    "writer_of_key",
    "index_key",
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
INDEX_NAME = "index.json"
EPOCH_DIGITS = 12
MAX_EPOCH = 10**EPOCH_DIGITS - 1

_NODE_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]*")
_RUN_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_WRITER_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}(\.[0-9a-f]{1,32})?")
_EPOCH_DIR_RE = re.compile(rf"\d{{{EPOCH_DIGITS}}}")


def validate_node_name(name: object) -> str:
    """A node name: non-empty; letters, digits, ``.``, ``_``, ``-``; never ``/`` or ``..``.

    Raises :class:`TypeError` for a non-str, :class:`ValueError` for a bad name.
    """
    if not isinstance(name, str):
        raise TypeError(f"node names must be str, got {type(name).__name__} {name!r}")
    if not name or len(name) > 200 or not _NODE_RE.fullmatch(name) or ".." in name:
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
    if not isinstance(run_id, str) or not _RUN_RE.fullmatch(run_id):
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
    """(run id, attempt token) of a writer; the token is empty for a multi-process job's writer."""
    run_id, _, token = writer_id.partition(".")
    return run_id, token


def solo_writer_id(run_id: str, token: str) -> str:
    """The writer of one process's save attempt."""
    return f"{run_id}.{token}"


def epoch_dir(epoch: int) -> str:
    return f"{EPOCHS_DIR}/{epoch:0{EPOCH_DIGITS}d}/"


def epoch_of_key(key: str) -> int | None:
    """The epoch of a key inside an epoch's directory (``epochs/<epoch>/...``), or ``None``."""
    parts = key.split("/", 2)
    if len(parts) < 3 or parts[0] != EPOCHS_DIR:
        return None
    return parse_epoch_dir(parts[1])


def writer_of_key(key: str) -> str | None:
    """The writer an object inside an epoch's directory belongs to (its decision, index,
    shards and receipts), or ``None`` (the manifest, or a key of no writer)."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != EPOCHS_DIR or parse_epoch_dir(parts[1]) is None:
        return None
    if len(parts) == 3:
        name = parts[2]
        return (
            name[: -len(DECISION_SUFFIX)]
            if name.endswith(DECISION_SUFFIX) and _WRITER_RE.fullmatch(name[: -len(DECISION_SUFFIX)])
            else None
        )
    return parts[2] if _WRITER_RE.fullmatch(parts[2]) else None


def parse_epoch_dir(name: str) -> int | None:
    """The epoch of a directory name below ``epochs/``, or ``None`` if it is not one."""
    return int(name) if _EPOCH_DIR_RE.fullmatch(name) else None


def manifest_key(epoch: int) -> str:
    return epoch_dir(epoch) + MANIFEST_NAME


def decision_key(epoch: int, writer_id: str) -> str:
    """Where a writer records, create-only, its verdict on its attempt."""
    return f"{epoch_dir(epoch)}{writer_id}{DECISION_SUFFIX}"


def index_key(epoch: int, writer_id: str) -> str:
    return f"{epoch_dir(epoch)}{writer_id}/{INDEX_NAME}"


def shard_key(epoch: int, writer_id: str, node: str, token: str | None = None) -> str:
    """A node's shard: directly under a one-process writer, under the process's attempt
    ``token`` in a multi-process job's writer."""
    inner = f"{token}/" if token is not None else ""
    return f"{epoch_dir(epoch)}{writer_id}/{inner}{node}{SHARD_SUFFIX}"


def receipt_key(epoch: int, writer_id: str, token: str, node: str) -> str:
    return f"{epoch_dir(epoch)}{writer_id}/{token}/{node}{RECEIPT_SUFFIX}"


def parse_record_key(key: str) -> tuple[int, str] | None:
    """(epoch, writer id) of an index or receipt key, or ``None`` if ``key`` is neither."""
    parts = key.split("/")
    epoch = parse_epoch_dir(parts[1]) if len(parts) > 2 and parts[0] == EPOCHS_DIR else None
    if epoch is None or not _WRITER_RE.fullmatch(parts[2]):
        return None
    if (len(parts) == 4 and parts[3] == INDEX_NAME) or parse_receipt_key(key) is not None:
        return epoch, parts[2]
    return None


def parse_receipt_key(key: str) -> tuple[str, str, str] | None:
    """(writer id, attempt token, node) of a receipt key, or ``None`` if ``key`` is not one."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != EPOCHS_DIR or not parts[4].endswith(RECEIPT_SUFFIX):
        return None
    node = parts[4][: -len(RECEIPT_SUFFIX)]
    return (parts[2], parts[3], node) if node and _NODE_RE.fullmatch(node) else None
