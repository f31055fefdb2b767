"""State dicts of the DCP tests and a bit-exact comparison (not a test module)."""

from __future__ import annotations

from typing import Any

import torch


def training_state(seed: int) -> dict[str, Any]:
    """A model + AdamW state after one step, with bf16, int, odd tensors and plain values."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 8)).sum().backward()
    optimizer.step()
    grid = torch.randn(6, 10, generator=torch.Generator().manual_seed(seed))
    return {
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "extra": {
            "bf16": torch.randn(33, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16),
            "ints": torch.arange(-5, 12, dtype=torch.int64) * (seed + 1),
            "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
            "bool": torch.tensor([True, False, True]),
            "f16": torch.tensor([1.5, -0.0, float("inf")], dtype=torch.float16),
            "f64": torch.tensor([float("nan"), -0.0, 1e300], dtype=torch.float64),
            "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
            "f8": torch.tensor([0.5, -2.0], dtype=torch.float8_e4m3fn),
            "u16": torch.tensor([0, 65535], dtype=torch.uint16),
            "scalar": torch.tensor(3.25),
            "empty": torch.empty(0, 4),
            "transposed": grid.T,  # not contiguous
            "slice": grid[2:4],  # a view into a larger storage
        },
        "step": 7 + seed,
        "name": f"run-{seed}",
        "history": [1.5, 2.5, {"lr": 0.1}],
    }


def blank_like(state: Any) -> Any:
    """A state of the same structure whose tensors are zero-filled (or ``False``) and whose
    plain values are ``None``: what a resumed process holds before loading."""
    if isinstance(state, torch.Tensor):
        return torch.zeros(state.shape, dtype=state.dtype)
    if isinstance(state, dict):
        return {key: blank_like(value) for key, value in state.items()}
    if isinstance(state, list):
        return [blank_like(value) for value in state]
    return None


def assert_bit_exact(actual: Any, expected: Any, path: str = "state") -> None:
    """Same structure, same plain values, tensors of the same dtype, shape and bytes."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual).__name__}"
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), path
        assert torch.equal(_bits(actual), _bits(expected)), f"{path}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), f"{path}: {actual!r}"
        for key in expected:
            assert_bit_exact(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{path}: {actual!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bit_exact(a, e, f"{path}[{i}]")
    else:
        assert actual == expected and type(actual) is type(expected), f"{path}: {actual!r} != {expected!r}"


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)
