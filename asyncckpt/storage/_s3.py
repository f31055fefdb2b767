"""S3-compatible storage through aioboto3 (AWS S3, MinIO, Ceph, R2, moto...).

One client per storage object, opened in :meth:`S3Storage.open` and closed in
:meth:`S3Storage.close`. Requests in flight are bounded by ``max_concurrency`` (and the
connection pool is sized to match). Retries are botocore's (``standard`` mode by
default); reading a response body is retried here too, from where it broke off.
Every botocore/aiohttp exception is translated in :func:`translate_error`. Uploads (the
streaming writer and its part buffers) live in :mod:`._s3_upload`.

Only :mod:`._location` and the package's ``__getattr__`` import this module, on first
use: it is the one that loads aioboto3, aiobotocore and botocore.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import re
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

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

from ..config import TransferConfig
from ..errors import (
    CheckpointConflictError,
    CheckpointError,
    CheckpointNotFoundError,
    ObjectTooShortError,
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
from ._s3_upload import BufferBody, S3Writer

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

__all__ = ["S3Storage"]

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

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_PAST_END = {"InvalidRange", "416"}  # a range that starts at or after the object's end
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


def _client_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """The S3 client's keyword arguments from ``storage_options`` (less the session's).

    Over a plain ``http://`` endpoint there is no TLS to verify, yet aiobotocore builds
    an SSL context and loads the CA bundle for every client unless ``verify`` is false
    (15-20 ms of CPU): it is set false there, unless the options say otherwise.
    """
    kwargs = {k: v for k, v in options.items() if k != "profile_name"}
    endpoint = kwargs.get("endpoint_url")
    if isinstance(endpoint, str) and endpoint.lower().startswith("http://"):
        kwargs.setdefault("verify", False)
    return kwargs


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
        if code in _PAST_END and key is not None:
            return ObjectTooShortError(
                f"{url}: the object ends before the requested range ({code})", bucket=bucket, key=key, code=code
            )
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
    ``verify`` (TLS; false by default for an ``http://`` endpoint). Anything not given
    comes from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``,
    ``~/.aws/config`` ...). Request limits, retries, timeouts, checksum mode and payload
    signing come from ``config``.
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
        self._client: S3Client | None = None
        self._slots: asyncio.Semaphore | None = None
        # the budgets its writers leased part buffers from: their warm buffers go at close
        self._budgets: weakref.WeakSet[ByteBudget] = weakref.WeakSet()

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        cfg = self.config
        session_kwargs = {k: self._options[k] for k in ("profile_name",) if k in self._options}
        client_kwargs = _client_kwargs(self._options)
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
        for budget in list(self._budgets):
            budget.drop_warm_buffers()
        if stack is not None:
            await stack.aclose()

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.asynccontextmanager
    async def _request(self, op: str, key: str | None, **kwargs: Any) -> AsyncIterator[Any]:
        """Send one S3 request and hold its slot of the concurrency limit while the block
        runs (a streamed response body is read inside it). The request's own errors are
        translated here; a failed request is counted, a successful one is the caller's
        to count."""
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
            yield response

    async def _call(self, op: str, key: str | None, *, sent: int = 0, written: int = 0, **kwargs: Any) -> Any:
        """One S3 request under the concurrency limit, with its errors translated."""
        async with self._request(op, key, **kwargs) as response:
            retries = _retry_attempts(response)
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
        await self.read_scatter(key, (buffer,), start)

    async def read_scatter(self, key: str, views: Sequence[memoryview], start: int = 0) -> None:
        """One ranged GET whose body is copied into ``views`` in order, chunk by chunk (a
        chunk may straddle views)."""
        into = _Scatter(views)
        if into.size:
            await self._ranged_read(key, start, start + into.size, into)
        elif await self.head(key) is None:  # S3 has no empty range: ask whether it exists
            raise CheckpointNotFoundError(f"{self.url_of(key)} does not exist")

    async def _ranged_read(self, key: str, start: int, end: int | None, into: _Scatter | None) -> bytes | None:
        """GET ``[start, end)`` into ``into`` (or into new bytes when ``end`` is None).

        A body that breaks off mid-stream is re-requested from where it stopped, up to
        ``max_attempts`` times (``into`` goes on from the byte it got to); the
        status-level retries are botocore's.
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
            async with self._request("get_object", key, **kwargs) as response:
                body = response["Body"]
                received = 0
                try:
                    async for chunk in _body_chunks(body):
                        if into is None:
                            chunks.append(chunk)
                        elif not into.write(chunk):
                            raise StorageError(
                                f"{url}: server sent more bytes than requested", key=key, code="BadRange"
                            )
                        pos += len(chunk)
                        received += len(chunk)
                    error: BaseException | None = None
                except asyncio.CancelledError:
                    body.close()
                    raise
                except _BODY_ERRORS as exc:
                    body.close()
                    error = exc
                finally:
                    record_request(retries=_retry_attempts(response) + (1 if attempts else 0), received=received)
            if error is None and end is not None and pos != end:
                short = ObjectTooShortError(
                    f"{url}: object ended at byte {pos}, before {end}", bucket=self.bucket, key=key
                )
                if received == int(response.get("ContentLength", -1)):
                    raise short  # a complete response: the object is shorter, retrying cannot help
                error = short
            if error is None:
                return b"".join(chunks) if into is None else None
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

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
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

    async def list_dirs(self, prefix: str = "") -> builtins.list[str]:
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
        body = BufferBody(data)
        kwargs: dict[str, Any] = {"Key": self._key(key), "Body": body}
        if create_only:
            kwargs["IfNoneMatch"] = "*"
        await self._call("put_object", key, sent=len(body), written=1, **kwargs)

    def writer(self, key: str, *, budget: ByteBudget | None = None, size_hint: int | None = None) -> ObjectWriter:
        return S3Writer(self, key, budget, size_hint)

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

    async def list_pending_uploads(self, prefix: str = "") -> builtins.list[PendingUpload]:
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


