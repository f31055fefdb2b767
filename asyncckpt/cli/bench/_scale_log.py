"""The S3 server's log as the truth of ``asyncckpt bench --scale``: every request, what it
touched, and the size of its response body.

A :class:`~asyncckpt.testing.s3_server.SubprocessS3Server` writes one line per request,
``response-body METHOD PATH STATUS BYTES``, before the body is sent; so once a client has
its response, the line is in the log. :func:`read_requests` parses the lines between two
offsets of the log; :func:`request_kind` and :func:`request_epoch` say which object of
the bucket layout (:mod:`asyncckpt.layout`) a request was about.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from asyncckpt import layout
from asyncckpt.testing.s3_server import BODY_LOG_PREFIX

__all__ = ["LoggedRequest", "log_size", "read_requests", "request_epoch", "request_kind", "summarize_requests"]

_BODY_LINE = re.compile(rf"^{BODY_LOG_PREFIX} ([A-Z]+) (\S+) (\d{{3}}) (\d+|-)$")


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the server logged it: ``key`` is the object key below the bucket
    (empty for a bucket-level request), ``prefix`` the listing prefix of a listing."""

    method: str
    key: str
    query: str
    status: int
    body_bytes: int

    @property
    def is_listing(self) -> bool:
        return self.method == "GET" and not self.key and "list-type" in self.query

    @property
    def prefix(self) -> str:
        return parse_qs(self.query).get("prefix", [""])[0]


def log_size(path: str | None) -> int | None:
    """The log's current size in bytes (an offset for :func:`read_requests`); None when unreadable."""
    try:
        return os.path.getsize(path) if path else None
    except OSError:
        return None


def read_requests(path: str, start: int, end: int | None = None) -> list[LoggedRequest]:
    """Every request logged between byte offsets ``start`` and ``end`` (default: the end)."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(-1 if end is None else end - start).decode("utf-8", "replace")
    out = []
    for line in text.splitlines():
        m = _BODY_LINE.match(line.strip())
        if m is None:
            continue
        method, target, status, length = m.groups()
        path_part, _, query = target.partition("?")
        bucket_and_key = path_part.lstrip("/").split("/", 1)
        key = unquote(bucket_and_key[1]) if len(bucket_and_key) == 2 else ""
        body = 0 if length == "-" or method == "HEAD" else int(length)  # a HEAD's length is the object's
        out.append(LoggedRequest(method, key, query, int(status), body))
    return out


def _below_root(key: str) -> str:
    """``key`` from its ``epochs/`` part on (the checkpoint root's prefix removed)."""
    at = key.find(layout.EPOCHS_DIR + "/")
    return key[at:] if at >= 0 else key


def request_epoch(request: LoggedRequest) -> int | None:
    """The epoch whose directory the request touched (its key, or its listing's prefix)."""
    target = request.prefix if request.is_listing else request.key
    return layout.epoch_of_key(_below_root(target))


def request_kind(request: LoggedRequest) -> str:
    """What a request did, in the words of the bucket layout: ``PUT shard``, ``GET decision
    (absent)``, ``LIST writer``, ``HEAD manifest``..."""
    if request.is_listing:
        below = _below_root(request.prefix)
        return "LIST epochs" if below.rstrip("/") == layout.EPOCHS_DIR else "LIST writer"
    name = request.key.rsplit("/", 1)[-1]
    if "uploadId" in request.query or request.query.startswith("uploads"):
        what = "multipart"
    elif name == layout.MANIFEST_NAME:
        what = "manifest"
    elif name.endswith(layout.DECISION_SUFFIX):
        what = "decision"
    elif name.endswith(layout.RECEIPT_SUFFIX):
        what = "receipt"
    elif name.endswith(layout.SHARD_SUFFIX):
        what = "shard"
    elif name == layout.INDEX_NAME:
        what = "index"
    else:
        what = "other" if request.key else "bucket"
    absent = " (absent)" if request.status == 404 else ""
    return f"{request.method} {what}{absent}"


def summarize_requests(requests: Iterable[LoggedRequest]) -> dict[str, Any]:
    """Totals of some requests: how many, by kind, and the bytes of their response bodies."""
    requests = list(requests)
    return {
        "requests": len(requests),
        "response_bytes": sum(r.body_bytes for r in requests),
        "by_kind": dict(sorted(Counter(request_kind(r) for r in requests).items())),
    }
