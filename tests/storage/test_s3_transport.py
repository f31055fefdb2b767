"""The S3 backend's transport: what it sets up per client and how it sends bodies."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from asyncckpt.storage import S3Storage
from asyncckpt.testing.s3_server import REGION, admin_client, delete_bucket, new_bucket_name


@pytest.fixture
def ca_bundle_loads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every CA bundle an SSL context loads (what building one for a client costs)."""
    loads: list[object] = []
    original = ssl.SSLContext.load_verify_locations

    def spy(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(args or kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", spy)
    return loads


@pytest.mark.parametrize(("verify", "builds_tls"), [(None, False), (True, True)])
async def test_an_http_endpoint_builds_no_tls_context_unless_asked(
    s3_endpoint: str, s3_admin_session: Any, ca_bundle_loads: list[object], verify: bool | None, builds_tls: bool
) -> None:
    assert s3_endpoint.startswith("http://")
    options: dict[str, Any] = {"endpoint_url": s3_endpoint, "region_name": REGION, "addressing_style": "path"}
    if verify is not None:
        options["verify"] = verify
    async with admin_client(s3_admin_session, s3_endpoint) as client:
        bucket = new_bucket_name()
        await client.create_bucket(Bucket=bucket)
        try:
            ca_bundle_loads.clear()
            async with S3Storage(bucket, options=options) as storage:
                await storage.put("k", b"v")
                assert await storage.get("k") == b"v"
            assert bool(ca_bundle_loads) is builds_tls
        finally:
            await delete_bucket(client, bucket)
