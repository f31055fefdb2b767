"""The metadata-handler protocol: caffe2's duck-typed handler, called from asyncio.

The manager always keeps its JSON manifests in the bucket; a handler mirrors checkpoint
metadata elsewhere (a database, a tracking service) and may steer which epoch to resume
from. Its methods may be coroutines or plain functions; :class:`HandlerCalls` awaits
either, so the manager only ever sees coroutines.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .errors import CheckpointError

__all__ = ["HandlerCalls", "MetadataHandler"]


@runtime_checkable
class MetadataHandler(Protocol):
    """What a ``metadata_handler`` provides (async or plain methods)."""

    def set_params(
        self, db_prefix: str, db_type: str, node_names: list[str], path_prefix: str | None, path_type: str | None
    ) -> Any: ...

    def write(self, epoch: int) -> Any: ...

    def last_epoch(self, user_epoch: int | None = None) -> Any: ...

    def cp_accessible(self, epoch: int | None = None) -> Any: ...

    def report(self, action_name: str, stats: dict[str, Any]) -> Any: ...


_METHODS = ("set_params", "write", "last_epoch", "cp_accessible", "report")


async def _settle(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class HandlerCalls:
    """A user's :class:`MetadataHandler`, checked once and called as coroutines.

    Raises :class:`TypeError` at construction when a protocol method is missing.
    ``set_params`` is sent at most once per set of parameters (:meth:`params_changed`
    arms it again).
    """

    def __init__(self, handler: object):
        missing = [m for m in _METHODS if not callable(getattr(handler, m, None))]
        if missing:
            raise TypeError(f"metadata_handler lacks method(s) {missing} of the MetadataHandler protocol")
        self._handler: Any = handler
        self._params_sent = False

    def params_changed(self) -> None:
        self._params_sent = False

    async def set_params_once(
        self, db_prefix: str, db_type: str, node_names: Sequence[str], path_prefix: str | None, path_type: str | None
    ) -> None:
        if self._params_sent:
            return
        self._params_sent = True
        await _settle(
            self._handler.set_params(
                db_prefix=db_prefix,
                db_type=db_type,
                node_names=list(node_names),
                path_prefix=path_prefix,
                path_type=path_type,
            )
        )

    async def committed(self, epoch: int) -> None:
        """Tell the handler ``epoch`` is committed; its failure is a :class:`CheckpointError`
        that says the epoch is committed all the same."""
        try:
            await _settle(self._handler.write(epoch=epoch))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"epoch {epoch} is committed, but the metadata handler's write failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def last_epoch(self, user_epoch: int | None) -> Any:
        return await _settle(self._handler.last_epoch(user_epoch=user_epoch))

    async def cp_accessible(self, epoch: int | None) -> bool:
        return bool(await _settle(self._handler.cp_accessible(epoch)))

    async def report(self, action_name: str, stats: dict[str, Any]) -> None:
        await _settle(self._handler.report(action_name, stats))
