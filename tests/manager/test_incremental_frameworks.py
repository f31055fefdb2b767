"""Incremental saves of PyTorch state, tree blobs and save_async, with in-place restore:
what counts as unchanged (bytes, the tree's leaves, the kind and dtype name), a frozen
part of a model reused and loaded back in place, all or nothing when the referenced
bytes are damaged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from asyncckpt import CheckpointCorruptedError, Retention  # noqa: E402
from tests.support.locations import RawStorages, manager  # noqa: E402

NODE = "trainer_0"
ELEMENTS = 32 << 10  # 256 KiB of float64: above the size from which blobs are reused


def bits(tensor: Any) -> bytes:
    flat = tensor.detach().reshape(-1).contiguous()
    return bytes(flat.view(torch.uint8).numpy())


class Net(torch.nn.Module):  # type: ignore[misc]
    """A frozen backbone (128 KiB of weights, no optimizer state) and a trained head."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = torch.nn.Linear(128, 256)
        self.head = torch.nn.Linear(256, 8)
        for param in self.backbone.parameters():
            param.requires_grad_(False)

    def forward(self, x: Any) -> Any:
        return self.head(torch.relu(self.backbone(x)))


def training(seed: int) -> tuple[Net, Any, dict[str, Any]]:
    model = Net(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optim, {"backbone": model.backbone, "head": model.head, "optim": optim}


def step(model: Net, optim: Any) -> None:
    loss = model(torch.randn(4, 128)).pow(2).mean()
    optim.zero_grad()
    loss.backward()
    optim.step()


def snapshot(model: Net, optim: Any) -> dict[str, Any]:
    """Every tensor's bytes of the model and the optimizer state, and the step counts."""
    out: dict[str, Any] = {name: bits(t) for name, t in model.state_dict().items()}
    for number, state in optim.state_dict()["state"].items():
        out.update({f"optim.{number}.{k}": bits(v) for k, v in state.items()})
    return out


async def test_a_frozen_backbone_is_reused_and_loads_in_place_bit_exact(
    location: Any, raw_storages: RawStorages
) -> None:
    model, optim, ws = training(seed=0)
    async with manager(location) as mgr:
        await mgr.init({NODE: ws})
        step(model, optim)
        await mgr.save(1)
        step(model, optim)
        await mgr.save(2)
        saved = await mgr.report_checkpoint_stats("checkpoint_save")
    assert not optim.state_dict()["state"].keys() & {0, 1}  # frozen: no optimizer state
    entries = (await raw_storages.read_manifest(location, 2))["nodes"][NODE]["blobs"]
    assert "ref" in entries["backbone"] and "ref" not in entries["head"] and "ref" not in entries["optim"]
    assert saved["reused_bytes"] == entries["backbone"]["length"] >= 256 * 128 * 4
    expected = snapshot(model, optim)

    fresh, fresh_optim, fresh_ws = training(seed=1)
    weight, head_weight = fresh.backbone.weight, fresh.head.weight
    pointer = weight.data_ptr()
    async with manager(location) as mgr:
        await mgr.init({NODE: fresh_ws})
        await mgr.load(2)
        loaded = await mgr.report_checkpoint_stats("checkpoint_load")
    assert snapshot(fresh, fresh_optim) == expected
    assert fresh.backbone.weight is weight and weight.data_ptr() == pointer and fresh.head.weight is head_weight
    assert mgr.workspace(NODE)["backbone"] is fresh.backbone
    assert loaded["bytes"] >= saved["bytes"] + saved["reused_bytes"]  # the referenced bytes are read too


async def test_damaged_referenced_bytes_roll_back_every_tensor(location: Any, raw_storages: RawStorages) -> None:
    model, optim, ws = training(seed=0)
    table = ws["table"] = torch.randn(1 << 15)  # a frozen tensor of its own, reused too
    async with manager(location) as mgr:
        await mgr.init({NODE: ws})
        step(model, optim)
        await mgr.save(1)
        step(model, optim)
        await mgr.save(2)
        record = (await raw_storages.read_manifest(location, 2))["nodes"][NODE]
        entry = record["blobs"]["backbone"]
        leaf = entry["leaves"][0]  # the weight, in epoch 1's shard
        async with raw_storages.open(location) as storage:
            key = record["refs"][entry["ref"]]["key"]
            data = bytearray(await storage.get(key))
            data[entry["offset"] + leaf["offset"] + leaf["length"] // 2] ^= 0x01
            await storage.put(key, bytes(data))
        step(model, optim)  # the head and the optimizer state move on...
        with torch.no_grad():
            model.backbone.weight.add_(1.0)  # ...and so do the backbone and the table, here
            table.add_(1.0)
        before = {**snapshot(model, optim), "table": bits(table)}
        with pytest.raises(
            CheckpointCorruptedError, match=r"epochs/000000000001/.*blob 'backbone': CRC32C mismatch in leaf 0"
        ):
            await mgr.load(2)
    assert "ref" in record["blobs"]["table"] and mgr.workspace(NODE)["table"] is table
    assert {**snapshot(model, optim), "table": bits(table)} == before  # the head (from epoch 2's shard) too


async def _second_save_reuses(location: Any, first: Any, second: Any) -> tuple[int, Any]:
    """Save blob "x" as ``first`` at epoch 1 and as ``second`` at epoch 2: the bytes the
    second save reused, and "x" as epoch 2 loads."""
    async with manager(location) as mgr:
        await mgr.init({NODE: {"x": first}})
        await mgr.save(1)
        mgr.workspace(NODE)["x"] = second
        await mgr.save(2)
        reused = (await mgr.report_checkpoint_stats("checkpoint_save"))["reused_bytes"]
    async with manager(location) as mgr:
        await mgr.init({NODE: {}})
        await mgr.load(2)
        return reused, mgr.workspace(NODE)["x"]


def _random(dtype: Any = np.float64) -> np.ndarray[Any, Any]:
    return np.random.default_rng(0).standard_normal(ELEMENTS).astype(dtype)


@pytest.mark.parametrize(
    ("first", "second", "reused"),
    [
        (lambda: torch.from_numpy(_random()), lambda t: t.clone(), True),
        (lambda: _random(), lambda a: torch.from_numpy(a.copy()), False),  # same bytes, another kind
        (lambda: torch.from_numpy(_random(np.float16)), lambda t: t.view(torch.bfloat16), False),  # another dtype
        (lambda: {"w": _random(), "step": 1}, lambda d: {"w": d["w"].copy(), "step": 1}, True),  # a tree
        (lambda: {"w": _random(), "step": 1}, lambda d: {"w": d["w"], "step": 2}, True),  # its skeleton: the leaf
        (lambda: {"w": _random(), "step": 1}, lambda d: {"w": d["w"].astype(np.float32), "step": 1}, False),  # dtype
        (lambda: {"w": _random(), "step": 1}, lambda d: {"w": d["w"].reshape(-1, 2), "step": 1}, False),  # a leaf's
    ],
    ids=["tensor", "numpy-then-torch", "f16-then-bf16", "tree", "tree-skeleton", "tree-leaf-dtype", "tree-leaf-shape"],
)
async def test_unchanged_means_the_same_bytes_kind_dtype_and_tree_layout(
    location: Any, first: Any, second: Any, reused: bool
) -> None:
    value = first()
    new = second(value)
    got_reused, loaded = await _second_save_reuses(location, value, new)
    assert (got_reused > 0) is reused, got_reused
    if isinstance(new, dict):
        assert loaded["step"] == new["step"] and loaded["w"].shape == new["w"].shape
        assert loaded["w"].tobytes() == new["w"].tobytes()
    else:
        assert type(loaded) is type(new) and loaded.dtype == new.dtype
        assert (bits(loaded) if torch.is_tensor(loaded) else loaded.tobytes()) == (
            bits(new) if torch.is_tensor(new) else new.tobytes()
        )


async def test_save_async_fingerprints_the_staged_copy_it_writes(location: Any) -> None:
    frozen, original = _random(), _random().copy()
    async with manager(location) as mgr:
        await mgr.init({NODE: {"w": frozen}})
        handle = await mgr.save_async(1)
        frozen[0] += 1.0  # the caller moves on while the upload runs: epoch 1 holds the staged bytes
        await handle
        await mgr.save(2)  # these bytes differ from epoch 1's: uploaded again
        assert (await mgr.report_checkpoint_stats("checkpoint_save"))["reused_bytes"] == 0
        handle = await mgr.save_async(3)
        await handle
        assert (await mgr.report_checkpoint_stats("checkpoint_save"))["reused_bytes"] == ELEMENTS * 8
    for epoch, expected in ((1, original), (2, frozen), (3, frozen)):
        async with manager(location) as mgr:
            await mgr.init({NODE: {}})
            await mgr.load(epoch)
            assert mgr.workspace(NODE)["w"].tobytes() == expected.tobytes(), epoch


async def test_a_partial_load_of_reused_bytes_fills_the_session_tensor_in_place(location: Any) -> None:
    table = torch.randn(1 << 15)
    async with manager(location) as mgr:
        await mgr.init({NODE: {"table": table, "step": 1}})
        await mgr.save(1)
        mgr.workspace(NODE)["step"] = 2
        await mgr.save(2)
        assert (await mgr.report_checkpoint_stats("checkpoint_save"))["reused_bytes"] == table.numel() * 4
        target = torch.zeros(1 << 15)
        session: dict[str, Any] = {"table": target}
        assert await mgr.load_blobs_locally([NODE], ["table", "step"], 2, session)
    assert session["table"] is target and bits(target) == bits(table) and session["step"] == 2


# --------------------------------------------------------------------------- reuse per leaf


def one_entry(seed: int) -> tuple[Net, Any, dict[str, Any]]:
    """The model as one workspace entry (one tree blob whose backbone is frozen) and its optimizer."""
    model, optim, _ = training(seed)
    return model, optim, {"model": model, "optim": optim}


def model_entry(raw: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The record of NODE in an epoch's ``raw`` manifest and its "model" blob's leaves."""
    record = raw["nodes"][NODE]
    return record, record["blobs"]["model"]["leaves"]


BACKBONE_BYTES = 256 * 128 * 4  # the backbone's weight: the one leaf of the model of at least 64 KiB


async def test_a_frozen_backbone_inside_one_model_entry_is_reused_per_leaf_and_loads_in_place(
    location: Any, raw_storages: RawStorages
) -> None:
    model, optim, ws = one_entry(seed=0)
    async with manager(location) as mgr:
        await mgr.init({NODE: ws})
        step(model, optim)
        await mgr.save(1)
        first = await mgr.report_checkpoint_stats("checkpoint_save")
        step(model, optim)  # the head, its small bias inline in the skeleton, and the optimizer move on
        await mgr.save(2)
        saved = await mgr.report_checkpoint_stats("checkpoint_save")
    raw = await raw_storages.read_manifest(location, 2)
    record, leaves = model_entry(raw)
    assert raw["version"] == 4 and record["leaf_refs"] is True and "ref" not in record["blobs"]["model"]
    (reused,) = [leaf for leaf in leaves if "ref" in leaf]
    assert reused["length"] == BACKBONE_BYTES and record["refs"][reused["ref"]]["key"].startswith(
        "epochs/000000000001/"
    )
    assert saved["reused_bytes"] >= BACKBONE_BYTES
    assert saved["bytes"] <= first["bytes"] - BACKBONE_BYTES + 4096  # the head, the optimizer, the skeletons
    expected = snapshot(model, optim)

    fresh, fresh_optim, fresh_ws = one_entry(seed=1)
    weight, head_weight = fresh.backbone.weight, fresh.head.weight
    pointer = weight.data_ptr()
    async with manager(location) as mgr:
        await mgr.init({NODE: fresh_ws})
        await mgr.load(2)
        loaded = await mgr.report_checkpoint_stats("checkpoint_load")
        session: dict[str, Any] = {}
        assert await mgr.load_blobs_locally([NODE], ["model"], 2, session)  # a partial load follows the leaf too
    assert snapshot(fresh, fresh_optim) == expected
    assert fresh.backbone.weight is weight and weight.data_ptr() == pointer and fresh.head.weight is head_weight
    assert mgr.workspace(NODE)["model"] is fresh
    assert loaded["bytes"] >= saved["bytes"] + saved["reused_bytes"]  # the referenced bytes are read too
    assert {name: bits(t) for name, t in session["model"].items()} == {
        name: bits(t) for name, t in model.state_dict().items()
    }


async def test_damaged_bytes_of_a_reused_leaf_name_the_object_and_roll_back_every_tensor(
    location: Any, raw_storages: RawStorages
) -> None:
    model, optim, ws = one_entry(seed=0)
    async with manager(location) as mgr:
        await mgr.init({NODE: ws})
        step(model, optim)
        await mgr.save(1)
        step(model, optim)
        await mgr.save(2)
        record, leaves = model_entry(await raw_storages.read_manifest(location, 2))
        number, leaf = next((n, leaf) for n, leaf in enumerate(leaves) if "ref" in leaf)
        async with raw_storages.open(location) as storage:
            key = record["refs"][leaf["ref"]]["key"]
            data = bytearray(await storage.get(key))
            data[leaf["offset"] + leaf["length"] // 2] ^= 0x01  # an absolute offset in epoch 1's shard
            await storage.put(key, bytes(data))
        step(model, optim)  # the head and the optimizer state move on...
        with torch.no_grad():
            model.backbone.weight.add_(1.0)  # ...and so does the backbone, here
        before = snapshot(model, optim)
        with pytest.raises(
            CheckpointCorruptedError, match=rf"epochs/000000000001/.*blob 'model': CRC32C mismatch in leaf {number}"
        ):
            await mgr.load(2)
    assert snapshot(model, optim) == before  # the head and the optimizer (from epoch 2's shard) too


async def test_keep_last_1_keeps_the_objects_leaves_point_at(location: Any, raw_storages: RawStorages) -> None:
    model, optim, ws = one_entry(seed=0)
    async with manager(location, retention=Retention(keep_last=1)) as mgr:
        await mgr.init({NODE: ws})
        for epoch in range(1, 5):
            step(model, optim)
            await mgr.save(epoch)
            assert await mgr.committed_epochs() == [epoch]
            report = await mgr.gc(grace_period=0)
            assert report.deleted == [] and report.kept_referenced == int(epoch > 1)  # epoch 1's shard
            record, leaves = model_entry(await raw_storages.read_manifest(location, epoch))
            refs = [record["refs"][leaf["ref"]]["key"] for leaf in leaves if "ref" in leaf]
            assert refs == ([] if epoch == 1 else [record["refs"][0]["key"]])
            assert all(key.startswith("epochs/000000000001/") for key in refs)  # one level deep
            expected = snapshot(model, optim)
            fresh, fresh_optim, fresh_ws = one_entry(seed=epoch + 10)
            async with manager(location) as loader:
                await loader.init({NODE: fresh_ws})
                await loader.load(epoch)
            assert snapshot(fresh, fresh_optim) == expected, epoch


async def test_changing_one_element_of_a_frozen_leaf_uploads_that_leaf_only(location: Any) -> None:
    first = {"a": torch.from_numpy(_random()), "b": torch.from_numpy(_random(np.float32)), "step": 1}
    second = {"a": first["a"].clone(), "b": first["b"], "step": 1}
    second["a"][7] += 1.0
    reused, loaded = await _second_save_reuses(location, first, second)
    assert reused == ELEMENTS * 4  # "b" only
    assert bits(loaded["a"]) == bits(second["a"]) and bits(loaded["b"]) == bits(second["b"])
