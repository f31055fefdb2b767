"""Location URLs: which backend a checkpoint location names, and building it.

Only this module maps a URL (``s3://``, ``file://`` or a plain path, ``memory://``) to a
backend. The S3 backend is imported when an S3 location is built, not before: a process
that only uses directories or memory never loads aioboto3 and botocore.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ._base import Storage
from ._local import LocalStorage
from ._memory import MemoryStorage

if TYPE_CHECKING:
    from ..config import TransferConfig

__all__ = ["PATH_TYPES", "parse_location", "reader_for", "storage_for"]

#: The location kinds, as a URL scheme or as ``path_type``.
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
    """Build (not open) the storage for a location URL.

    ``options`` are the backend's ``storage_options``: S3's client settings (see
    :class:`~asyncckpt.storage.S3Storage`), or ``fsync`` for a directory. Raises
    :class:`ValueError` for a malformed location or options that do not apply to it.
    """
    kind, where, prefix = parse_location(url, path_type)
    options = dict(options or {})
    if kind == "s3":
        from ._s3 import S3Storage  # imported on first use: aioboto3 and botocore are heavy

        return S3Storage(where, prefix, options=options, config=config)
    if options:
        unknown = set(options) - {"fsync"}
        if unknown:
            raise ValueError(f"storage_options {sorted(unknown)} do not apply to {kind!r} locations")
    if kind == "memory":
        return MemoryStorage(where, prefix)
    return LocalStorage(where, fsync=bool(options.get("fsync", True)))


def reader_for(
    writes: Storage,
    url: str,
    path_type: str | None,
    options: Mapping[str, Any] | None = None,
    config: TransferConfig | None = None,
) -> Storage | None:
    """The storage to read from ``url`` beside ``writes`` (built, not opened), or ``None``
    when it is the same location. ``options`` (those of ``writes``) carry over only to a
    location of the same kind (the same S3 credentials and endpoint, say)."""
    same_kind = parse_location(url, path_type)[0] == writes.kind
    reads = storage_for(url, path_type, options=options if same_kind else None, config=config)
    return None if same_kind and reads.url == writes.url else reads
