"""The S3 servers ``asyncckpt bench --peers`` measures on: moto and localbucket, each a subprocess.

* ``moto``: :class:`~asyncckpt.testing.s3_server.SubprocessS3Server` (one GIL-bound
  process; multipart uploads cost it more CPU than single PUTs of the same bytes).
* ``localbucket``: the ``localbucket`` package (stdlib ``ThreadingHTTPServer``, buckets
  as folders on disk), a lighter server where client differences show. It has no batch
  delete and no multipart listing, so :func:`clear_prefix` deletes key by key there.

Both log one werkzeug/``http.server`` style line per request (``"GET /b/k HTTP/1.1" 200``),
which :func:`~._meters.parse_server_log` counts, and have a PID whose CPU is measured.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncckpt.testing.s3_server import HOST, S3Server, SubprocessS3Server, empty_bucket

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

__all__ = ["SERVERS", "LocalbucketServer", "clear_prefix", "make_server", "server_unavailable"]

#: The servers ``--servers`` accepts, with what each is.
SERVERS = {
    "moto": "moto_server (subprocess; MALLOC_* tunables on the server only)",
    "localbucket": "localbucket (subprocess; buckets as folders on disk)",
}


class LocalbucketServer(S3Server):
    """``python -m localbucket --host 127.0.0.1 --port P DIR`` as a subprocess of its own.

    Its output (one line per request) goes to ``log_path``; :meth:`stop` terminates it by
    its PID (SIGTERM, then SIGKILL after 10 s). ``env`` is its whole environment.
    """

    def __init__(
        self, data_dir: Path, log_path: Path, *, env: Mapping[str, str] | None = None, timeout: float = 20.0
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server process's PID; :class:`RuntimeError` when it is not running."""
        if self._proc is None:
            raise RuntimeError("LocalbucketServer is not running")
        return self._proc.pid

    def _start(self) -> str:
        reason = server_unavailable("localbucket")
        if reason is not None:
            raise RuntimeError(reason)
        port = _free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "localbucket", "--host", HOST, "--port", str(port), str(self.data_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env,
            )
        try:
            self._await_ready(port)
        except BaseException:
            self._stop()
            raise
        return f"http://{HOST}:{port}"

    def _await_ready(self, port: int) -> None:
        """Poll until the port accepts connections, for at most ``timeout`` seconds."""
        assert self._proc is not None
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"localbucket exited with code {self._proc.returncode}: {tail}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"localbucket did not start within {self._timeout:g} s")

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # by PID: our own subprocess
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (localbucket cannot bind port 0 and say which)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def server_unavailable(name: str) -> str | None:
    """Why server ``name`` cannot run in this environment, or None when it can."""
    if name not in SERVERS:
        return f"unknown server {name!r}; known: {', '.join(SERVERS)}"
    module = {"moto": "moto", "localbucket": "localbucket"}[name]
    if importlib.util.find_spec(module) is None:
        return f"{name} is not installed in this environment (`make bench-peers` installs it into .venv-peers)"
    return None


def make_server(name: str, workdir: Path, env: Mapping[str, str]) -> SubprocessS3Server | LocalbucketServer:
    """Server ``name`` (not started), logging into ``workdir``, with ``env`` as its environment."""
    if name == "moto":
        tmp = workdir / "moto-tmp"
        tmp.mkdir(exist_ok=True)
        return SubprocessS3Server(workdir / "moto_server.log", env={**env, "TMPDIR": str(tmp)})
    if name == "localbucket":
        return LocalbucketServer(workdir / "localbucket-data", workdir / "localbucket.log", env=env)
    raise ValueError(f"unknown server {name!r}; known: {', '.join(SERVERS)}")


async def clear_prefix(admin: S3Client, server: Any, bucket: str, prefix: str) -> None:
    """Delete everything under ``prefix``: in batches on moto, key by key on localbucket
    (which has neither ``DeleteObjects`` nor ``ListMultipartUploads``)."""
    if not isinstance(server, LocalbucketServer):
        await empty_bucket(admin, bucket, prefix)
        return
    async for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            await admin.delete_object(Bucket=bucket, Key=item["Key"])
