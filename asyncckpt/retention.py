"""Which committed epochs to keep: the rules of :class:`Retention`, as a pure function."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .manifest import EpochManifest

__all__ = ["Retention"]


@dataclass(frozen=True)
class Retention:
    """Rules for the committed epochs a manager keeps; every field is optional.

    ``keep_last``: the newest N epochs. ``keep_every``: every epoch divisible by K.
    ``keep_best`` with ``metric`` and ``mode`` (``"min"`` or ``"max"``): the K epochs
    with the best value of that metric (``save(epoch, metrics=...)``); epochs without
    it are not candidates, ties keep the earlier epoch. An epoch is kept if any rule
    keeps it, and the latest committed epoch is always kept. With no rule at all,
    every epoch is kept.
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: str = "min"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_best"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Retention.{name} must be a positive int or None, got {value!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"Retention.mode must be 'min' or 'max', got {self.mode!r}")
        if (self.keep_best is None) != (self.metric is None):
            raise ValueError("Retention.keep_best and Retention.metric go together: the best K by which metric?")
        if self.metric is not None and (not isinstance(self.metric, str) or not self.metric):
            raise ValueError(f"Retention.metric must be a metric name, got {self.metric!r}")

    @property
    def keeps_everything(self) -> bool:
        return self.keep_last is None and self.keep_every is None and self.keep_best is None

    def kept(self, manifests: Sequence[EpochManifest]) -> set[int]:
        """The epochs these rules keep among ``manifests`` (the committed ones)."""
        epochs = sorted(m.epoch for m in manifests)
        if not epochs or self.keeps_everything:
            return set(epochs)
        keep = {epochs[-1]}
        if self.keep_last is not None:
            keep.update(epochs[-self.keep_last :])
        if self.keep_every is not None:
            keep.update(e for e in epochs if e % self.keep_every == 0)
        if self.keep_best is not None and self.metric is not None:
            scored = [(m.metrics[self.metric], m.epoch) for m in manifests if self.metric in m.metrics]
            sign = 1.0 if self.mode == "min" else -1.0
            scored.sort(key=lambda item: (sign * item[0], item[1]))
            keep.update(epoch for _, epoch in scored[: self.keep_best])
        return keep
