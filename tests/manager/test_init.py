"""Bad arguments get a clear error naming the problem, before any I/O or write."""

from __future__ import annotations

import pytest

from asyncckpt import MultiNodeCheckpointManager, TransferConfig
from asyncckpt.storage import drop_memory_store, storage_for


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://Bad_Bucket/x", "invalid S3 bucket name"),
        ("gs://bucket/x", "unsupported location scheme"),
        ("", "non-empty"),
        ("memory://", "store name"),
        ("file://otherhost/dir", "names a host"),
    ],
)
def test_a_malformed_location_is_refused_when_the_manager_is_built(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        MultiNodeCheckpointManager(url)


def test_an_unknown_db_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown db_type 'minidb'"):
        MultiNodeCheckpointManager("memory://bad-db-type", "minidb")


def test_unknown_storage_options_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        MultiNodeCheckpointManager("s3://bucket/x", storage_options={"endpoint": "http://127.0.0.1:1"})
    with pytest.raises(ValueError, match="do not apply"):
        MultiNodeCheckpointManager("memory://opts", storage_options={"endpoint_url": "http://127.0.0.1:1"})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"part_size": 1024},
        {"max_concurrency": 0},
        {"max_bytes_in_flight": 1},
        {"checksum_mode": "always"},
        {"retry_mode": "eager"},
        {"read_timeout": 0},
        {"commit_timeout": -1},
    ],
)
def test_invalid_transfer_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="TransferConfig"):
        TransferConfig(**kwargs)  # type: ignore[arg-type]


def test_a_config_of_the_wrong_type_and_a_bad_run_id_are_refused() -> None:
    with pytest.raises(TypeError, match="TransferConfig"):
        MultiNodeCheckpointManager("memory://cfg", config={"part_size": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="run id"):
        MultiNodeCheckpointManager("memory://cfg", run_id="has/slash")


async def test_unknown_path_type_and_malformed_path_prefix_are_refused_and_nothing_is_written() -> None:
    url = "memory://bad-path-type"
    try:
        async with MultiNodeCheckpointManager(url) as mgr:
            with pytest.raises(ValueError, match="unknown path_type 'hdfs'"):
                await mgr.init(["trainer_0"], path_type="hdfs")
            with pytest.raises(ValueError, match="no bucket"):
                mgr.set_params(["trainer_0"], path_prefix="s3://")
            with pytest.raises(ValueError, match="path_type says"):
                mgr.set_params(["trainer_0"], path_prefix="s3://bucket/x", path_type="file")
            with pytest.raises(ValueError, match="not among the job's nodes"):
                await mgr.init(["trainer_0"], local_nodes=["trainer_9"])
        storage = storage_for(url)
        assert [info.key async for info in storage.list()] == []
    finally:
        drop_memory_store("bad-path-type")


async def test_load_blobs_locally_refuses_a_single_string_of_names() -> None:
    async with MultiNodeCheckpointManager("memory://names") as mgr:
        with pytest.raises(TypeError, match="sequence of blob names"):
            await mgr.load_blobs_locally(["trainer_0"], "total", 1, {})
    drop_memory_store("names")
