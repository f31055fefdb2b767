"""Job identity from a launcher's environment (torchrun / torchelastic, or our own).

Every process of one job incarnation must pass the same ``run_id`` to its
:class:`~asyncckpt.MultiNodeCheckpointManager`; a restarted job must use a new one, so
that its saves never mix with a crashed incarnation's. :func:`job_from_env` reads it:

* ``ASYNCCKPT_RUN_ID`` if set (you choose the id);
* else torchrun's ``TORCHELASTIC_RUN_ID`` plus ``TORCHELASTIC_RESTART_COUNT`` (a new
  incarnation after every elastic restart);
* ``RANK``/``WORLD_SIZE`` (or ``ASYNCCKPT_RANK``/``ASYNCCKPT_WORLD_SIZE``) give this
  process's rank and the number of processes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["JobIdentity", "job_from_env", "split_nodes"]


@dataclass(frozen=True)
class JobIdentity:
    run_id: str
    rank: int
    world_size: int


def _sanitize(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "-", value)[:64] or "run"


def job_from_env(env: Mapping[str, str] | None = None) -> JobIdentity | None:
    """The job identity from the environment, or ``None`` when no launcher set one."""
    env = os.environ if env is None else env
    if env.get("ASYNCCKPT_RUN_ID"):
        run_id = _sanitize(env["ASYNCCKPT_RUN_ID"])
    elif env.get("TORCHELASTIC_RUN_ID"):
        run_id = _sanitize(f"{env['TORCHELASTIC_RUN_ID']}-r{env.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    else:
        return None
    try:
        rank = int(env.get("ASYNCCKPT_RANK", env.get("RANK", "0")))
        world = int(env.get("ASYNCCKPT_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    except ValueError as exc:
        raise ValueError(f"RANK/WORLD_SIZE in the environment are not integers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}")
    return JobIdentity(run_id, rank, world)


def split_nodes(nodes: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The nodes process ``rank`` of ``world_size`` holds: a round-robin split."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a job of {world_size} processes")
    return [node for i, node in enumerate(nodes) if i % world_size == rank]
