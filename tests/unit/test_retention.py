"""Retention: which committed epochs its rules keep (a pure function of the manifests)."""

from __future__ import annotations

import dataclasses

import pytest

from asyncckpt import EpochManifest, Retention

BASE = EpochManifest(0, "run0.0a1b2c", "epochs/000000000000/run0.0a1b2c/index.json", 10, 1, 2, 20)


def manifests(losses: dict[int, float | None]) -> list[EpochManifest]:
    """One manifest per epoch, with a "loss" metric unless it is None."""
    return [
        dataclasses.replace(BASE, epoch=epoch, metrics={} if loss is None else {"loss": loss})
        for epoch, loss in sorted(losses.items())
    ]


TWELVE = manifests({e: 1.0 / (1 + (e * 7) % 12) for e in range(12)})  # losses out of epoch order


def test_no_rule_keeps_everything() -> None:
    assert Retention().kept(TWELVE) == set(range(12))
    assert Retention().kept([]) == set()


def test_keep_last_keeps_the_newest_n() -> None:
    assert Retention(keep_last=3).kept(TWELVE) == {9, 10, 11}
    assert Retention(keep_last=50).kept(TWELVE) == set(range(12))


def test_keep_every_keeps_multiples_and_the_latest() -> None:
    assert Retention(keep_every=5).kept(TWELVE) == {0, 5, 10, 11}


@pytest.mark.parametrize(("mode", "best"), [("min", {5, 10}), ("max", {0, 7})])
def test_keep_best_keeps_the_k_best_values_of_the_metric_and_the_latest(mode: str, best: set[int]) -> None:
    ranked = sorted(TWELVE, key=lambda m: m.metrics["loss"], reverse=mode == "max")
    assert {m.epoch for m in ranked[:2]} == best  # the expectation, checked against the data
    assert Retention(keep_best=2, metric="loss", mode=mode).kept(TWELVE) == best | {11}


def test_epochs_without_the_metric_are_not_candidates_for_best() -> None:
    some = manifests({0: None, 1: 0.5, 2: None, 3: 0.9, 4: None})
    assert Retention(keep_best=1, metric="loss").kept(some) == {1, 4}
    assert Retention(keep_best=1, metric="accuracy").kept(some) == {4}


def test_ties_keep_the_earlier_epoch() -> None:
    tied = manifests({0: 0.5, 1: 0.5, 2: 0.5, 3: 0.9})
    assert Retention(keep_best=1, metric="loss").kept(tied) == {0, 3}


def test_an_epoch_is_kept_if_any_rule_keeps_it() -> None:
    rules = Retention(keep_last=2, keep_every=4, keep_best=1, metric="loss", mode="min")
    assert rules.kept(TWELVE) == {10, 11} | {0, 4, 8} | {5}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": 0},
        {"keep_last": -1},
        {"keep_every": 1.5},
        {"keep_last": True},
        {"keep_best": 2},
        {"metric": "loss"},
        {"keep_best": 2, "metric": ""},
        {"keep_best": 2, "metric": "loss", "mode": "lowest"},
    ],
)
def test_bad_rules_are_refused_when_made(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Retention(**kwargs)  # type: ignore[arg-type]


def test_retention_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Retention(keep_last=1).keep_last = 2  # type: ignore[misc]
