"""Fixtures of the manager tests: raw access to a location, and more locations of its kind."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aioboto3
import pytest

from asyncckpt.storage import drop_memory_store
from tests.support.locations import RawStorages


@pytest.fixture
async def raw_storages(s3_admin_session: aioboto3.Session) -> AsyncIterator[RawStorages]:
    """The raw byte stores of the locations a test touches, closed when the test ends."""
    storages = RawStorages(s3_admin_session)
    try:
        yield storages
    finally:
        await storages.close()


@pytest.fixture
def sibling(location: Any, tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """Makes more empty locations of the same kind as ``location`` (``make(name)``)."""
    stores: list[str] = []

    def make(name: str) -> Any:
        if location.kind == "memory":
            store = f"{urlsplit(location.url).netloc}-{name}"
            stores.append(store)
            return dataclasses.replace(location, url=f"memory://{store}")
        if location.kind == "file":
            return dataclasses.replace(location, url=(tmp_path / name).as_uri())
        return dataclasses.replace(location, url=f"s3://{urlsplit(location.url).netloc}/{name}")

    yield make
    for store in stores:
        drop_memory_store(store)
