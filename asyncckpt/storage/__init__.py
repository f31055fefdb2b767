"""Storage backends behind one small async protocol (see :mod:`.base`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from ..config import TransferConfig
from .base import (
    ByteBudget,
    ObjectInfo,
    ObjectWriter,
    PendingUpload,
    RequestStats,
    Storage,
    collect_request_stats,
)
from .local import LocalStorage
from .memory import MemoryStorage, drop_memory_store
from .s3 import S3Storage

__all__ = [
    "ByteBudget",
    "LocalStorage",
    "MemoryStorage",
    "ObjectInfo",
    "ObjectWriter",
    "PATH_TYPES",
    "PendingUpload",
    "RequestStats",
    "S3Storage",
    "Storage",
    "collect_request_stats",
    "drop_memory_store",
    "parse_location",
    "storage_for",
]

PATH_TYPES = ("s3", "file", "memory")


def parse_location(url: str, path_type: str | None = None) -> tuple[str, str, str]:
    """Split a location into (kind, bucket or store name or directory, prefix).

    ``url`` is ``s3://bucket/prefix``, ``file:///abs/dir``, a plain path, or
    ``memory://name/prefix``. ``path_type`` names the kind when ``url`` has no scheme;
    when both are given they must agree. Raises :class:`ValueError` for anything else.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"checkpoint location must be a non-empty string, got {url!r}")
    if path_type is not None and path_type not in PATH_TYPES:
        raise ValueError(f"unknown path_type {path_type!r}; expected one of {PATH_TYPES}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter, not a scheme
        scheme = ""
    if scheme and path_type and scheme != path_type:
        raise ValueError(f"location {url!r} is {scheme!r} but path_type says {path_type!r}")
    kind = scheme or path_type or "file"
    if kind == "s3":
        if scheme:
            bucket, prefix = parts.netloc, parts.path
        else:
            bucket, _, prefix = url.strip("/").partition("/")
        if not bucket:
            raise ValueError(f"S3 location {url!r} has no bucket (expected s3://bucket/prefix)")
        return "s3", bucket, unquote(prefix).strip("/")
    if kind == "memory":
        name, prefix = (parts.netloc, parts.path) if scheme else url.strip("/").partition("/")[::2]
        if not name:
            raise ValueError(f"memory location {url!r} has no store name (expected memory://name)")
        return "memory", name, prefix.strip("/")
    if kind == "file":
        if scheme:
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"file location {url!r} names a host; use file:///absolute/path")
            path = unquote(parts.path)
        else:
            path = url
        if not path:
            raise ValueError(f"file location {url!r} has no path")
        return "file", path, ""
    raise ValueError(f"unsupported location scheme {scheme!r} in {url!r}; use s3://, file:// or memory://")


def storage_for(
    url: str,
    path_type: str | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    config: TransferConfig | None = None,
) -> Storage:
    """Build (not open) the storage for a location URL."""
    kind, where, prefix = parse_location(url, path_type)
    options = dict(options or {})
    if kind == "s3":
        return S3Storage(where, prefix, options=options, config=config)
    if options:
        unknown = set(options) - {"fsync"}
        if unknown:
            raise ValueError(f"storage_options {sorted(unknown)} do not apply to {kind!r} locations")
    if kind == "memory":
        return MemoryStorage(where, prefix)
    return LocalStorage(where, fsync=bool(options.get("fsync", True)))
