"""Storage backends behind one small async protocol (the contract is on :class:`Storage`).

This package only re-exports. The backends live in private modules: ``_memory``
(:class:`MemoryStorage`), ``_local`` (:class:`LocalStorage`) and ``_s3``/``_s3_upload``
(:class:`S3Storage`); the protocol in ``_base``, location URLs in ``_location``.
:class:`S3Storage` is loaded on first access, so importing this package does not import
aioboto3 or botocore.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import (
    ByteBudget,
    ObjectInfo,
    ObjectWriter,
    PendingUpload,
    RequestStats,
    Storage,
    collect_request_stats,
    validate_key,
)
from ._local import LocalStorage
from ._location import PATH_TYPES, parse_location, reader_for, storage_for
from ._memory import MemoryStorage, drop_memory_store

if TYPE_CHECKING:
    from ._s3 import S3Storage

__all__ = [
    "PATH_TYPES",
    "ByteBudget",
    "LocalStorage",
    "MemoryStorage",
    "ObjectInfo",
    "ObjectWriter",
    "PendingUpload",
    "RequestStats",
    "S3Storage",
    "Storage",
    "collect_request_stats",
    "drop_memory_store",
    "parse_location",
    "reader_for",
    "storage_for",
    "validate_key",
]


def __getattr__(name: str) -> Any:
    # S3Storage on first access only: its module imports aioboto3, aiobotocore and botocore
    if name == "S3Storage":
        from ._s3 import S3Storage

        return S3Storage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
