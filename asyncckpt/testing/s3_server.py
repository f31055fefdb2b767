"""An S3 endpoint on 127.0.0.1 for tests, demos and benchmarks, and the helpers that administer it.

moto's S3 server (``moto[s3]``, the ``server`` extra) runs on a free loopback port, either

* in a daemon thread of this process: :class:`ThreadedS3Server`, quick to start (the test-suite
  and ``asyncckpt demo`` use it); or
* as a subprocess with its own PID: :class:`SubprocessS3Server`, whose CPU and memory can be
  measured apart from the client's, and which logs every request with the size of its response
  body (``asyncckpt bench`` uses it).

Either keeps everything in memory and accepts any credentials: a stand-in for object storage,
not a store for data you want to keep. Starting and stopping are synchronous: start a server
before the event loop runs, stop it after the loop is gone. moto keeps its state per process, so
two threaded servers in one process see the same buckets.

Bucket administration is asynchronous (aioboto3) and works on any S3 endpoint, an external MinIO
as well: :func:`admin_client`, :func:`new_bucket_name`, :func:`create_bucket`,
:func:`empty_bucket` and :func:`delete_bucket`.

Importing this module is cheap: moto, werkzeug and aioboto3 are imported when they are needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import aioboto3
    from moto.server import ThreadedMotoServer
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import ObjectIdentifierTypeDef

__all__ = [
    "HOST",
    "REGION",
    "READY_LINE",
    "BODY_LOG_PREFIX",
    "S3Server",
    "SubprocessS3Server",
    "ThreadedS3Server",
    "admin_client",
    "create_bucket",
    "delete_bucket",
    "embedded_bucket",
    "empty_bucket",
    "new_bucket_name",
]

HOST = "127.0.0.1"
REGION = "us-east-1"
#: The line a :class:`SubprocessS3Server` prints once it accepts connections, followed by its URL.
READY_LINE = "asyncckpt s3 server listening on"
#: Each request's line in a :class:`SubprocessS3Server`'s log: ``PREFIX METHOD PATH STATUS BYTES``,
#: where ``BYTES`` is the response body's Content-Length (``-`` when the response has none).
BODY_LOG_PREFIX = "response-body"

_INSTALL_HINT = "pip install 'asyncckpt[server]'"


# ---------------------------------------------------------------------- servers


class S3Server(ABC):
    """What every embedded server offers: a lifecycle, an endpoint, and options for clients.

    Use one as a context manager (``with ThreadedS3Server() as server: ...``), or call
    :meth:`start` and :meth:`stop`; both are idempotent. :meth:`start` raises
    :class:`RuntimeError` when moto is not installed or the server does not come up.
    """

    HOST = HOST
    REGION = REGION
    #: moto accepts any credentials, but botocore refuses to sign a request without some.
    ACCESS_KEY = "asyncckpt-embedded"
    SECRET_KEY = "asyncckpt-embedded"

    def __init__(self) -> None:
        self._endpoint_url: str | None = None
        self._lock = threading.Lock()

    def start(self) -> Self:
        """Start the server (idempotent) and return ``self``."""
        with self._lock:
            if self._endpoint_url is None:
                self._endpoint_url = self._start()
        return self

    def stop(self) -> None:
        """Stop the server (idempotent); its buckets and objects are gone with it."""
        with self._lock:
            if self._endpoint_url is not None:
                self._endpoint_url = None
                self._stop()

    @abstractmethod
    def _start(self) -> str:
        """Start serving; return ``http://127.0.0.1:PORT``."""

    @abstractmethod
    def _stop(self) -> None:
        """Stop serving and release what :meth:`_start` took."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``; :class:`RuntimeError` when the server is not running."""
        if self._endpoint_url is None:
            raise RuntimeError(f"{type(self).__name__} is not running; call start() or use it in a with-block")
        return self._endpoint_url

    @property
    def storage_options(self) -> dict[str, str]:
        """``storage_options`` for :class:`~asyncckpt.MultiNodeCheckpointManager`: the
        endpoint, a region, path-style addressing and the dummy credentials moto takes
        (so the user's AWS environment is neither needed nor consulted for keys)."""
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": self.REGION,
            "aws_access_key_id": self.ACCESS_KEY,
            "aws_secret_access_key": self.SECRET_KEY,
            "addressing_style": "path",
        }

    def admin_client(self, session: aioboto3.Session | None = None) -> contextlib.AbstractAsyncContextManager[S3Client]:
        """:func:`admin_client` on this server, with its dummy credentials."""
        return admin_client(session, self.endpoint_url, credentials=(self.ACCESS_KEY, self.SECRET_KEY))


