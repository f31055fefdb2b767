"""S3-compatible storage through aioboto3 (AWS S3, MinIO, Ceph, R2, moto...).

One client per storage object, opened in :meth:`S3Storage.open` and closed in
:meth:`S3Storage.close`. Requests in flight are bounded by ``max_concurrency`` (and the
connection pool is sized to match). Retries are botocore's (``standard`` mode by
default); reading a response body is retried here too, from where it broke off.
Every botocore/aiohttp exception is translated in :func:`translate_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ReadTimeoutError as BotoReadTimeoutError,
)
from botocore.loaders import Loader, create_loader

from .._tasks import shielded
from ..config import TransferConfig
from ..errors import (
    CheckpointConflictError,
    CheckpointError,
    CheckpointNotFoundError,
    StorageError,
)
from ._base import (
    Buffer,
    ByteBudget,
    ObjectInfo,
    ObjectWriter,
    PendingUpload,
    Storage,
    record_request,
    validate_key,
)

__all__ = ["S3Storage", "S3_OPTION_NAMES", "translate_error", "validate_bucket"]

#: Keys accepted in ``storage_options`` for S3.
S3_OPTION_NAMES = frozenset(
    {
        "endpoint_url",
        "region_name",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "profile_name",
        "addressing_style",
        "verify",
    }
)

_THREAD_COPY_MIN = 1 << 20  # copies at least this big run off the event loop
_POOL_MAX_BUFFERS = 4  # warm part buffers kept between uploads (at most 4 parts' worth of RSS)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_DENIED = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}
_BODY_ERRORS = (
    aiohttp.ClientError,
    ResponseStreamingError,
    ConnectionClosedError,
    BotoReadTimeoutError,
    asyncio.TimeoutError,
    ConnectionError,
)


_shared_loader: Loader | None = None


def _new_botocore_session() -> AioSession:
    """A fresh session (own credentials and config) sharing one botocore data loader,
    which caches the parsed service models: a client then opens in milliseconds
    instead of re-reading botocore's JSON every time."""
    global _shared_loader
    if _shared_loader is None:
        _shared_loader = create_loader()
    session = get_session()
    session.register_component("data_loader", _shared_loader)
    return session


def validate_bucket(bucket: str) -> str:
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(f"invalid S3 bucket name {bucket!r} (3-63 lowercase letters, digits, '.', '-')")
    return bucket


