"""Test-side S3 administration: raw aioboto3 clients, fresh buckets, cleanup.

Used by ``conftest.py`` and by tests that arrange or inspect a bucket behind the back
of the storage under test. Not part of asyncckpt.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
from aiobotocore.config import AioConfig

REGION = "us-east-1"

__all__ = ["REGION", "admin_client", "delete_bucket", "empty_bucket", "new_bucket_name"]


def new_bucket_name() -> str:
    """A fresh, valid, lowercase bucket name."""
    return f"test-{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def admin_client(session: aioboto3.Session, endpoint: str) -> AsyncIterator[Any]:
    """A plain S3 client on ``endpoint`` (path addressing, no extra checksums, 2 attempts)."""
    config = AioConfig(
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "total_max_attempts": 2},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    async with session.client("s3", endpoint_url=endpoint, region_name=REGION, config=config) as client:
        yield client


async def empty_bucket(client: Any, bucket: str, prefix: str = "") -> None:
    """Abort the multipart uploads and delete the objects under ``prefix``."""
    async for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            with contextlib.suppress(client.exceptions.NoSuchUpload):
                await client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    async for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if objects:
            await client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})


async def delete_bucket(client: Any, bucket: str) -> None:
    """Empty ``bucket`` and delete it."""
    await empty_bucket(client, bucket)
    await client.delete_bucket(Bucket=bucket)
