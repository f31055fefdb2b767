"""What the DCP writer and reader share: their location, options and storage session."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Self, TypeVar

from ..config import TransferConfig
from ..storage import parse_location, storage_for
from ._session import StorageSession

__all__ = ["LocatedPlugin", "is_location"]

T = TypeVar("T")

Location = str | os.PathLike[str]


def is_location(checkpoint_id: object) -> bool:
    """Whether ``checkpoint_id`` is a location asyncckpt accepts (``s3://``, ``file://``,
    ``memory://`` or a path)."""
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        return False
    try:
        parse_location(os.fspath(checkpoint_id))
    except ValueError:
        return False
    return True


class LocatedPlugin:
    """A checkpoint location (a directory, or a prefix of a bucket or memory store), its
    ``storage_options`` and :class:`~asyncckpt.TransferConfig`, and the storage session
    (its own client and loop thread) opened on first use.

    :meth:`close` closes the session; the next use opens a new one, so a plugin can be
    closed between checkpoints and reused. Use it as a ``with`` block to close it at the
    end. A plugin pickles without its session (DCP's process-based ``async_save``).
    """

    def __init__(
        self, location: Location, *, storage_options: Mapping[str, Any] | None, config: TransferConfig | None
    ) -> None:
        self._options = dict(storage_options or {})
        self._config = config or TransferConfig()
        self._url = self._checked(location)
        self._session: StorageSession | None = None
        self._session_lock = threading.Lock()

    def _checked(self, location: Location) -> str:
        """The URL of ``location``; :class:`ValueError` if malformed or if the options do
        not apply to it."""
        if not isinstance(location, (str, os.PathLike)):
            raise TypeError(f"a checkpoint location is a URL or a path, not {type(location).__name__}")
        return storage_for(os.fspath(location), options=self._options, config=self._config).url

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint's location as a URL."""
        return self._url

    def _retarget(self, location: Location) -> None:
        """Point at ``location`` from now on (closing the session of another location)."""
        url = self._checked(location)
        if url != self._url:
            self.close()
            self._url = url

    def _run(self, function: Callable[[StorageSession], Coroutine[Any, Any, T]]) -> T:
        """``await function(session)`` on the session's loop (opening it if needed)."""
        with self._session_lock:
            if self._session is None or self._session.closed:
                self._session = StorageSession(self._url, self._options, self._config)
            session = self._session
        return session.run(lambda: function(session))

    def close(self) -> None:
        """Close the storage client and stop the loop thread; safe to call twice."""
        with self._session_lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_session"] = None
        del state["_session_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._session_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {self._url}>"
