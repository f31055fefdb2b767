"""``JobRunner``: caffe2's training driver, on asyncio.

It owns the order of a checkpointed job so that users stop writing it by hand: resume
from the latest committed epoch (or save epoch 0, the state before training), train the
remaining epochs, save on a cadence with each background save overlapping the next
epoch, and always save the last epoch.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

from .errors import CheckpointError, CheckpointStateError
from .manager import MultiNodeCheckpointManager
from .staging import SaveHandle

__all__ = ["FailedSave", "JobRunner", "TrainEpoch"]

log = logging.getLogger("asyncckpt")

#: ``train_epoch(epoch)``: trains one epoch (a plain function or a coroutine function) and
#: returns the epoch's metrics (str -> finite float), or ``None``.
TrainEpoch = Callable[[int], Mapping[str, float] | None | Awaitable[Mapping[str, float] | None]]


class FailedSave(NamedTuple):
    """An intermediate save that failed while training went on."""

    epoch: int
    error: Exception


class JobRunner:
    """Drives a training job on a manager the caller has already ``init``-ed.

    ``save_every`` saves every epoch that is a multiple of it (epoch numbers are
    absolute, so a resumed job keeps the same grid); ``save_every_seconds`` saves an
    epoch when at least that many seconds passed since the previous save began. Either
    may be ``None``; when both are given an epoch is saved if either says so. Epoch 0
    (of a fresh job) and the last epoch are always saved. ``clock`` (seconds, monotonic)
    is what ``save_every_seconds`` is measured with; tests pass a fake one.

    Invalid arguments raise :class:`TypeError`/:class:`ValueError` here.
    """

    def __init__(
        self,
        manager: MultiNodeCheckpointManager,
        *,
        save_every: int | None = 1,
        save_every_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not isinstance(manager, MultiNodeCheckpointManager):
            raise TypeError(
                f"manager must be a MultiNodeCheckpointManager (the asyncio one), got {type(manager).__name__}"
            )
        if save_every is not None and (not _is_int(save_every) or save_every < 1):
            raise ValueError(f"save_every must be a positive int or None, got {save_every!r}")
        if save_every_seconds is not None and (
            not isinstance(save_every_seconds, (int, float))
            or isinstance(save_every_seconds, bool)
            or not math.isfinite(save_every_seconds)
            or save_every_seconds <= 0
        ):
            raise ValueError(
                f"save_every_seconds must be a positive, finite number of seconds or None, got {save_every_seconds!r}"
            )
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        self._manager = manager
        self._save_every = save_every
        self._save_every_seconds = save_every_seconds
        self._clock = clock
        #: the intermediate saves of the last :meth:`run` that failed, in order
        self.failed_saves: list[FailedSave] = []
        #: the committed epoch the last :meth:`run` resumed from (``None``: it started at 0)
        self.resumed_from: int | None = None

    @property
    def manager(self) -> MultiNodeCheckpointManager:
        return self._manager

    async def run(self, train_epoch: TrainEpoch, num_epochs: int) -> int:
        """Train epochs 1 to ``num_epochs``, checkpointed; return the last epoch completed.

        Resumes from the latest committed epoch (``get_resume_from_epoch_id``, then
        ``load``) and trains only the epochs after it; with none committed, saves epoch 0
        (the workspaces as they are) first. A job already past ``num_epochs`` trains
        nothing and returns the epoch it resumed from.

        ``train_epoch(epoch)`` may be a coroutine function (awaited on the loop) or a
        plain function, which runs in a worker thread (``asyncio.to_thread``) so that the
        previous epoch's upload goes on meanwhile. Either way nothing else touches the
        workspaces while it runs: a background save has copied them before
        ``train_epoch`` is called. Its return value, the epoch's metrics or ``None``,
        goes to the epoch's save.

        Saves on the cadence run in the background (``save_async``) while the next
        epoch trains; at most one is in flight. One that fails is logged, appended to
        :attr:`failed_saves`, and training goes on (caffe2's behaviour). The last epoch
        is saved with ``save`` and must succeed: its failure is raised. Invalid state or
        metrics (:class:`TypeError`/:class:`ValueError` before anything is written) and
        ``train_epoch``'s own exceptions are raised at once, once the save in flight ends.
        """
        if not callable(train_epoch):
            raise TypeError(f"train_epoch must be callable, got {type(train_epoch).__name__}")
        if not _is_int(num_epochs) or num_epochs < 0:
            raise ValueError(f"num_epochs must be a non-negative int, got {num_epochs!r}")
        if not self._manager.local_nodes:
            raise CheckpointStateError("JobRunner.run() needs a manager whose init(nodes) was called")
        self.failed_saves = []
        resume = await self._manager.get_resume_from_epoch_id()
        self.resumed_from = resume
        if resume is not None:
            log.info("resuming from epoch %d", resume)
            await self._manager.load(resume)
            if resume >= num_epochs:
                return resume
        elif num_epochs == 0:
            await self._manager.save(0)
            return 0
        pending: SaveHandle | None = None
        last_save_at = self._clock()
        if resume is None:
            pending = await self._save_in_background(0, None)
        try:
            for epoch in range((resume or 0) + 1, num_epochs + 1):
                metrics = await self._train(train_epoch, epoch)
                if pending is not None and pending.done():  # report a failure as soon as it is known
                    await self._settle(pending)
                    pending = None
                if epoch == num_epochs:
                    await self._settle(pending)
                    pending = None
                    await self._manager.save(epoch, metrics=metrics)
                elif self._save_due(epoch, last_save_at):
                    await self._settle(pending)
                    last_save_at = self._clock()
                    pending = await self._save_in_background(epoch, metrics)
        except Exception:
            await self._settle(pending)  # its failure is recorded, not lost in close()
            raise
        return num_epochs

    def _save_due(self, epoch: int, last_save_at: float) -> bool:
        if self._save_every is not None and epoch % self._save_every == 0:
            return True
        return self._save_every_seconds is not None and self._clock() - last_save_at >= self._save_every_seconds

    async def _train(self, train_epoch: TrainEpoch, epoch: int) -> dict[str, float] | None:
        if _is_coroutine_function(train_epoch):
            result: Any = train_epoch(epoch)
        else:
            result = await asyncio.to_thread(train_epoch, epoch)
        if inspect.isawaitable(result):  # a coroutine function's, or a plain callable that returned one
            result = await result
        if result is None:
            return None
        if not isinstance(result, Mapping):
            raise TypeError(
                f"train_epoch({epoch}) returned a {type(result).__name__}; expected metrics (a mapping) or None"
            )
        return dict(result)

    async def _save_in_background(self, epoch: int, metrics: dict[str, float] | None) -> SaveHandle | None:
        """Start a background save of ``epoch``; a storage failure is recorded, not raised."""
        try:
            return await self._manager.save_async(epoch, metrics=metrics)
        except CheckpointError as exc:
            self._record_failure(epoch, exc)
            return None

    async def _settle(self, pending: SaveHandle | None) -> None:
        """Wait for the background save ``pending`` (if any); record its failure."""
        if pending is None:
            return
        try:
            await pending
        except Exception as exc:
            self._record_failure(pending.epoch, exc)

    def _record_failure(self, epoch: int, exc: Exception) -> None:
        log.warning("checkpoint of epoch %d failed; training goes on: %s", epoch, exc)
        self.failed_saves.append(FailedSave(epoch, exc))

    def __repr__(self) -> str:
        return (
            f"JobRunner({self._manager!r}, save_every={self._save_every!r}, "
            f"save_every_seconds={self._save_every_seconds!r})"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_coroutine_function(fn: object) -> bool:
    """``fn`` is an ``async def`` function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
