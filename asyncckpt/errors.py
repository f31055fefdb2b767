"""The exceptions of asyncckpt.

Every exception the library raises on purpose derives from :class:`CheckpointError`.
Each subclass also derives from the builtin exception a user would naturally catch,
so ``except FileNotFoundError`` or ``except OSError`` keep working.

Backend exceptions (botocore, aiohttp, ``OSError`` of the local disk) never escape:
the storage layer translates them into :class:`StorageError` or one of its siblings.

The hierarchy (each class also derives from the builtin in parentheses)::

    CheckpointError (Exception)
     +-- CheckpointNotFoundError (FileNotFoundError)   an epoch, shard or object is missing
     +-- CheckpointCorruptedError (ValueError)         stored bytes fail a checksum, size or format check
     +-- CheckpointConflictError (FileExistsError)     the epoch or object exists already
     +-- CheckpointStateError (RuntimeError)           the manager is used out of order
     +-- CheckpointTimeoutError (TimeoutError)         a multi-process save missed its deadline
     +-- StorageError (OSError)                        a storage backend failed
          +-- ObjectTooShortError                      a read asked past the end of an object

Storage raises the ``NotFound``/``Conflict``/``Storage`` kinds only; whether a short object
means a corrupted checkpoint is for the layers above it to say.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointCorruptedError",
    "CheckpointConflictError",
    "CheckpointStateError",
    "CheckpointTimeoutError",
    "ObjectTooShortError",
    "StorageError",
    "combine_node_failures",
]


class CheckpointError(Exception):
    """Base class of every error raised by asyncckpt.

    ``failures`` maps a node name to the exception that node failed with, when the
    error summarises a multi-node operation (empty otherwise).
    """

    def __init__(self, message: str, *, failures: Mapping[str, BaseException] | None = None):
        super().__init__(message)
        self.failures: dict[str, BaseException] = dict(failures or {})


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """An epoch, a shard or an object does not exist."""


class CheckpointCorruptedError(CheckpointError, ValueError):
    """Stored bytes do not match their checksum, size or format.

    The message names the node, the blob and the object key where they are known.
    """


class CheckpointConflictError(CheckpointError, FileExistsError):
    """The epoch is already committed (by this or another writer)."""


class CheckpointStateError(CheckpointError, RuntimeError):
    """The manager is used out of order (for example ``load`` before ``init``)."""


class CheckpointTimeoutError(CheckpointError, TimeoutError):
    """A multi-process save did not see every node's receipt before its deadline.

    ``missing_nodes`` lists the nodes whose receipt never appeared.
    """

    def __init__(self, message: str, *, missing_nodes: list[str] | None = None):
        super().__init__(message)
        self.missing_nodes = list(missing_nodes or [])


class StorageError(CheckpointError, OSError):
    """A storage backend failed (after retries).

    ``bucket``/``key`` say where, ``code`` is the backend's error code (``"NoSuchBucket"``,
    ``"AccessDenied"``, ``"SlowDown"``, ``"ECONNREFUSED"``...) when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        bucket: str | None = None,
        key: str | None = None,
        code: str | None = None,
        failures: Mapping[str, BaseException] | None = None,
    ):
        super().__init__(message, failures=failures)
        self.bucket = bucket
        self.key = key
        self.code = code


class ObjectTooShortError(StorageError):
    """The object ends before the requested range: truncated or replaced.

    Every backend raises exactly this when a ranged read asks for bytes past the end of
    an existing object (a missing object is :class:`CheckpointNotFoundError`).
    """


def combine_node_failures(action: str, failures: Mapping[str, BaseException]) -> CheckpointError:
    """Build one exception naming every failed node and its cause.

    The result is a :class:`StorageError` when every cause is a storage failure (so
    ``except OSError`` still catches it), the common class when all causes share one
    asyncckpt class, and a plain :class:`CheckpointError` otherwise.  The per-node
    causes stay reachable in ``.failures``.
    """
    failures = dict(sorted(failures.items()))
    detail = "; ".join(f"{node}: {type(exc).__name__}: {exc}" for node, exc in failures.items())
    message = f"{action} failed on {len(failures)} node(s): {detail}"
    kinds = {type(exc) for exc in failures.values()}
    if all(isinstance(exc, StorageError) for exc in failures.values()):
        return StorageError(message, failures=failures)
    if len(kinds) == 1:
        (kind,) = kinds
        if issubclass(kind, CheckpointError) and kind is not StorageError:
            return kind(message, failures=failures)
    return CheckpointError(message, failures=failures)
