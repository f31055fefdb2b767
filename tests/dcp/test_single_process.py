"""The DCP plugin in one process (no process group) on every backend: memory, file, s3."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import threading
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner  # noqa: E402

from asyncckpt.dcp import StorageReader, StorageWriter, StoredItem, _writer  # noqa: E402
from asyncckpt.dcp._format import METADATA_KEY, decode_metadata, encode_metadata  # noqa: E402
from asyncckpt.dcp._reader import _batches  # noqa: E402
from asyncckpt.errors import (  # noqa: E402
    CheckpointConflictError,
    CheckpointCorruptedError,
    CheckpointNotFoundError,
)
from asyncckpt.storage import Storage  # noqa: E402

from .conftest import object_keys, on_storage  # noqa: E402
from .states import assert_bit_exact, blank_like, training_state  # noqa: E402

# DCP warns that it saves "in a single process" whenever no process group is initialised
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def writer(location: Any, url: str | None = None) -> StorageWriter:
    return StorageWriter(url or location.url, storage_options=location.options)


def reader(location: Any, url: str | None = None) -> StorageReader:
    return StorageReader(url or location.url, storage_options=location.options)


def loaded(location: Any, like: dict[str, Any]) -> dict[str, Any]:
    state = blank_like(like)
    dcp.load(state, storage_reader=reader(location))
    return state


def failure_of(excinfo: pytest.ExceptionInfo[CheckpointException]) -> BaseException:
    """The one rank's error inside DCP's CheckpointException."""
    (cause, _trace), *others = excinfo.value.failures.values()
    assert not others
    return cause


def session_threads() -> set[threading.Thread]:
    """The plugins' loop threads alive now (those of other tests' garbage included)."""
    return {thread for thread in threading.enumerate() if thread.name == "asyncckpt-dcp"}


def test_save_then_load_is_bit_exact(location: Any) -> None:
    state = training_state(seed=1)
    threads = session_threads()
    dcp.save(state, storage_writer=writer(location))
    assert_bit_exact(loaded(location, state), state)
    keys = object_keys(location)
    assert METADATA_KEY in keys and all(k == METADATA_KEY or k.startswith("data/") for k in keys), keys
    assert session_threads() <= threads  # each plugin closed its storage at the end of its call


def test_load_writes_into_the_state_dicts_tensors(location: Any) -> None:
    model = torch.nn.Linear(4, 3)
    dcp.save({"model": model.state_dict()}, storage_writer=writer(location))
    other = torch.nn.Linear(4, 3)
    weight = other.weight
    target = {"model": other.state_dict()}
    dcp.load(target, storage_reader=reader(location))
    assert other.weight is weight and torch.equal(other.weight, model.weight)


def test_async_save_then_load(location: Any) -> None:
    state = training_state(seed=2)
    threads = session_threads()
    future = dcp.async_save(state, storage_writer=writer(location))
    future.result(timeout=60)
    assert_bit_exact(loaded(location, state), state)
    assert session_threads() <= threads


def test_a_second_save_to_a_committed_location_conflicts_and_the_checkpoint_still_loads(location: Any) -> None:
    first, second = training_state(seed=3), training_state(seed=4)
    dcp.save(first, storage_writer=writer(location))
    before = object_keys(location)
    with pytest.raises(CheckpointException) as excinfo:
        dcp.save(second, storage_writer=writer(location))
    assert isinstance(failure_of(excinfo), CheckpointConflictError)
    assert "already committed" in str(failure_of(excinfo))
    assert object_keys(location) == before  # refused before any data was written
    assert_bit_exact(loaded(location, first), first)


class _RacedWriter(StorageWriter):
    """A writer that lets another save commit at its location after its early check."""

    def __init__(self, location: Any, rival: dict[str, Any]):
        super().__init__(location.url, storage_options=location.options)
        self.location, self.rival = location, rival

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        plans = super().prepare_global_plan(plans)
        dcp.save(self.rival, storage_writer=writer(self.location))
        return plans


def test_a_save_that_loses_the_race_for_the_metadata_conflicts_and_removes_its_data(location: Any) -> None:
    mine, rival = training_state(seed=5), training_state(seed=6)
    with pytest.raises(CheckpointException) as excinfo:
        dcp.save(mine, storage_writer=_RacedWriter(location, rival))
    assert isinstance(failure_of(excinfo), CheckpointConflictError)
    assert "another save committed" in str(failure_of(excinfo))
    assert_bit_exact(loaded(location, rival), rival)
    metadata = reader(location).read_metadata()
    assert set(object_keys(location)) == {METADATA_KEY} | {item.key for item in metadata.storage_data.values()}


def test_a_corrupted_data_byte_is_detected_on_load(location: Any) -> None:
    state = training_state(seed=7)
    dcp.save(state, storage_writer=writer(location))
    metadata = reader(location).read_metadata()
    index, item = next((i, s) for i, s in metadata.storage_data.items() if i.fqn == "model.0.weight")

    async def flip(storage: Storage) -> None:
        data = bytearray(await storage.get(item.key))
        data[item.offset + 5] ^= 0x01
        await storage.put(item.key, data)

    on_storage(location, flip)
    with pytest.raises(CheckpointException) as excinfo:
        loaded(location, state)
    error = failure_of(excinfo)
    assert isinstance(error, CheckpointCorruptedError)
    assert "CRC32C mismatch" in str(error) and item.key in str(error) and "'model.0.weight'" in str(error)


def test_a_truncated_data_object_is_corrupted(location: Any) -> None:
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    dcp.save(state, storage_writer=writer(location))
    (item,) = reader(location).read_metadata().storage_data.values()

    async def truncate(storage: Storage) -> None:
        await storage.put(item.key, (await storage.get(item.key))[:100])

    on_storage(location, truncate)
    with pytest.raises(CheckpointException) as excinfo:
        dcp.load(blank_like(state), storage_reader=reader(location))
    assert isinstance(failure_of(excinfo), CheckpointCorruptedError)
    assert "truncated" in str(failure_of(excinfo))


def test_reading_metadata_where_nothing_is_committed_is_not_found(location: Any) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no DCP checkpoint is committed"):
        reader(location).read_metadata()


def test_reset_retargets_the_plugins(location: Any) -> None:
    state = {"w": torch.arange(6)}
    plugin = writer(location, location.url + "/unused")
    dcp.save(state, checkpoint_id=location.url + "/step-1", storage_writer=plugin)  # DCP calls reset(checkpoint_id)
    assert plugin.checkpoint_id == location.url + "/step-1"
    target = {"w": torch.zeros(6, dtype=torch.int64)}
    dcp.load(target, checkpoint_id=location.url + "/step-1", storage_reader=reader(location, location.url + "/nope"))
    assert torch.equal(target["w"], state["w"])
    assert not any(key.startswith("unused/") for key in object_keys(location))


@pytest.mark.parametrize("location_kind", ["memory"])
def test_metadata_damage_and_foreign_classes_are_refused(location: Any) -> None:
    dcp.save({"w": torch.arange(3)}, storage_writer=writer(location))
    data = on_storage(location, lambda storage: storage.get(METADATA_KEY))
    assert decode_metadata(data, "here").storage_data
    flipped = bytearray(data)
    flipped[-3] ^= 0x10
    with pytest.raises(CheckpointCorruptedError, match="metadata CRC32C mismatch"):
        decode_metadata(bytes(flipped), "here")
    # a metadata object naming any other callable is refused before it is called
    evil = encode_metadata(_CallsPrint())  # type: ignore[arg-type]
    with pytest.raises(CheckpointCorruptedError, match="does not name builtins.print"):
        decode_metadata(evil, "here")


class _CallsPrint:
    def __reduce__(self) -> Any:
        return (print, ("unpickling ran code",))


def test_plugins_validate_locations_and_pickle_without_their_session(tmp_path: Any) -> None:
    assert StorageWriter.validate_checkpoint_id("s3://bucket/run/step-1")
    assert StorageReader.validate_checkpoint_id(tmp_path / "step-1")
    assert not StorageWriter.validate_checkpoint_id("gs://bucket/x")
    assert not StorageWriter.validate_checkpoint_id(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsupported location scheme"):
        StorageWriter("gs://bucket/x")
    with pytest.raises(ValueError, match="do not apply"):
        StorageReader(tmp_path, storage_options={"endpoint_url": "http://127.0.0.1:1"})
    threads = session_threads()
    plugin = StorageWriter(tmp_path / "step-2")
    dcp.save({"w": torch.arange(4)}, storage_writer=plugin)
    clone = pickle.loads(pickle.dumps(plugin))
    assert clone.checkpoint_id == plugin.checkpoint_id == (tmp_path / "step-2").as_uri()
    with StorageReader(tmp_path / "step-2") as plugin_reader:
        assert set(plugin_reader.read_metadata().state_dict_metadata) == {"w"}
    assert session_threads() <= threads


def test_byte_items_round_trip_through_their_bytes(location: Any) -> None:
    blob = io.BytesIO(b"\x00raw bytes\xff")
    state = {"blob": blob, "nested": {"tuple": (1, "two")}}
    dcp.save(state, storage_writer=writer(location))
    target: dict[str, Any] = {"blob": io.BytesIO(), "nested": {"tuple": None}}
    dcp.load(target, storage_reader=reader(location))
    assert target["blob"].getvalue() == b"\x00raw bytes\xff"
    assert target["nested"] == {"tuple": (1, "two")}


def test_a_plugin_dropped_without_close_stops_its_thread(location: Any) -> None:
    dcp.save({"w": torch.arange(3)}, storage_writer=writer(location))
    threads = session_threads()
    plugin = reader(location)
    plugin.read_metadata()  # opens its session, which stays open: no load followed
    (thread,) = session_threads() - threads
    del plugin  # garbage: its session closes the storage and stops the thread
    assert not thread.is_alive()


class _FailingPlanner(DefaultSavePlanner):
    """Fails to resolve the item ``fqn`` (as a planner whose device copy fails would)."""

    def __init__(self, fqn: str):
        super().__init__()
        self.fqn = fqn

    def resolve_data(self, write_item: Any) -> Any:
        if write_item.index.fqn == self.fqn:
            raise RuntimeError(f"cannot resolve {self.fqn}")
        return super().resolve_data(write_item)


def test_a_save_that_fails_mid_write_removes_the_objects_it_wrote(
    location: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_writer, "_PARTS_PER_OBJECT", 0)  # every item in an object of its own
    state = {"a": torch.arange(10), "b": torch.arange(20), "c": torch.arange(30)}
    with pytest.raises(CheckpointException) as excinfo:
        dcp.save(state, storage_writer=writer(location), planner=_FailingPlanner("c"))
    assert "cannot resolve c" in str(failure_of(excinfo))
    assert object_keys(location) == []  # the objects of a and b were written, then removed


def test_items_in_several_objects_load_back(location: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_writer, "_PARTS_PER_OBJECT", 0)
    state = training_state(seed=8)
    dcp.save(state, storage_writer=writer(location))
    assert len(object_keys(location)) > 20
    assert_bit_exact(loaded(location, state), state)


def test_reads_join_near_items_and_stay_within_the_range_size() -> None:
    def item(offset: int, length: int, key: str = "k") -> Any:
        return (offset, StoredItem(key, offset, length, 0))

    wanted = [item(0, 10), item(64, 10), item(1000, 10), item(1064, 500), item(0, 5, "other")]
    batches = _batches(wanted, gap=100, size=500)  # type: ignore[arg-type]
    assert [(b.key, b.start, b.end, [r for r, _ in b.requests]) for b in batches] == [
        ("k", 0, 74, [0, 64]),  # 54 bytes apart: one read
        ("k", 1000, 1010, [1000]),  # far from the previous one
        ("k", 1064, 1564, [1064]),  # with the previous one, a read of 564 > 500 bytes
        ("other", 0, 5, [0]),
    ]


def test_only_importing_asyncckpt_dcp_imports_torch() -> None:
    probe = "import sys, asyncckpt, asyncckpt.storage; print('torch' in sys.modules); import asyncckpt.dcp; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["False", "True"]
