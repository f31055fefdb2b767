"""PyTorch training state as it is: a model, its optimizer and scheduler (Stateful values),
RNG state and tensors save and load back bit-exact into the same objects, in place, all or
nothing, on S3, a directory and memory."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from asyncckpt import CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError, StorageError  # noqa: E402
from asyncckpt.codec import INLINE_MAX  # noqa: E402
from asyncckpt.manifest import read_index, read_manifest  # noqa: E402
from asyncckpt.restore import restore_workspaces  # noqa: E402
from asyncckpt.storage import storage_for  # noqa: E402
from asyncckpt.testing.wrappers import FaultyStorage  # noqa: E402
from tests.support.locations import RawStorages, key_below, manager  # noqa: E402

NODE = "trainer_0"


def make_training(seed: int = 0) -> tuple[Any, Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    model[2].to(torch.bfloat16)  # a bf16 layer too
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    return model, optim, sched


def train(model: Any, optim: Any, sched: Any, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(16, 32)
        hidden = model[1](model[0](x))
        loss = model[2](hidden.to(torch.bfloat16)).float().pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()


def bits(tensor: Any) -> bytes:
    flat = tensor.detach().reshape(-1).contiguous()
    return b"" if flat.numel() == 0 else bytes(flat.view(torch.uint8).numpy())


def frozen(value: Any) -> Any:
    """A deep, comparable copy of a state dict: tensors as (dtype, shape, bytes)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), bits(value))
    if isinstance(value, dict):
        return {k: frozen(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(frozen(v) for v in value)
    return copy.deepcopy(value)


def state_of(model: Any, optim: Any, sched: Any) -> dict[str, Any]:
    return {"model": frozen(model.state_dict()), "optim": frozen(optim.state_dict()), "sched": sched.state_dict()}


def live_tensors(model: Any, optim: Any) -> list[Any]:
    return [*model.parameters(), *(t for s in optim.state.values() for t in s.values() if torch.is_tensor(t))]


async def test_model_optimizer_scheduler_and_rng_load_back_bit_exact_into_the_same_objects(location: Any) -> None:
    model, optim, sched = make_training()
    train(model, optim, sched, 3)
    rng = torch.get_rng_state()
    ws: dict[str, Any] = {"model": model, "optim": optim, "sched": sched, "rng": rng, "step": 7}
    saved = state_of(model, optim, sched)
    saved_rng = bits(rng)
    async with manager(location) as mgr:
        await mgr.init({NODE: ws})
        await mgr.save(1)
        train(model, optim, sched, 3)  # training goes on: every tensor and the lr change
        rng.copy_(torch.get_rng_state())
        ws["step"] = 10
        assert state_of(model, optim, sched) != saved
        tensors = live_tensors(model, optim)
        pointers = [t.data_ptr() for t in tensors]

        await mgr.load(1)

    assert ws["model"] is model and ws["optim"] is optim and ws["sched"] is sched and ws["rng"] is rng
    assert state_of(model, optim, sched) == saved
    assert bits(rng) == saved_rng and ws["step"] == 7
    assert optim.param_groups[0]["lr"] == saved["optim"]["param_groups"][0]["lr"]
    restored = live_tensors(model, optim)
    assert len(restored) == len(tensors)
    for now_tensor, old_tensor, pointer in zip(restored, tensors, pointers):
        if isinstance(old_tensor, torch.nn.Parameter) or old_tensor.nbytes >= INLINE_MAX:  # restored in place
            assert now_tensor is old_tensor and now_tensor.data_ptr() == pointer

    # the loaded state trains on exactly as the saved one would have
    torch.set_rng_state(rng)
    twin_model, twin_optim, twin_sched = make_training(seed=1)
    twin_model.load_state_dict(model.state_dict())
    twin_optim.load_state_dict(copy.deepcopy(optim.state_dict()))
    twin_sched.load_state_dict(sched.state_dict())
    torch.manual_seed(5)
    train(model, optim, sched, 2)
    torch.manual_seed(5)
    train(twin_model, twin_optim, twin_sched, 2)
    assert state_of(model, optim, sched) == state_of(twin_model, twin_optim, twin_sched)


async def test_stateful_values_load_into_fresh_objects_and_optimizer_state_dict_alone_round_trips(
    location: Any,
) -> None:
    model, optim, sched = make_training()
    train(model, optim, sched, 2)
    optim_state = optim.state_dict()
    saved = state_of(model, optim, sched)
    async with manager(location) as mgr:
        await mgr.init({NODE: {"model": model, "optim": optim, "sched": sched, "opt_sd": optim_state}})
        await mgr.save(1)
    fresh_model, fresh_optim, fresh_sched = make_training(seed=3)  # no optimizer state yet
    ws: dict[str, Any] = {"model": fresh_model, "optim": fresh_optim, "sched": fresh_sched}
    async with manager(location) as mgr:
        await mgr.init({NODE: ws})
        await mgr.load(1)
    assert state_of(fresh_model, fresh_optim, fresh_sched) == saved
    loaded_sd = ws["opt_sd"]
    assert type(loaded_sd) is dict and list(loaded_sd["state"]) == list(optim_state["state"])  # int keys
    assert all(type(k) is int for k in loaded_sd["state"])
    assert frozen(loaded_sd) == frozen(optim_state)
    assert loaded_sd["param_groups"][0]["betas"] == optim_state["param_groups"][0]["betas"]  # a tuple


async def test_arrays_and_tensors_in_the_workspace_are_restored_in_place(location: Any) -> None:
    tensor = torch.arange(4096, dtype=torch.float32)
    strided = torch.arange(64 * 64, dtype=torch.bfloat16).reshape(64, 64).t()  # not C-contiguous
    array = np.arange(3000, dtype=np.int64)
    fortran = np.asfortranarray(np.arange(2000, dtype=np.float64).reshape(40, 50))
    ws: dict[str, Any] = {"t": tensor, "s": strided, "a": array, "f": fortran, "small": torch.ones(3)}
    expected = {k: bits(v) if torch.is_tensor(v) else v.copy() for k, v in ws.items()}
    async with manager(location) as mgr:
        await mgr.init({NODE: ws})
        await mgr.save(1)
        for value in ws.values():
            value[...] = 0
        before = dict(ws)
        await mgr.load(1)
    for key, value in ws.items():
        assert value is before[key], key
        if torch.is_tensor(value):
            assert bits(value) == expected[key], key
        else:
            assert np.array_equal(value, expected[key]), key


async def test_load_blobs_locally_gives_a_stateful_blob_as_its_state_dict_and_fills_session_tensors_in_place(
    location: Any,
) -> None:
    model, optim, sched = make_training()
    weights = torch.randn(128, 32)
    async with manager(location) as mgr:
        await mgr.init({NODE: {"model": model, "w": weights}})
        await mgr.save(1)
        target = torch.zeros(128, 32)
        session: dict[str, Any] = {"w": target}
        assert await mgr.load_blobs_locally([NODE], ["model", "w"], 1, session)
    assert session["w"] is target and bits(target) == bits(weights)
    assert type(session["model"]) is dict and frozen(session["model"]) == frozen(model.state_dict())


async def test_save_async_snapshots_nested_tensors_so_later_training_does_not_change_the_save(location: Any) -> None:
    model, optim, sched = make_training()
    train(model, optim, sched, 1)
    saved = state_of(model, optim, sched)
    ws: dict[str, Any] = {"model": model, "optim": optim, "raw": torch.arange(8192, dtype=torch.int32)}
    async with manager(location) as mgr:
        await mgr.init({NODE: ws})
        handle = await mgr.save_async(1)
        train(model, optim, sched, 2)  # mutates every parameter and moment in place
        ws["raw"].fill_(-1)
        await handle
        handle = await mgr.save_async(2)  # the second snapshot reuses the warm staging buffers
        await handle
        fresh_model, fresh_optim, _ = make_training(seed=9)
        fresh: dict[str, Any] = {"model": fresh_model, "optim": fresh_optim}
        async with manager(location) as reader:
            await reader.init({NODE: fresh})
            await reader.load(1)
    assert frozen(fresh_model.state_dict()) == saved["model"]
    assert frozen(fresh_optim.state_dict()) == saved["optim"]
    assert bits(fresh["raw"]) == bits(torch.arange(8192, dtype=torch.int32))


async def test_unsupported_tensor_is_type_error_naming_node_blob_and_type_before_any_write(
    location: Any, raw_storages: RawStorages
) -> None:
    async with manager(location) as mgr:
        await mgr.init({NODE: {"ok": torch.ones(2), "opt": {"state": {0: {"m": torch.ones(2).to_sparse()}}}}})
        with pytest.raises(TypeError) as info:
            await mgr.save(1)
    message = str(info.value)
    assert NODE in message and "opt['state'][0]['m']" in message and "torch.Tensor" in message
    assert await raw_storages.stored_keys(location) == []


# --------------------------------------------------------------------------- all or nothing


async def _saved_and_trained_on(location: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """A workspace saved at epoch 1 and trained on; returns (manager, workspace, its state now)."""
    model, optim, sched = make_training()
    train(model, optim, sched, 2)
    ws: dict[str, Any] = {"model": model, "optim": optim, "sched": sched, "w": torch.randn(4096), "n": 1}
    mgr = manager(location)
    await mgr.init({NODE: ws})
    await mgr.save(1)
    train(model, optim, sched, 2)
    ws["w"].mul_(2)
    ws["n"] = 2
    return mgr, ws, {**state_of(model, optim, sched), "w": bits(ws["w"]), "n": 2}


def now(ws: dict[str, Any]) -> dict[str, Any]:
    return {**state_of(ws["model"], ws["optim"], ws["sched"]), "w": bits(ws["w"]), "n": ws["n"]}


async def test_load_of_a_corrupted_leaf_leaves_every_tensor_with_its_old_bytes(
    location: Any, raw_storages: RawStorages
) -> None:
    mgr, ws, before = await _saved_and_trained_on(location)
    async with mgr:
        shard_url = mgr.get_ckpt_db_name(NODE, 1)
        assert shard_url is not None
        entry = (await raw_storages.read_manifest(location, 1))["nodes"][NODE]["blobs"]["model"]
        last = entry["leaves"][-1]
        async with raw_storages.open(location) as storage:
            key = key_below(location, shard_url)
            data = bytearray(await storage.get(key))
            data[entry["offset"] + last["offset"] + last["length"] // 2] ^= 0x01
            await storage.put(key, bytes(data))
        with pytest.raises(CheckpointCorruptedError, match="model"):
            await mgr.load(1)
    assert now(ws) == before


async def test_load_of_a_missing_shard_leaves_every_tensor_unchanged(location: Any, raw_storages: RawStorages) -> None:
    mgr, ws, before = await _saved_and_trained_on(location)
    async with mgr:
        shard_url = mgr.get_ckpt_db_name(NODE, 1)
        assert shard_url is not None
        await raw_storages.delete_object(location, shard_url)
        with pytest.raises(CheckpointNotFoundError):
            await mgr.load(1)
    assert now(ws) == before


@pytest.mark.parametrize(
    ("op", "skip", "after", "range_size"),
    [
        ("read_into", 0, False, None),  # the blob index: before any tensor is written
        ("read_scatter", 0, True, None),  # the shard's one data read, failing once it filled every tensor
        ("read_scatter", 0, False, 8 << 10),  # the first of several ranges read in parallel
        ("read_scatter", 3, True, 8 << 10),  # the fourth, once it filled its tensors
    ],
    ids=["index-read", "whole-scatter-read-after-writing", "first-range", "fourth-range-after-writing"],
)
async def test_storage_failing_mid_load_leaves_every_tensor_unchanged(
    location: Any, op: str, skip: int, after: bool, range_size: int | None
) -> None:
    mgr, ws, before = await _saved_and_trained_on(location)
    async with mgr:
        pass
    config = mgr.config if range_size is None else dataclasses.replace(mgr.config, range_size=range_size)
    async with storage_for(location.url, options=location.options) as inner:
        index = await read_index(inner, await read_manifest(inner, 1))
        faulty = FaultyStorage(inner)
        rule = faulty.fail_on(lambda o, key: o == op, StorageError, skip=skip, times=1, after=after)
        with pytest.raises(CheckpointError):
            await restore_workspaces(faulty, config, index, {NODE: ws})
        assert rule.hits == 1
    assert now(ws) == before


class Refusing:
    def state_dict(self) -> dict[str, Any]:
        return {"x": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise ValueError("refused")


async def test_a_failing_load_state_dict_is_named_and_rolls_back_every_tensor(location: Any) -> None:
    model, optim, sched = make_training()
    ws: dict[str, Any] = {"model": model, "optim": optim, "z_refusing": Refusing()}
    async with manager(location) as mgr:
        await mgr.init({NODE: ws})
        await mgr.save(1)
        train(model, optim, sched, 2)
        before = frozen(model.state_dict())
        with pytest.raises(CheckpointError, match="z_refusing.*load_state_dict failed.*refused"):
            await mgr.load(1)
    assert frozen(model.state_dict()) == before
