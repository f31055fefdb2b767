"""The ``asyncckpt`` command line (also ``python -m asyncckpt``).

:func:`main` is a click group; each command lives in a module of its own and is imported
when it runs or its help is shown (:data:`COMMANDS`). :func:`run_coroutine` is where a
command's event loop is made; the only other loops are those of the processes that the
demo and the benchmark spawn, each owned by that process's entry point. Exit codes, for
every command:

* 0: success;
* 1: the command ran and its check failed (the demo's state comparison, damage
  found by ``verify``, a declined ``rm``);
* 2: it could not run: a usage error, or a storage/environment error (a location
  that does not exist among them), printed as one red line without a traceback.

Commands: ``demo`` (a simulated job that crashes and resumes), ``ls`` (the committed
epochs of a location), ``show`` (the nodes and blobs of one epoch), ``verify`` (read
every byte, check every CRC32C), ``rm`` (delete epochs), ``prune`` (delete what
retention rules do not keep), ``gc`` (remove what interrupted saves left behind) and
``bench`` (asyncckpt against bare aioboto3 and s3transfer on a local S3 server; with
``--peers`` against torch.save, PyTorch DCP, s3torchconnector and torchsnapshot too). Every
command that reads a location takes ``--json``: one JSON document on stdout.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Coroutine, Mapping
from typing import Any, NoReturn, TypeVar

import click

from asyncckpt import CheckpointError, __version__

__all__ = ["COMMANDS", "EXIT_ERROR", "EXIT_FAILED", "EXIT_OK", "fail", "main", "run_coroutine"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2

#: Every command of :func:`main`: its name and where it is defined (``module:attribute``).
COMMANDS: Mapping[str, str] = {
    "bench": "asyncckpt.cli.bench:bench",
    "demo": "asyncckpt.cli.demo:demo",
    "gc": "asyncckpt.cli.inspect:gc",
    "ls": "asyncckpt.cli.inspect:ls",
    "prune": "asyncckpt.cli.lifecycle:prune",
    "rm": "asyncckpt.cli.lifecycle:rm",
    "show": "asyncckpt.cli.lifecycle:show",
    "verify": "asyncckpt.cli.verify:verify",
}

T = TypeVar("T")


def fail(message: object) -> NoReturn:
    """Print ``message`` as one red line on stderr and exit with :data:`EXIT_ERROR`."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True, highlight=False).print(f"[bold red]error:[/] [red]{escape(str(message))}[/]")
    raise SystemExit(EXIT_ERROR)


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a new event loop; a :class:`~asyncckpt.CheckpointError` ends the
    command cleanly (see :func:`fail`)."""
    try:
        return asyncio.run(coro)
    except CheckpointError as exc:
        fail(exc)


class _LazyGroup(click.Group):
    """A click group whose commands are imported on first use, from ``name -> "module:attribute"``."""

    def __init__(self, *args: Any, lazy_commands: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy_commands = dict(lazy_commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self._lazy_commands:
            module, _, attribute = self._lazy_commands[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self._lazy_commands[cmd_name]} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asyncckpt")
def main() -> None:
    """asyncckpt: asyncio checkpoints of multi-node training state on S3-compatible
    object storage (AWS S3, MinIO, Ceph, R2...), a local directory or memory.

    Exit codes: 0 success, 1 a check failed, 2 usage or storage error.
    """
