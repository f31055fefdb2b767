"""A checkpoint location seen behind the manager's back: its raw objects and its manifests.

The tests of ``tests/manager/`` take the ``location`` fixture of ``tests/conftest.py``, so
each runs once per storage kind. What a test asserts about the stored objects is read
around the library where that is cheap (aioboto3 for S3, the directory for files) and
through the storage API otherwise (:class:`RawStorages`, the ``raw_storages`` fixture of
``tests/manager/conftest.py``); the manifest is read as plain JSON.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aioboto3
import msgpack
from aiobotocore.config import AioConfig

from asyncckpt import MultiNodeCheckpointManager, codec
from asyncckpt.storage import Storage, storage_for


def manager(location: Any, **kwargs: Any) -> MultiNodeCheckpointManager:
    """A manager of ``location`` with its ``storage_options``."""
    return MultiNodeCheckpointManager(location.url, storage_options=location.options, **kwargs)


def file_root(location: Any) -> Path:
    """The directory of a ``file://`` location."""
    return Path(unquote(urlsplit(location.url).path))


def key_below(location: Any, url: str) -> str:
    """The key of an object URL below ``location``."""
    root = location.url.rstrip("/") + "/"
    assert url.startswith(root), f"{url} is not below {root}"
    return url[len(root) :]


def plain_form(location: Any) -> str:
    """The location written without a scheme (what ``path_type`` is for)."""
    parts = urlsplit(location.url)
    if location.kind == "file":
        return unquote(parts.path)
    return f"{parts.netloc}{parts.path}"


class RawStorages:
    """Raw byte stores of the locations a test touches, each opened once (an S3 client
    costs about 0.1 s of CPU to create) and closed by :meth:`close` when the test ends.

    ``s3_session`` lists S3 buckets around the library (one session for the whole run:
    a new one costs 0.1 s of CPU to load its models).
    """

    def __init__(self, s3_session: aioboto3.Session) -> None:
        self.by_url: dict[str, Storage] = {}
        self.s3_session = s3_session

    async def get(self, location: Any) -> Storage:
        if location.url not in self.by_url:
            storage = storage_for(location.url, options=location.options)
            await storage.open()
            self.by_url[location.url] = storage
        return self.by_url[location.url]

    async def close(self) -> None:
        for storage in self.by_url.values():
            await storage.close()

    @contextlib.asynccontextmanager
    async def open(self, location: Any) -> AsyncIterator[Storage]:
        """The raw byte store at ``location``, for reading and damaging objects behind the manager."""
        yield await self.get(location)

    async def stored_keys(self, location: Any) -> list[str]:
        """Every object below the location's root, listed without the manager (for S3: every
        object in the bucket, which belongs to this one test)."""
        if location.kind == "s3":
            bucket = urlsplit(location.url).netloc
            config = AioConfig(s3={"addressing_style": "path"})
            options = location.options
            keys: list[str] = []
            async with self.s3_session.client(
                "s3", endpoint_url=options["endpoint_url"], region_name=options["region_name"], config=config
            ) as client:
                async for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    keys.extend(item["Key"] for item in page.get("Contents", []))
            return sorted(keys)
        if location.kind == "file":
            root = file_root(location)
            if not root.exists():
                return []
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        async with self.open(location) as storage:
            return [info.key async for info in storage.list()]

    async def read_manifest(self, location: Any, epoch: int) -> dict[str, Any]:
        """The committed manifest of ``epoch`` as plain JSON (DESIGN.md, "Layout"), with the
        records of its index under ``"nodes"`` and, in each, the blob index of its shard."""
        async with self.open(location) as storage:
            manifest = json.loads(await storage.get(f"epochs/{epoch:012d}/manifest.json"))
            index = json.loads(await storage.get(manifest["index"]["key"]))
            for node, record in index["nodes"].items():
                shard = await storage.get(record["shard"])
                offset, length, _ = codec.parse_trailer(shard[-codec.TRAILER_SIZE :], len(shard), node)
                record["blobs"] = msgpack.unpackb(shard[offset : offset + length])
            return {**manifest, "nodes": index["nodes"]}

    async def delete_object(self, location: Any, url: str) -> None:
        async with self.open(location) as storage:
            await storage.delete([key_below(location, url)])

    async def stored_keys_below(self, location: Any) -> list[str]:
        async with self.open(location) as storage:
            return [info.key async for info in storage.list()]

    async def copy_every_object(self, source: Any, target: Any) -> int:
        async with self.open(source) as src, self.open(target) as dst:
            keys = [info.key async for info in src.list()]
            for key in keys:
                await dst.put(key, await src.get(key))
        return len(keys)
