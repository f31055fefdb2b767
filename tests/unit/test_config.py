"""config: TransferConfig checks every value when it is built, and is immutable."""

from __future__ import annotations

import dataclasses

import pytest

from asyncckpt import MiB, TransferConfig


def test_the_defaults_are_valid_and_mib_is_two_to_the_twentieth() -> None:
    assert MiB == 1 << 20
    config = TransferConfig()
    assert config.part_size >= 5 * MiB
    assert config.max_bytes_in_flight >= config.part_size


def test_the_smallest_valid_settings_are_accepted() -> None:
    config = TransferConfig(
        max_concurrency=1,
        max_nodes_in_flight=1,
        max_attempts=1,
        part_size=5 * MiB,
        max_bytes_in_flight=5 * MiB,
        range_size=1,
        checksum_mode="when_supported",
        retry_mode="adaptive",
    )
    assert (config.part_size, config.max_bytes_in_flight) == (5 * MiB, 5 * MiB)


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


@pytest.mark.parametrize("name", ["max_concurrency", "max_nodes_in_flight", "max_attempts"])
@pytest.mark.parametrize("value", [True, 2.0, "4"])
def test_a_count_that_is_not_an_int_is_refused(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"TransferConfig.{name} must be a positive int"):
        TransferConfig(**{name: value})  # type: ignore[arg-type]


def test_a_config_is_frozen() -> None:
    config = TransferConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.part_size = 6 * MiB  # type: ignore[misc]