class ThreadedS3Server(S3Server):
    """moto's S3 server on ``127.0.0.1`` (an ephemeral port), in a daemon thread of this process."""

    def __init__(self) -> None:
        super().__init__()
        self._server: ThreadedMotoServer | None = None

    def _start(self) -> str:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise RuntimeError(f"the embedded S3 server needs moto ({exc}); install it with: {_INSTALL_HINT}") from None
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # verbose=False does not silence werkzeug's lines
        server = ThreadedMotoServer(ip_address=self.HOST, port=0, verbose=False)
        server.start()
        self._server = server
        host, port = server.get_host_and_port()
        return f"http://{host}:{port}"

    def _stop(self) -> None:
        server, self._server = self._server, None
        assert server is not None  # _stop follows a successful _start
        server.stop()  # werkzeug's serve_forever closes the listening socket on its way out


class SubprocessS3Server(S3Server):
    """moto's S3 server on ``127.0.0.1`` (an ephemeral port) in a subprocess of its own.

    The subprocess runs this module's file as a script (so it imports moto, and nothing of
    asyncckpt), with ``env`` as its whole environment (default: this process's). Its output goes to ``log_path`` (default: a
    temporary file, removed at :meth:`stop`): werkzeug's line per request and, per request,
    ``response-body METHOD PATH STATUS BYTES`` (:data:`BODY_LOG_PREFIX`), written before the
    body is sent. :meth:`stop` terminates it by its PID (SIGTERM, then SIGKILL after 10 s).
    """

    def __init__(
        self,
        log_path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 20.0,
    ) -> None:
        super().__init__()
        self._log_path = Path(log_path) if log_path is not None else None
        self._env = dict(env) if env is not None else None
        self._timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int:
        """The server process's PID; :class:`RuntimeError` when it is not running."""
        if self._proc is None:
            raise RuntimeError("SubprocessS3Server is not running")
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        """Where the server's output goes (set once :meth:`start` ran)."""
        if self._log_path is None:
            raise RuntimeError("SubprocessS3Server has no log yet; call start()")
        return self._log_path

    def _start(self) -> str:
        if importlib.util.find_spec("moto") is None:
            raise RuntimeError(f"the embedded S3 server needs moto; install it with: {_INSTALL_HINT}")
        if self._log_path is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="asyncckpt-s3-server-")
            self._log_path = Path(self._tempdir.name) / "s3_server.log"
        env = dict(os.environ if self._env is None else self._env)
        with open(self._log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-P", "-u", __file__],  # -P: this file's directory stays off sys.path
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        try:
            return self._await_ready()
        except BaseException:
            self._stop()
            raise

    def _await_ready(self) -> str:
        """Poll the log for :data:`READY_LINE` until ``timeout``; the URL it names."""
        assert self._proc is not None and self._log_path is not None
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            for line in self._log_path.read_text(errors="replace").splitlines():
                if line.startswith(READY_LINE):
                    return line[len(READY_LINE) :].strip()
            if self._proc.poll() is not None:
                tail = self._log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the S3 server process exited with code {self._proc.returncode}: {tail}")
            time.sleep(0.05)
        raise RuntimeError(f"the S3 server process did not start within {self._timeout:g} s")

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # by PID: our own subprocess
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
            self._log_path = None


def _serve() -> None:
    """The body of :class:`SubprocessS3Server`'s process: serve until terminated."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    body_log = logging.getLogger("asyncckpt.s3_server")
    body_log.addHandler(logging.StreamHandler(sys.stderr))
    body_log.setLevel(logging.INFO)
    body_log.propagate = False
    app = _log_body_sizes(DomainDispatcherApplication(create_backend_app), body_log)
    server = make_server(HOST, 0, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"{READY_LINE} http://{HOST}:{server.port}", flush=True)
    server.serve_forever()


def _log_body_sizes(app: Callable[..., Iterable[bytes]], log: logging.Logger) -> Callable[..., Iterable[bytes]]:
    """Wrap a WSGI ``app``: log each response's status and Content-Length when it starts."""

    def logged(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") + (f"?{environ['QUERY_STRING']}" if environ.get("QUERY_STRING") else "")

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            length = next((value for name, value in headers if name.lower() == "content-length"), "-")
            log.info("%s %s %s %s %s", BODY_LOG_PREFIX, environ.get("REQUEST_METHOD"), path, status[:3], length)
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return logged


# ---------------------------------------------------------------------- bucket administration


@contextlib.contextmanager
def embedded_bucket(bucket: str) -> Iterator[dict[str, str]]:
    """``bucket`` on moto's S3 server in a thread of this process (127.0.0.1), for the
    examples: yields the ``storage_options`` that reach it; the server stops at the end.
    :class:`RuntimeError` when the server can not start or the bucket not be made."""
    with ThreadedS3Server().start() as server:

        async def create() -> None:
            async with server.admin_client() as admin:
                await create_bucket(admin, bucket)

        asyncio.run(create())
        yield server.storage_options


def new_bucket_name(prefix: str = "test") -> str:
    """A fresh, valid, lowercase bucket name: ``PREFIX-`` and 12 hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def admin_client(
    session: aioboto3.Session | None,
    endpoint_url: str,
    *,
    credentials: tuple[str, str] | None = None,
) -> AsyncIterator[S3Client]:
    """A plain aioboto3 S3 client on ``endpoint_url`` for arranging and inspecting buckets:
    path addressing, no extra checksums, 2 attempts per request, region :data:`REGION`.

    Pass a ``session`` to share botocore's loaded service models between clients (None:
    a new one). ``credentials`` (access key, secret key) default to the AWS environment.
    """
    import aioboto3
    from aiobotocore.config import AioConfig

    config = AioConfig(
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "total_max_attempts": 2},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    access_key, secret_key = credentials if credentials is not None else (None, None)
    session = session or aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        config=config,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
    ) as client:
        yield client


async def create_bucket(client: S3Client, bucket: str) -> bool:
    """Create ``bucket``; ``False`` when it exists already (nothing is done).

    Any other refusal raises :class:`RuntimeError` naming the bucket.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        await client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False
        raise RuntimeError(f"cannot create bucket {bucket!r}: {exc}") from None
    except BotoCoreError as exc:
        raise RuntimeError(f"cannot create bucket {bucket!r}: {exc}") from None
    return True


async def empty_bucket(client: S3Client, bucket: str, prefix: str = "") -> None:
    """Abort the multipart uploads and delete the objects under ``prefix`` (all by default)."""
    async for uploads_page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in uploads_page.get("Uploads", []):
            with contextlib.suppress(client.exceptions.NoSuchUpload):
                await client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    async for objects_page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects: list[ObjectIdentifierTypeDef] = [{"Key": item["Key"]} for item in objects_page.get("Contents", [])]
        if objects:
            await client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})


async def delete_bucket(client: S3Client, bucket: str) -> None:
    """Empty ``bucket`` and delete it (moto then frees its buffers)."""
    await empty_bucket(client, bucket)
    await client.delete_bucket(Bucket=bucket)


if __name__ == "__main__":
    _serve()
