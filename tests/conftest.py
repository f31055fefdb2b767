"""Shared fixtures: an isolated AWS environment, an S3 endpoint, fresh buckets, locations.

The S3 endpoint is moto's threaded server on an ephemeral loopback port
(:class:`asyncckpt.testing.s3_server.ThreadedS3Server`), unless
``ASYNCCKPT_TEST_S3_ENDPOINT`` names an external one (MinIO, a ``moto_server`` started
by CI...); its credentials then come from ``ASYNCCKPT_TEST_AWS_ACCESS_KEY_ID`` and
``ASYNCCKPT_TEST_AWS_SECRET_ACCESS_KEY`` (default ``testing``/``testing``).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import pytest

from asyncckpt.storage import drop_memory_store
from asyncckpt.testing.s3_server import REGION, ThreadedS3Server, admin_client, delete_bucket, new_bucket_name

EXTERNAL_ENDPOINT_VAR = "ASYNCCKPT_TEST_S3_ENDPOINT"

# Variables that could point a test at real AWS or at a developer's own profile.
_AWS_VARS_TO_REMOVE = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CA_BUNDLE",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


@pytest.fixture(scope="session", autouse=True)
def aws_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Dummy credentials, no profile, no config files, no endpoint overrides, no IMDS."""
    nowhere = tmp_path_factory.mktemp("aws-isolated")
    external = bool(os.environ.get(EXTERNAL_ENDPOINT_VAR))
    with pytest.MonkeyPatch.context() as mp:
        for name in _AWS_VARS_TO_REMOVE:
            mp.delenv(name, raising=False)
        for name in list(os.environ):
            if name.startswith("AWS_ENDPOINT_URL") or name == "AWS_USE_FIPS_ENDPOINT":
                mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(nowhere / "no-such-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere / "no-such-credentials"))
        key_id = os.environ.get("ASYNCCKPT_TEST_AWS_ACCESS_KEY_ID") if external else None
        secret = os.environ.get("ASYNCCKPT_TEST_AWS_SECRET_ACCESS_KEY") if external else None
        mp.setenv("AWS_ACCESS_KEY_ID", key_id or "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", secret or "testing")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="session")
def s3_endpoint(aws_environment: None) -> Iterator[str]:
    """The URL of an S3-compatible endpoint for the whole session."""
    external = os.environ.get(EXTERNAL_ENDPOINT_VAR)
    if external:
        yield external
        return
    with ThreadedS3Server() as server:
        yield server.endpoint_url


@pytest.fixture
def s3_options(s3_endpoint: str) -> dict[str, Any]:
    """``storage_options`` for an :class:`~asyncckpt.storage.S3Storage` on the test endpoint."""
    return {"endpoint_url": s3_endpoint, "region_name": REGION, "addressing_style": "path"}


@pytest.fixture(scope="session")
def s3_admin_session(aws_environment: None) -> aioboto3.Session:
    """One aioboto3 session for test-side S3 clients (it caches botocore's service models)."""
    return aioboto3.Session()


@pytest.fixture
async def s3_client(s3_endpoint: str, s3_admin_session: aioboto3.Session) -> AsyncIterator[Any]:
    """A raw aioboto3 S3 client for arranging and inspecting buckets behind a test's back."""
    async with admin_client(s3_admin_session, s3_endpoint) as client:
        yield client


@pytest.fixture
async def s3_bucket(s3_client: Any) -> AsyncIterator[str]:
    """A fresh, empty bucket; emptied and deleted (best effort) after the test."""
    name = new_bucket_name()
    await s3_client.create_bucket(Bucket=name)
    yield name
    try:
        await delete_bucket(s3_client, name)
    except Exception as exc:  # best effort: a leftover bucket must not fail the test
        logging.getLogger(__name__).warning("could not delete test bucket %s: %s", name, exc)


@dataclass(frozen=True)
class Location:
    """Where a test stores checkpoints: a URL, its kind and its ``storage_options``."""

    url: str
    kind: str
    options: dict[str, Any] | None = None  # ``storage_options`` (None unless kind is "s3")


@pytest.fixture(params=["memory", "file", "s3"])
def location_kind(request: pytest.FixtureRequest) -> str:
    """The kinds :func:`location` runs a test with; narrow it with
    ``@pytest.mark.parametrize("location_kind", ["s3"])``."""
    return request.param


@pytest.fixture
def location(location_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Location]:
    """A fresh, empty checkpoint location of each kind (memory, file, s3).

    The S3 one is ``s3://<fresh bucket>/some/prefix`` on the test endpoint; the bucket
    (and the moto server) are only set up for the s3 parameter.
    """
    if location_kind == "memory":
        name = f"test-{uuid.uuid4().hex[:12]}"
        try:
            yield Location(f"memory://{name}", "memory")
        finally:
            drop_memory_store(name)
    elif location_kind == "file":
        yield Location((tmp_path / "ckpt").as_uri(), "file")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        options = request.getfixturevalue("s3_options")
        yield Location(f"s3://{bucket}/some/prefix", "s3", options)
