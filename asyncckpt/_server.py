"""An S3 endpoint inside this process, for ``asyncckpt demo`` and quick experiments.

:class:`EmbeddedS3Server` runs moto's S3 server (``moto[s3]``, the ``server`` extra)
in a background thread on ``127.0.0.1`` and a free port. It is loopback only, keeps
everything in memory, and accepts any credentials: it is a stand-in for real object
storage, not a store for data you want to keep.

This module is synchronous on purpose: start the server before the event loop runs,
stop it after the loop is gone.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any

__all__ = ["EmbeddedS3Server"]

_INSTALL_HINT = "pip install 'asyncckpt[server]'"


class EmbeddedS3Server:
    """moto's S3 server on ``127.0.0.1`` (an ephemeral port), in a daemon thread.

    Use it as a context manager::

        with EmbeddedS3Server() as srv:
            srv.create_bucket("demo")
            MultiNodeCheckpointManager("s3://demo/run", storage_options=srv.storage_options)

    :meth:`start` raises :class:`RuntimeError` when moto is not installed. At exit
    (:meth:`stop`) the buckets made with :meth:`create_bucket` are emptied and removed,
    then the server is shut down. moto keeps its state per process, so two servers in
    one process see the same buckets.
    """

    HOST = "127.0.0.1"
    REGION = "us-east-1"
    #: moto accepts any credentials, but botocore refuses to sign a request without some.
    ACCESS_KEY = "asyncckpt-embedded"
    SECRET_KEY = "asyncckpt-embedded"

    def __init__(self) -> None:
        self._server: Any = None
        self._client: Any = None
        self._endpoint_url: str | None = None
        self._buckets: list[str] = []
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> EmbeddedS3Server:
        """Start the server (idempotent) and return ``self``."""
        with self._lock:
            if self._server is not None:
                return self
            try:
                from moto.server import ThreadedMotoServer
            except ImportError as exc:
                raise RuntimeError(
                    f"the embedded S3 server needs moto ({exc}); install it with: {_INSTALL_HINT}"
                ) from None
            # moto's verbose=False does not silence werkzeug's line per request
            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            server = ThreadedMotoServer(ip_address=self.HOST, port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            self._server = server
            self._endpoint_url = f"http://{host}:{port}"
            return self

    def stop(self) -> None:
        """Remove the buckets this object created, then stop the server (idempotent)."""
        with self._lock:
            server, self._server = self._server, None
            if server is None:
                return
            try:
                for bucket in self._buckets:
                    self._remove_bucket(bucket)
            finally:
                self._buckets.clear()
                if self._client is not None:
                    self._client.close()
                    self._client = None
                server.stop()
                self._endpoint_url = None

    def __enter__(self) -> EmbeddedS3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what clients need ----------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``; :class:`RuntimeError` before :meth:`start`."""
        if self._endpoint_url is None:
            raise RuntimeError("EmbeddedS3Server is not running; call start() or use it in a with-block")
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

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name``; a bucket that already exists is fine (and is left in
        place at :meth:`stop`: only buckets created here are removed). Raises
        :class:`RuntimeError` when the server refuses."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._s3()
        try:
            client.create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise RuntimeError(f"embedded S3 server: cannot create bucket {name!r}: {exc}") from None
        except BotoCoreError as exc:
            raise RuntimeError(f"embedded S3 server: cannot create bucket {name!r}: {exc}") from None
        with self._lock:
            self._buckets.append(name)

    # -- internals ------------------------------------------------------------------------

    def _s3(self) -> Any:
        """A synchronous boto3 client for bucket administration (never used on an event loop)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session(
                aws_access_key_id=self.ACCESS_KEY,
                aws_secret_access_key=self.SECRET_KEY,
                region_name=self.REGION,
            )
            self._client = session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                config=Config(
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    retries={"mode": "standard", "max_attempts": 2},
                ),
            )
        return self._client

    def _remove_bucket(self, bucket: str) -> None:
        """Empty and delete ``bucket`` so moto releases its buffers (temp files for big objects)."""
        from botocore.exceptions import ClientError

        client = self._s3()
        try:
            for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
                for upload in page.get("Uploads", []):
                    client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            client.delete_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
                raise