def translate_error(exc: BaseException, *, bucket: str, key: str | None, url: str) -> CheckpointError:
    """Map a botocore/aiohttp/OS exception to the asyncckpt exception a user sees."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "Unknown")
        message = err.get("Message") or ""
        if code in _NOT_FOUND and key is not None:
            return CheckpointNotFoundError(f"{url} does not exist")
        if code == "NoSuchBucket" or (code in _NOT_FOUND and key is None):
            return StorageError(
                f"bucket {bucket!r} does not exist (NoSuchBucket)", bucket=bucket, key=key, code="NoSuchBucket"
            )
        if code in _CONFLICT:
            return CheckpointConflictError(f"{url} already exists (the create-only write was refused: {code})")
        if code == "403":  # a HEAD has no body, so no error code: only the status
            code = "AccessDenied"
        if code in _DENIED:
            return StorageError(
                f"access to {url} denied ({code}): check the credentials and the bucket policy",
                bucket=bucket,
                key=key,
                code=code,
            )
        return StorageError(f"{url}: {code}: {message}".rstrip(": "), bucket=bucket, key=key, code=code)
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "or pass them in storage_options)",
            bucket=bucket,
            key=key,
            code="NoCredentials",
        )
    if isinstance(exc, ParamValidationError):
        return StorageError(f"{url}: invalid request ({exc})", bucket=bucket, key=key, code="ParamValidation")
    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError)):
        return StorageError(
            f"{url}: cannot reach the S3 endpoint ({exc})", bucket=bucket, key=key, code=type(exc).__name__
        )
    if isinstance(exc, (BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError, OSError)):
        return StorageError(f"{url}: {type(exc).__name__}: {exc}", bucket=bucket, key=key, code=type(exc).__name__)
    return StorageError(
        f"{url}: unexpected {type(exc).__name__}: {exc}", bucket=bucket, key=key, code=type(exc).__name__
    )


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``.

    ``options`` (the manager's ``storage_options``): ``endpoint_url``, ``region_name``,
    ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``,
    ``profile_name``, ``addressing_style`` (``"path"``, ``"virtual"`` or ``"auto"``),
    ``verify`` (TLS). Anything not given comes from the standard AWS environment
    (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``~/.aws/config`` ...). Request limits,
    retries, timeouts, checksum mode and payload signing come from ``config``.
    """

    kind = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        options: Mapping[str, Any] | None = None,
        config: TransferConfig | None = None,
    ):
        self.bucket = validate_bucket(bucket)
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        options = dict(options or {})
        unknown = set(options) - S3_OPTION_NAMES
        if unknown:
            raise ValueError(f"unknown S3 storage option(s) {sorted(unknown)}; known: {sorted(S3_OPTION_NAMES)}")
        addressing = options.pop("addressing_style", "auto")
        if addressing not in ("auto", "path", "virtual"):
            raise ValueError(f"addressing_style must be 'auto', 'path' or 'virtual', got {addressing!r}")
        self._options = options
        self._addressing = addressing
        self.config = config or TransferConfig()
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._slots: asyncio.Semaphore | None = None
        self._part_pool: list[bytearray] = []

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        cfg = self.config
        session_kwargs = {k: self._options[k] for k in ("profile_name",) if k in self._options}
        client_kwargs = {k: v for k, v in self._options.items() if k != "profile_name"}
        aio_config = AioConfig(
            s3={"addressing_style": self._addressing, "payload_signing_enabled": cfg.payload_signing},
            request_checksum_calculation=cfg.checksum_mode,
            response_checksum_validation=cfg.checksum_mode,
            retries={"mode": cfg.retry_mode, "total_max_attempts": cfg.max_attempts},
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            max_pool_connections=cfg.max_concurrency + 2,
        )
        stack = contextlib.AsyncExitStack()
        try:
            session = aioboto3.Session(botocore_session=_new_botocore_session(), **session_kwargs)
            self._client = await stack.enter_async_context(session.client("s3", config=aio_config, **client_kwargs))
        except asyncio.CancelledError:
            await stack.aclose()
            raise
        except Exception as exc:
            await stack.aclose()
            raise translate_error(exc, bucket=self.bucket, key=None, url=self.url) from None
        self._stack = stack
        self._slots = asyncio.Semaphore(cfg.max_concurrency)

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        self._part_pool.clear()
        if stack is not None:
            await stack.aclose()

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _call(self, op: str, key: str | None, *, sent: int = 0, written: int = 0, **kwargs: Any) -> Any:
        """One S3 request under the concurrency limit, with its errors translated."""
        if self._client is None or self._slots is None:
            raise StorageError(f"{self.url}: storage is not open", bucket=self.bucket, code="NotOpen")
        async with self._slots:
            try:
                response = await getattr(self._client, op)(Bucket=self.bucket, **kwargs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                record_request()
                url = self.url_of(key) if key is not None else self.url
                raise translate_error(exc, bucket=self.bucket, key=key, url=url) from None
        retries = int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
        record_request(retries=retries, sent=sent, objects_written=written)
        return response

    # -- reads --------------------------------------------------------------------------

    async def get(self, key: str) -> bytes:
        info = await self._ranged_read(key, 0, None, None)
        assert isinstance(info, bytes)
        return info

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        buffer = memoryview(bytearray(end - start))
        await self.read_into(key, buffer, start)
        return bytes(buffer)

    async def read_into(self, key: str, buffer: memoryview, start: int = 0) -> None:
        if buffer.nbytes:
            await self._ranged_read(key, start, start + buffer.nbytes, buffer)
        elif await self.head(key) is None:  # S3 has no empty range: ask whether it exists
            raise CheckpointNotFoundError(f"{self.url_of(key)} does not exist")

    async def _ranged_read(self, key: str, start: int, end: int | None, buffer: memoryview | None) -> bytes | None:
        """GET ``[start, end)`` into ``buffer`` (or into new bytes when ``end`` is None).

        A body that breaks off mid-stream is re-requested from where it stopped, up to
        ``max_attempts`` times; the status-level retries are botocore's.
        """
        full_key = self._key(key)
        url = self.url_of(key)
        chunks: list[bytes] = []
        pos = start
        attempts = 0
        while True:
            kwargs: dict[str, Any] = {"Key": full_key}
            if end is not None:
                kwargs["Range"] = f"bytes={pos}-{end - 1}"
            elif pos:
                kwargs["Range"] = f"bytes={pos}-"
            if self._client is None or self._slots is None:
                raise StorageError(f"{self.url}: storage is not open", bucket=self.bucket, code="NotOpen")
            async with self._slots:
                try:
                    response = await self._client.get_object(Bucket=self.bucket, **kwargs)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    record_request()
                    raise translate_error(exc, bucket=self.bucket, key=key, url=url) from None
                body = response["Body"]
                received = 0
                try:
                    async for chunk in _body_chunks(body):
                        n = len(chunk)
                        if buffer is not None:
                            offset = pos - start
                            if offset + n > buffer.nbytes:
                                raise StorageError(
                                    f"{url}: server sent more bytes than requested", key=key, code="BadRange"
                                )
                            buffer[offset : offset + n] = chunk
                        else:
                            chunks.append(chunk)
                        pos += n
                        received += n
                    error: BaseException | None = None
                except asyncio.CancelledError:
                    body.close()
                    raise
                except _BODY_ERRORS as exc:
                    body.close()
                    error = exc
                finally:
                    retries = int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
                    record_request(retries=retries + (1 if attempts else 0), received=received)
            done = pos == end if end is not None else error is None
            if error is None and end is not None and not done:
                short = StorageError(f"{url}: object ended at byte {pos}, before {end}", key=key, code="ShortRead")
                if received == int(response.get("ContentLength", -1)):
                    raise short  # a complete response: the object is shorter, retrying cannot help
                error = short
            if error is None:
                return b"".join(chunks) if buffer is None else None
            attempts += 1
            if attempts >= self.config.max_attempts:
                if isinstance(error, CheckpointError):
                    raise error
                raise translate_error(error, bucket=self.bucket, key=key, url=url) from None
            if end is None and chunks:  # whole-object read: restart cleanly
                chunks.clear()
                pos = start

    async def head(self, key: str) -> ObjectInfo | None:
        try:
            response = await self._call("head_object", key, Key=self._key(key))
        except CheckpointNotFoundError:
            return None
        modified = response.get("LastModified")
        return ObjectInfo(
            key, int(response["ContentLength"]), modified.timestamp() if modified else None, response.get("ETag")
        )

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:  # type: ignore[override]
        root = f"{self.prefix}/" if self.prefix else ""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": root + prefix}
            if token:
                kwargs["ContinuationToken"] = token
            response = await self._call("list_objects_v2", None, **kwargs)
            for item in response.get("Contents", []):
                modified = item.get("LastModified")
                yield ObjectInfo(
                    item["Key"][len(root) :],
                    int(item["Size"]),
                    modified.timestamp() if modified else None,
                    item.get("ETag"),
                )
            if not response.get("IsTruncated"):
                return
            token = response.get("NextContinuationToken")

    async def list_dirs(self, prefix: str = "") -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        full = root + prefix
        names: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": full, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            response = await self._call("list_objects_v2", None, **kwargs)
            names.extend(p["Prefix"][len(full) :].rstrip("/") for p in response.get("CommonPrefixes", []))
            if not response.get("IsTruncated"):
                return sorted(names)
            token = response.get("NextContinuationToken")

    # -- writes -------------------------------------------------------------------------

    async def put(self, key: str, data: Buffer, *, create_only: bool = False) -> None:
        body = _BufferBody(data)
        kwargs: dict[str, Any] = {"Key": self._key(key), "Body": body}
        if create_only:
            kwargs["IfNoneMatch"] = "*"
        await self._call("put_object", key, sent=len(body), written=1, **kwargs)

    def writer(self, key: str, *, budget: ByteBudget | None = None, size_hint: int | None = None) -> ObjectWriter:
        return _S3Writer(self, key, budget, size_hint)

    async def delete(self, keys: Iterable[str]) -> None:
        full = [self._key(k) for k in keys]
        for i in range(0, len(full), 1000):
            batch = full[i : i + 1000]
            response = await self._call(
                "delete_objects", None, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise StorageError(
                    f"{self.url}: could not delete {len(errors)} object(s), first {first.get('Key')}: {first.get('Code')}",
                    bucket=self.bucket,
                    key=first.get("Key"),
                    code=first.get("Code"),
                )

    # -- probes and housekeeping -------------------------------------------------------

    async def check_root(self) -> None:
        await self._call("head_bucket", None)

    async def list_pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        root = f"{self.prefix}/" if self.prefix else ""
        uploads: list[PendingUpload] = []
        kwargs: dict[str, Any] = {"Prefix": root + prefix}
        while True:
            response = await self._call("list_multipart_uploads", None, **kwargs)
            for item in response.get("Uploads", []):
                initiated = item.get("Initiated")
                uploads.append(
                    PendingUpload(
                        item["Key"][len(root) :], item["UploadId"], initiated.timestamp() if initiated else None
                    )
                )
            if not response.get("IsTruncated"):
                return uploads
            kwargs.update(KeyMarker=response.get("NextKeyMarker"), UploadIdMarker=response.get("NextUploadIdMarker"))

    async def abort_pending_upload(self, upload: PendingUpload) -> None:
        try:
            await self._call("abort_multipart_upload", upload.key, Key=self._key(upload.key), UploadId=upload.upload_id)
        except StorageError as exc:
            if exc.code != "NoSuchUpload":  # already gone: what we wanted
                raise

    # -- part buffers -------------------------------------------------------------------

    @property
    def _part_capacity(self) -> int:
        """Room in a part buffer: a part plus the small rest a last part may absorb.
        Pooled buffers are never resized (a request body may still view them)."""
        return self.config.part_size + self.config.part_size // 4

    def _take_part_buffer(self) -> bytearray:
        return self._part_pool.pop() if self._part_pool else bytearray(self._part_capacity)

    def _give_part_buffer(self, buf: bytearray) -> None:
        keep = max(1, min(_POOL_MAX_BUFFERS, self.config.max_bytes_in_flight // self._part_capacity))
        if len(buf) == self._part_capacity and len(self._part_pool) < keep:
            self._part_pool.append(buf)


class _S3Writer(ObjectWriter):
    """Buffers writes into part-sized buffers; an object of at most one part is one PUT.

    At most ``budget`` bytes of part buffers exist at once (waiting for a slot is how
    a fast producer is held back); parts upload concurrently under the storage's
    request limit. Nothing is visible until :meth:`commit` completes the upload.
    """

    def __init__(self, storage: S3Storage, key: str, budget: ByteBudget | None, size_hint: int | None = None):
        self.key = key
        self._size_hint = size_hint
        self._absorbing = False  # the last part takes the small rest instead of a tiny extra part
        self._storage = storage
        self._full_key = storage._key(key)
        self._budget = budget or ByteBudget(storage.config.max_bytes_in_flight)
        self._part_size = storage.config.part_size
        self._buf: bytearray | None = None
        self._fill = 0
        self._size = 0
        self._upload_id: str | None = None
        self._parts: dict[int, str] = {}
        self._next_part = 1
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._creating: asyncio.Future[Any] | None = None

    async def _new_buffer(self) -> None:
        await self._budget.acquire(self._storage._part_capacity)
        # The first part grows with the data, so a small object never pays for a
        # part-sized buffer; later parts reuse warm pooled buffers.
        self._buf = bytearray() if self._next_part == 1 else self._storage._take_part_buffer()
        self._fill = 0

    async def write(self, data: Buffer) -> None:
        if self._closed:
            raise StorageError(f"{self._storage.url_of(self.key)}: write after commit/abort", key=self.key)
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        while view.nbytes:
            if self._buf is None:
                await self._new_buffer()
            assert self._buf is not None
            limit = self._storage._part_capacity if self._absorbing else self._part_size
            n = min(view.nbytes, limit - self._fill)
            if n >= _THREAD_COPY_MIN:
                await asyncio.to_thread(_copy_into, self._buf, self._fill, view[:n])
            else:
                self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            self._size += n
            view = view[n:]
            if self._fill == self._part_size and not self._absorbing:
                rest = (self._size_hint or 0) - self._size
                if 0 < rest <= self._part_size // 4:
                    self._absorbing = True  # what is left joins this part: no tiny last part
                else:
                    await self._flush_part()
            elif self._fill == limit:
                self._absorbing = False  # the hint was too small: carry on part by part
                await self._flush_part()
            self._raise_failed_part()

    def _raise_failed_part(self) -> None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _flush_part(self) -> None:
        if self._upload_id is None:
            await self._start_upload()
        buf, fill = self._buf, self._fill
        self._buf, self._fill = None, 0
        assert buf is not None
        number = self._next_part
        self._next_part += 1
        task = asyncio.create_task(self._upload_part(number, buf, fill))
        # released by a callback: it runs even if the task is cancelled before it starts
        task.add_done_callback(lambda _, buf=buf: self._release_part(buf))  # type: ignore[misc]
        self._tasks.add(task)

    async def _start_upload(self) -> None:
        """CreateMultipartUpload, such that a cancel can never lose the upload's id
        (:meth:`abort` waits for the request and aborts what it created)."""
        self._creating = asyncio.ensure_future(
            self._storage._call("create_multipart_upload", self.key, Key=self._full_key)
        )
        response = await asyncio.shield(self._creating)
        self._upload_id = response["UploadId"]

    def _release_part(self, buf: bytearray) -> None:
        self._storage._give_part_buffer(buf)
        self._budget.release(self._storage._part_capacity)

    async def _upload_part(self, number: int, buf: bytearray, fill: int) -> None:
        body = _BufferBody(memoryview(buf)[:fill])
        response = await self._storage._call(
            "upload_part",
            self.key,
            sent=fill,
            Key=self._full_key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
        )
        self._parts[number] = response["ETag"]

    async def _wait_parts(self) -> None:
        pending = set(self._tasks)
        if pending:
            await asyncio.wait(pending)
        self._raise_failed_part()
        self._tasks.clear()

    async def commit(self) -> ObjectInfo:
        if self._closed:
            raise StorageError(f"{self._storage.url_of(self.key)}: commit after commit/abort", key=self.key)
        try:
            if self._upload_id is None:
                # small object: one PUT of whatever is buffered (the buffer is released
                # once the request is done with it)
                buf = self._buf if self._buf is not None else bytearray()
                await self._storage.put(self.key, memoryview(buf)[: self._fill])
                self._release_current()
            else:
                if self._fill:
                    await self._flush_part()
                await self._wait_parts()
                parts = [{"PartNumber": n, "ETag": etag} for n, etag in sorted(self._parts.items())]
                await self._storage._call(
                    "complete_multipart_upload",
                    self.key,
                    written=1,
                    Key=self._full_key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            await shielded(self.abort())
            raise
        self._closed = True
        return ObjectInfo(self.key, self._size, time.time())

    def _release_current(self) -> None:
        if self._buf is not None:
            self._release_part(self._buf)
            self._buf = None

    async def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks.clear()
        self._release_current()
        if self._upload_id is None and self._creating is not None:
            with contextlib.suppress(Exception):  # a failed create left nothing to abort
                self._upload_id = (await self._creating)["UploadId"]
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            with contextlib.suppress(CheckpointError):
                await self._storage.abort_pending_upload(PendingUpload(self.key, upload_id))


class _BufferBody:
    """A request body over a buffer, sent without copying it.

    botocore sees a seekable file-like object (``read``/``seek``/``tell``: it measures
    the length and rewinds it for a retry); aiohttp sees an async iterable and streams
    memoryview slices of the buffer, yielding to the event loop between them (a raw
    ``bytes`` body of many MiB would be copied into the transport in one go).
    """

    _CHUNK = 256 * 1024

    def __init__(self, data: Buffer):
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def __len__(self) -> int:
        return self._view.nbytes - self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = self._view.nbytes if n is None or n < 0 else min(self._view.nbytes, self._pos + n)
        chunk = bytes(self._view[self._pos : end])
        self._pos = end
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._view.nbytes)[whence]
        self._pos = max(0, min(self._view.nbytes, base + offset))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        view, pos = self._view, self._pos
        while pos < view.nbytes:
            yield view[pos : pos + self._CHUNK]
            pos += self._CHUNK
            if pos < view.nbytes:
                await asyncio.sleep(0)


def _copy_into(buf: bytearray, offset: int, view: memoryview) -> None:
    # slice assignment grows a bytearray whose length is ``offset`` (the growing first part)
    buf[offset : offset + view.nbytes] = view


async def _body_chunks(body: Any) -> AsyncIterator[bytes]:
    """The response body as the network delivers it, without re-joining into fixed-size
    chunks (one copy fewer than ``iter_chunks``): aiohttp's ``readany`` when the body
    wraps an aiohttp response, else aiobotocore's ``iter_chunks``."""
    content = getattr(getattr(body, "__wrapped__", None), "content", None)
    if content is None or not hasattr(content, "readany"):
        async for chunk in body.iter_chunks(1 << 20):
            yield chunk
        return
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        yield chunk