def _retry_attempts(response: Any) -> int:
    """How many times botocore retried the request that got ``response``."""
    return int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)


def _aiohttp_stream(body: Any) -> Any | None:
    """The aiohttp ``StreamReader`` under an aiobotocore streaming body, or ``None``.

    This is the one place that reaches into a dependency's internals, on purpose: an
    aiobotocore ``StreamingBody`` wraps the aiohttp response (``__wrapped__``), whose
    ``content.readchunk()`` hands out the chunks as the network delivered them, one copy
    fewer than ``iter_chunks`` (or ``readany``, when several chunks wait) joining them.
    Should a release move it, this returns ``None`` and reads fall back to
    ``iter_chunks`` (correct, only slower); the S3 conformance tests check that the
    fast path is still found.
    """
    content = getattr(getattr(body, "__wrapped__", None), "content", None)
    return content if content is not None and hasattr(content, "readchunk") else None


class _Scatter:
    """Where the bytes of a ranged GET go: ``views`` in order (empty ones skipped), each
    chunk copied at the position the previous one ended (a chunk may straddle views)."""

    def __init__(self, views: Sequence[memoryview]):
        self._views = [view for view in views if view.nbytes]
        self.size = sum(view.nbytes for view in self._views)
        self.written = 0
        self._at = 0  # the view the next byte goes to
        self._offset = 0  # ... and where in it

    def write(self, chunk: bytes) -> bool:
        """Copy ``chunk`` in after the bytes written so far; False (nothing copied) when
        it does not fit in what is left."""
        data = memoryview(chunk)
        if data.nbytes > self.size - self.written:
            return False
        self.written += data.nbytes
        while data.nbytes:
            view = self._views[self._at]
            n = min(view.nbytes - self._offset, data.nbytes)
            view[self._offset : self._offset + n] = data[:n]
            data = data[n:]
            self._offset += n
            if self._offset == view.nbytes:
                self._at += 1
                self._offset = 0
        return True


async def _body_chunks(body: Any) -> AsyncIterator[bytes]:
    """The response body as the network delivers it (see :func:`_aiohttp_stream`)."""
    stream = _aiohttp_stream(body)
    if stream is None:
        async for chunk in body.iter_chunks(1 << 20):
            yield chunk
        return
    while True:
        chunk, end_of_http_chunk = await stream.readchunk()
        if chunk:
            yield chunk
        elif not end_of_http_chunk:  # (an empty end of a chunk of a chunked body is not the end)
            return
